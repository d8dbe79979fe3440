"""Verification pair sets (InsightFace .bin or femb pair .parquet): decode once, embed with flips, verify.

A pair set holds `2*P` aligned 112x112 face images, pair `i` being images `2i` (left) and `2i+1`
(right), and `P` same/different labels. Scoring follows arcface_torch `eval/verification.py`
(`test`): every image and its horizontal mirror are embedded from RGB pixels normalised as
`(x/255 - 0.5)/0.5`, the two embeddings are summed, and the sums go to the 10-fold protocol of
`femb.evaluation.verification.evaluate_pairs` (which L2-normalises them); XNorm is the mean L2 norm
of the raw plain and mirrored embeddings. The same functions serve `femb evaluate` and the
periodic verification of training, so decoding happens once per file (cached) and the embedding
loop takes any `nn.Module`, `femb.weights.OnnxBackbone` included.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm

from femb.data.binfile import read_bin
from femb.data.decode import IMAGE_SIZE, decode_rgb
from femb.errors import FembError
from femb.evaluation.verification import evaluate_pairs, mean_embedding_norm
from femb.weights import OnnxBackbone

PAIR_COLUMNS = ("left", "right", "is_same")
_SIDES = ("left", "right")
_DECODE_CHUNK = 256  # images per decode task: big enough to amortise the pool, small enough to balance
_MAX_DECODE_THREADS = 8

_cache: dict[tuple[str, int, int], PairSet] = {}
_cache_lock = Lock()


@dataclass(frozen=True, eq=False)
class PairSet:
    """A decoded pair set: uint8 RGB images [2P, 3, H, W] (left, right interleaved, as in .bin) and is_same [P]."""

    name: str
    path: Path
    images: torch.Tensor
    is_same: np.ndarray

    @property
    def num_pairs(self) -> int:
        """P, the number of pairs."""
        return int(self.is_same.shape[0])


def load_pair_set(path: Path | str, *, cache: bool = True, progress: bool | None = None) -> PairSet:
    """Read and decode a .bin (InsightFace pickle, read safely) or pair .parquet (left, right, is_same) set.

    The set's name is the file stem (`lfw.bin` -> `lfw`). With `cache`, a file already decoded in this
    process (same resolved path, size and modification time) is returned without decoding again;
    `clear_pair_set_cache` frees the memory (an LFW-sized set holds 12,000 x 3 x 112 x 112 bytes, 450 MB).
    """
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FembError(f"{path}: no such pair set file") from None
    if not path.is_file():
        raise FembError(f"{path}: is not a file; expected a .bin or pair .parquet set")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache:
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
    suffix = path.suffix.lower()
    if suffix == ".bin":
        encoded, same = read_bin(path)
    elif suffix == ".parquet":
        encoded, same = _read_pair_parquet(path)
    else:
        raise FembError(f"{path}: unknown pair set format '{suffix}'; expected a .bin or .parquet file")
    pair_set = PairSet(
        name=path.stem,
        path=path,
        images=_decode_all(path, encoded, progress),
        is_same=np.asarray(same, dtype=bool),
    )
    if cache:
        with _cache_lock:
            _cache[key] = pair_set
    return pair_set


def clear_pair_set_cache() -> None:
    """Forget every decoded pair set kept by `load_pair_set(cache=True)`."""
    with _cache_lock:
        _cache.clear()


def embed_pair_set(
    model: nn.Module,
    pair_set: PairSet,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of every image and of its horizontal mirror, float32 [2P, D] each (arcface_torch `test`).

    The model runs in eval mode under `torch.inference_mode` (its previous mode is restored after),
    on `device` if given (a torch module is moved there) or where its parameters are; ONNX backbones
    run on their own onnxruntime provider. Pixels are normalised as `(x/255 - 0.5)/0.5` on the device.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FembError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if device is not None and not isinstance(model, OnnxBackbone):
        model.to(device)
    target, dtype = _device_and_dtype(model)
    images = pair_set.images
    total = images.shape[0]
    emb = emb_flip = None
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=total,
        unit="img",
        desc=f"embed {pair_set.name}",
        disable=None if progress is None else not progress,
    )
    try:
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                batch = images[start : start + batch_size].to(target, non_blocking=True)
                x = batch.to(torch.float32).div_(255.0).sub_(0.5).div_(0.5).to(dtype)
                plain = model(x).float().cpu().numpy()
                mirrored = model(x.flip(3)).float().cpu().numpy()
                if emb is None:
                    emb = np.empty((total, plain.shape[1]), np.float32)
                    emb_flip = np.empty_like(emb)
                emb[start : start + len(x)] = plain
                emb_flip[start : start + len(x)] = mirrored
                bar.update(len(x))
    finally:
        bar.close()
        model.train(was_training)
    return emb, emb_flip


def verify_pair_set(
    model: nn.Module,
    pair_set: PairSet,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    n_folds: int = 10,
) -> dict[str, Any]:
    """InsightFace verification of one set: accuracy (flip-summed embeddings, 10 folds), TAR@FAR, AUC, EER, XNorm.

    Returns `evaluate_pairs`' dict plus "xnorm" (mean L2 norm of the raw plain and mirrored
    embeddings, arcface_torch's XNorm); its "roc" entry holds numpy arrays for plots, not for JSON.
    """
    emb, emb_flip = embed_pair_set(model, pair_set, batch_size=batch_size, device=device, progress=progress)
    summed = emb + emb_flip
    result = evaluate_pairs(summed[0::2], summed[1::2], pair_set.is_same, n_folds=n_folds)
    result["xnorm"] = mean_embedding_norm(emb, emb_flip)
    return result


def _read_pair_parquet(path: Path) -> tuple[list[bytes], list[bool]]:
    """Encoded images interleaved left, right and the labels of a pair .parquet (DESIGN.md "Pairs")."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise FembError(f"{path}: not a Parquet file ({_first_line(err)})") from None
    missing = [c for c in PAIR_COLUMNS if c not in schema.names]
    if missing:
        raise FembError(
            f"{path}: not a pair set: missing column(s) {', '.join(missing)} "
            f"(found {', '.join(schema.names) or 'none'}; expected left, right binary and is_same bool)"
        )
    for column, check in (("left", _is_binary), ("right", _is_binary), ("is_same", pa.types.is_boolean)):
        if not check(schema.field(column).type):
            raise FembError(f"{path}: column '{column}' has type {schema.field(column).type}")
    try:
        table = pq.read_table(path, columns=list(PAIR_COLUMNS))
    except (pa.ArrowException, OSError) as err:
        raise FembError(f"{path}: cannot read the pair table ({_first_line(err)})") from None
    if table.num_rows == 0:
        raise FembError(f"{path}: the pair set is empty (no rows)")
    columns = {name: table.column(name).to_pylist() for name in PAIR_COLUMNS}
    for name in PAIR_COLUMNS:
        nulls = [i for i, value in enumerate(columns[name]) if value is None]
        if nulls:
            raise FembError(f"{path}: pair {nulls[0]}: column '{name}' is null ({len(nulls)} null rows)")
    encoded = [image for pair in zip(columns["left"], columns["right"]) for image in pair]
    return encoded, columns["is_same"]


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


