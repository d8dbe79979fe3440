"""Verification pair sets (InsightFace .bin or femb pair .parquet): decode once, embed with flips, verify.

A pair set holds `2*P` aligned 112x112 face images, pair `i` being images `2i` (left) and `2i+1`
(right), and `P` same/different labels (docs/architecture.md ".bin pair sets" and "Pair files").
Scoring follows arcface_torch `eval/verification.py` (`test`): every image and its horizontal mirror
are embedded (`femb.embed.embed_batches`, pixels normalised as `(x/255 - 0.5)/0.5`), the two
embeddings are summed, and the sums go to the 10-fold protocol of
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
from femb.data.decode import IMAGE_SIZE, ImageDecodeError, decode_batch, image_batch
from femb.data.layout import PAIR_COLUMNS
from femb.embed import embed_batches
from femb.errors import FembError
from femb.evaluation.verification import evaluate_pairs, mean_embedding_norm
from femb.weights import OnnxBackbone

_LEFT, _RIGHT, _IS_SAME = PAIR_COLUMNS
_DECODE_CHUNK = 256  # images per decode task: big enough to amortise the pool, small enough to balance
_MAX_DECODE_THREADS = 8

_cache: dict[tuple[str, int, int], PairSet] = {}
_cache_lock = Lock()


@dataclass(frozen=True, eq=False)
class PairSet:
    """A decoded pair set: uint8 RGB images [2P, 3, H, W] (left, right interleaved, as in .bin) and is_same [P].

    `images` is channels-last in memory, as `femb.data.decode.decode_batch` writes it.
    """

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

    On `device` if given (a torch module is moved there), else where the model's parameters are; ONNX
    backbones run on their own onnxruntime provider. See `femb.embed.embed_batches`.
    """
    if device is not None and not isinstance(model, OnnxBackbone):
        model.to(device)
    emb, emb_flip = embed_batches(
        model, pair_set.images, batch_size, mirrored=True, desc=f"embed {pair_set.name}", progress=progress
    )
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
    """Encoded images interleaved left, right and the labels of a pair .parquet (docs/architecture.md "Pair files")."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise FembError(f"{path}: not a Parquet file ({_first_line(err)})") from None
    missing = [c for c in PAIR_COLUMNS if c not in schema.names]
    if missing:
        raise FembError(
            f"{path}: not a pair set: missing column(s) {', '.join(missing)} "
            f"(found {', '.join(schema.names) or 'none'}; expected {_LEFT}, {_RIGHT} binary and {_IS_SAME} bool)"
        )
    for column, check in ((_LEFT, _is_binary), (_RIGHT, _is_binary), (_IS_SAME, pa.types.is_boolean)):
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
    encoded = [image for pair in zip(columns[_LEFT], columns[_RIGHT]) for image in pair]
    return encoded, columns[_IS_SAME]


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


def _decode_all(path: Path, encoded: Sequence[bytes], progress: bool | None) -> torch.Tensor:
    """Decode every image into one uint8 [N, 3, 112, 112] tensor; FembError names the first bad pair and side."""
    images = image_batch(len(encoded), IMAGE_SIZE)
    chunks = [range(i, min(i + _DECODE_CHUNK, len(encoded))) for i in range(0, len(encoded), _DECODE_CHUNK)]
    bar = tqdm(
        total=len(encoded),
        unit="img",
        desc=f"decode {path.name}",
        disable=None if progress is None else not progress,
    )

    def decode(indices: range) -> list[tuple[int, str]]:
        failures = []
        start, stop = indices.start, indices.stop
        while start < stop:  # past a bad image, go on with the next: the error counts them all
            try:
                decode_batch(encoded[start:stop], IMAGE_SIZE, out=images[start:stop])
                break
            except ImageDecodeError as err:
                failures.append((start + err.index, err.reason))
                start += err.index + 1
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
            f"{path}: pair {index // 2} {PAIR_COLUMNS[index % 2]} image (image {index}) cannot be decoded: {reason}{more}"
        )
    return images


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
