"""Embed face images with a backbone, preprocessed and flip-summed as InsightFace evaluation does.

`embed_batches` is the one embedding loop: `femb embed`, the pair sets of `femb evaluate` and the
periodic verification of training all go through it. It takes uint8 N x 3 x 112 x 112 RGB batches,
normalises them on the model's device (`femb.data.decode.normalize`, `(x/255 - 0.5)/0.5`) and, with
mirrors, also embeds their horizontal flips; `embed_pixels` sums the two, emb(x) + emb(flip(x)) as in
InsightFace `eval/verification.py`, before the optional L2 normalisation.

Image files (`embed_images`) are expected to be aligned 112x112 face crops (the arcface_torch input).
Any format PIL reads is accepted and converted to RGB; other sizes are resized to 112x112 with PIL
bilinear resampling (antialiased when shrinking; aspect ratio not kept, nothing is aligned); EXIF
orientation is not applied, pixels are taken as stored, like the training decoder does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from femb.data.decode import IMAGE_SIZE
from femb.data.decode import normalize as normalize_pixels
from femb.data.images import rgb_pixels
from femb.device import model_device_and_dtype, resolve_device
from femb.errors import FembError
from femb.io import atomic_path
from femb.weights import OnnxBackbone, load_backbone

_MAX_READ_THREADS = 4


def check_batch_size(batch_size: int) -> int:
    """`batch_size` if it is a positive integer, else a FembError that names it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FembError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return batch_size


def embed_batches(
    model: nn.Module,
    images: Tensor | Iterable[Tensor],
    batch_size: int = 128,
    *,
    mirrored: bool = False,
    total: int | None = None,
    desc: str = "embed",
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Float32 [N, D] embeddings of uint8 N x 3 x H x W images, and of their mirrors if `mirrored` (else None).

    `images` is one tensor, cut into batches of `batch_size`, or an iterable of batches taken as they
    come. The model runs in eval mode under `torch.inference_mode` (its mode is restored after), on the
    device and in the dtype of its parameters; pixels are normalised there, in float32 then cast.
    """
    check_batch_size(batch_size)
    if isinstance(images, Tensor):
        total = len(images)
        images = images.split(batch_size)
    device, dtype = model_device_and_dtype(model)
    plain: list[np.ndarray] = []
    flipped: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=total, unit="img", desc=desc, disable=None if progress is None else not progress)
    try:
        with torch.inference_mode():
            for batch in images:
                x = normalize_pixels(batch.to(device, non_blocking=True)).to(dtype)
                plain.append(model(x).float().cpu().numpy())
                if mirrored:
                    flipped.append(model(x.flip(3)).float().cpu().numpy())
                bar.update(len(x))
    finally:
        bar.close()
        model.train(was_training)
    if not plain:
        raise FembError("no images to embed")
    return np.concatenate(plain), np.concatenate(flipped) if mirrored else None


def embed_pixels(
    model: nn.Module,
    images: Tensor | Iterable[Tensor],
    batch_size: int = 128,
    *,
    flip: bool = False,
    normalize: bool = False,
    total: int | None = None,
    desc: str = "embed",
    progress: bool | None = None,
) -> np.ndarray:
    """Embeddings [N, D] float32 of uint8 images (`embed_batches`), flip-summed with `flip`, unit rows with `normalize`."""
    emb, emb_flip = embed_batches(
        model, images, batch_size, mirrored=flip, total=total, desc=desc, progress=progress
    )
    if emb_flip is not None:
        emb += emb_flip
    if normalize:
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def load_face_image(path: Path | str) -> np.ndarray:
    """Read one image as a 112x112x3 uint8 RGB array (bilinear resize if needed); FembError names a bad file.

    Pixels are those of the training decoder (`femb.data.images.rgb_pixels`): a 16-bit image keeps its
    high byte, as OpenCV reads it.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            pixels = rgb_pixels(img)
    except FileNotFoundError as err:
        raise FembError(f"{path}: no such image file") from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise FembError(f"{path}: cannot read image ({err})") from err
    if pixels.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        resized = Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized)
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def embed_images(
    model: nn.Module,
    paths: Sequence[Path],
    batch_size: int = 64,
    flip: bool = False,
    normalize: bool = False,
    progress: bool | None = None,
) -> np.ndarray:
    """Embeddings [N, D] float32 of the image files, in order, computed in eval mode without gradients."""
    paths = [Path(p) for p in paths]
    check_batch_size(batch_size)
    if not paths:
        raise FembError("no images to embed")
    pool = ThreadPoolExecutor(max_workers=min(_MAX_READ_THREADS, os.cpu_count() or 1))
    try:
        batches = _read_batches(pool, paths, batch_size)
        return embed_pixels(
            model, batches, batch_size, flip=flip, normalize=normalize, total=len(paths), progress=progress
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _read_batches(pool: ThreadPoolExecutor, paths: list[Path], batch_size: int) -> Iterator[Tensor]:
    """uint8 N x 3 x 112 x 112 batches of the files (channels-last memory), reading the next while one is embedded."""
    groups = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    pending = [pool.submit(load_face_image, p) for p in groups[0]]
    for index in range(len(groups)):
        pixels = np.stack([future.result() for future in pending])
        if index + 1 < len(groups):
            pending = [pool.submit(load_face_image, p) for p in groups[index + 1]]
        yield torch.from_numpy(pixels).permute(0, 3, 1, 2)


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
