"""Embed face images with a backbone, preprocessed and flip-summed as InsightFace evaluation does.

Images are expected to be aligned 112x112 face crops (the arcface_torch input). Any format PIL
reads is accepted and converted to RGB; other sizes are resized to 112x112 with PIL bilinear
resampling (antialiased when shrinking; aspect ratio not kept, nothing is aligned); EXIF orientation
is not applied, pixels are taken as stored, like the training decoder does. Pixels are
normalised as `(x/255 - 0.5)/0.5`. With `flip`, the embedding is emb(x) + emb(horizontal flip of x),
as in InsightFace `eval/verification.py`, before the optional L2 normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from femb.device import resolve_device
from femb.errors import FembError
from femb.io import atomic_path
from femb.weights import OnnxBackbone, load_backbone

IMAGE_SIZE = 112


def load_face_image(path: Path | str) -> np.ndarray:
    """Read one image as a 112x112x3 uint8 RGB array (bilinear resize if needed); FembError names a bad file."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except FileNotFoundError as err:
        raise FembError(f"{path}: no such image file") from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise FembError(f"{path}: cannot read image ({err})") from err
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack HxWx3 uint8 RGB arrays into an Nx3xHxW float32 batch normalised as (x/255 - 0.5)/0.5."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return batch.div_(255.0).sub_(0.5).div_(0.5).contiguous()


def embed_images(
    model: nn.Module,
    paths: Sequence[Path],
    batch_size: int = 64,
    flip: bool = False,
    normalize: bool = False,
    progress: bool | None = None,
) -> np.ndarray:
    """Embeddings [N, D] float32 of the images, in order, computed in eval mode without gradients."""
    paths = [Path(p) for p in paths]
    if batch_size < 1:
        raise FembError(f"batch_size must be at least 1, got {batch_size}")
    if not paths:
        raise FembError("no images to embed")
    device, dtype = _device_and_dtype(model)
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    chunks: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    bar = tqdm(total=len(paths), unit="img", desc="embed", disable=None if progress is None else not progress)
    try:
        pending = _submit(pool, batches[0])
        for index in range(len(batches)):
            images = [future.result() for future in pending]
            if index + 1 < len(batches):  # decode the next batch while the model runs
                pending = _submit(pool, batches[index + 1])
            x = images_to_tensor(images).to(device=device, dtype=dtype)
            with torch.inference_mode():
                emb = model(x).float()
                if flip:
                    emb += model(x.flip(3)).float()
            chunks.append(emb.cpu().numpy())
            bar.update(len(images))
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        model.train(was_training)
    out = np.concatenate(chunks).astype(np.float32, copy=False)
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def run_embed(
    backbone: str | None,
    weights: Path | None,
    output: Path,
    images: Sequence[Path],
    batch_size: int = 64,
    flip: bool = False,
    normalize: bool = False,
    *,
    device: str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """`femb embed`: load weights, embed the images in order, write an [N, D] float32 .npy atomically.

    Weights are required (embeddings of a randomly initialised backbone mean nothing); `backbone`
    may be None to infer it from the file. `device` defaults to CUDA when available (ONNX files run
    on onnxruntime's own provider).
    """
    if weights is None:
        raise FembError(
            "--weights is required: a backbone without trained weights gives meaningless embeddings"
        )
    output = Path(output)
    if output.suffix != ".npy":
        raise FembError(f"{output}: the output file must end in .npy")
    target = resolve_device(device)
    model = load_backbone(weights, backbone)
    if not isinstance(model, OnnxBackbone):
        model = model.to(target)
    embeddings = embed_images(
        model, images, batch_size=batch_size, flip=flip, normalize=normalize, progress=progress
    )
    with atomic_path(output) as tmp, open(tmp, "wb") as f:
        np.save(f, embeddings)
        f.flush()
        os.fsync(f.fileno())
    return {
        "output": str(output),
        "weights": str(weights),
        "images": int(embeddings.shape[0]),
        "dim": int(embeddings.shape[1]),
        "flip": flip,
        "normalize": normalize,
    }


def _submit(pool: ThreadPoolExecutor, paths: Sequence[Path]) -> list[Future[np.ndarray]]:
    return [pool.submit(load_face_image, p) for p in paths]


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32