def _decode_all(path: Path, encoded: Sequence[bytes], progress: bool | None) -> torch.Tensor:
    """Decode every image into one uint8 [N, 3, 112, 112] tensor; FembError names the first bad pair and side."""
    images = torch.empty((len(encoded), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    # Threads write through numpy: a torch copy from a worker thread waits on torch's OpenMP pool.
    pixels = images.numpy()
    chunks = [range(i, min(i + _DECODE_CHUNK, len(encoded))) for i in range(0, len(encoded), _DECODE_CHUNK)]
    bar = tqdm(
        total=len(encoded),
        unit="img",
        desc=f"decode {path.name}",
        disable=None if progress is None else not progress,
    )

    def decode(indices: range) -> list[tuple[int, str]]:
        scratch = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        failures = []
        for i in indices:
            try:
                decode_rgb(encoded[i], IMAGE_SIZE, out=scratch)
            except ValueError as err:
                failures.append((i, str(err)))
                continue
            pixels[i] = scratch.transpose(2, 0, 1)
        bar.update(len(indices))
        return failures

    # libjpeg-turbo (simplejpeg) releases the GIL, so threads decode in parallel without pickling.
    threads = max(1, min(_MAX_DECODE_THREADS, os.cpu_count() or 1, len(chunks)))
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            failures = [f for result in pool.map(decode, chunks) for f in result]
    finally:
        bar.close()
    if failures:
        index, reason = min(failures)
        more = f" ({len(failures)} images fail)" if len(failures) > 1 else ""
        raise FembError(
            f"{path}: pair {index // 2} {_SIDES[index % 2]} image (image {index}) cannot be decoded: {reason}{more}"
        )
    return images


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which float type the model computes; ONNX backbones take float32 on the CPU."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
