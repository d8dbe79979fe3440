"""IJB-B and IJB-C template verification (1:1) and identification (1:N), as InsightFace computes them.

The layout is InsightFace's IJB release (docs/architecture.md "IJB"): `root/loose_crop/*.jpg` and
`root/meta/<name>_*` files, `<name>` being `ijbc` or `ijbb` (upper case accepted too). `read_ijb` reads
them with every row checked; `embed_ijb` aligns each crop with `femb.data.align.norm_crop` and its five
landmarks and sums the embeddings of the crop and its mirror (arcface_torch `eval_ijbc.py`, mode F1),
cached on disk; `evaluate_1v1` and `evaluate_1vn` score them.

1:1 follows arcface_torch `eval_ijbc.py`: image features (L2-normalised only with `normalize_images`,
mode N0; the official default N1 keeps their norms) times the detector's faceness score (mode D1),
averaged within a media, summed over a template's medias, the template L2-normalised; a pair's score is
the cosine of its two templates; the ROC is sklearn's `roc_curve` with defaults; TAR@FAR is the TPR of
the point nearest the FAR on the reversed curve, the first of equally near points (the official
`min(zip(abs(fpr - far), range(len(fpr))))`). 1:N follows InsightFace `ijb_1n.py`: gallery G1 + G2
(IJB-B: S1 + S2) against the mixed probes, a probe correct at rank k when its mated gallery template is
among the k most similar (equal similarities ordered by gallery position), and TPIR at FPIR f the
fraction of the Q probes whose mated similarity is strictly above the ceil(Q f)-th largest non-mated one.

Everything is vectorised: pooling is one sparse (templates x images) weight matrix times the features,
64 columns at a time; pairs are scored from BLAS products of template blocks. Pooling runs in float64
on the given features; the official loop averages float32 features in float32, so on float32 features
its scores differ from these by float32 rounding (about 1e-7), and on float64 features they agree to
1e-12 (what the tests check).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.sparse
import torch
from torch import nn

from femb.data.align import norm_crop
from femb.device import resolve_device
from femb.embed import check_batch_size, embed_batches
from femb.errors import FembError
from femb.evaluation.verification import far_key
from femb.io import atomic_path, file_sha256
from femb.weights import OnnxBackbone, load_backbone

NAMES = ("IJBB", "IJBC")
FAR_TARGETS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # the official table's columns
FPIR_TARGETS: tuple[float, ...] = (1e-2, 1e-1)  # ijb_1n.py's `Fars`
RANKS: tuple[int, ...] = (1, 5, 10)
_REQUIRED = ("_face_tid_mid.txt", "_name_5pts_score.txt", "_template_pair_label.txt")
GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}

_PAIR_CHUNK_BYTES = 16 << 20  # pair file parsed in pieces of this size, cut at line ends
_MAX_DIGITS = 15  # whole numbers up to 10^15 - 1 are exact in the float64 digit sums
_POOL_COLUMNS = 64  # feature columns pooled at a time (bounds the float64 copy of the features)
_BLOCK_ROWS = 512  # template rows per BLAS block when scoring pairs
_PROBE_ROWS = 2048  # probes per similarity block in 1:N
_READ_THREADS = 4


@dataclass(frozen=True, eq=False)
class IJBDataset:
    """An IJB release's meta data, one row per image in the order of `<name>_name_5pts_score.txt`.

    `landmarks` (N, 5, 2) and `faceness` (N,) are float32 as the official script reads them;
    `templates` and `medias` (N,) int64 come from `<name>_face_tid_mid.txt`, matched by image name.
    `pair_t1/t2/labels` are the 1:1 pairs; `gallery_templates/subjects` hold the rows of both gallery
    files (G1 then G2) and `probe_templates/subjects` the rows of the mixed probe file, one per line
    (templates repeat); they are None when the release has no 1:N files.
    """

    name: str
    root: Path
    images: tuple[str, ...]
    landmarks: np.ndarray
    faceness: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_labels: np.ndarray
    gallery_templates: np.ndarray | None = None
    gallery_subjects: np.ndarray | None = None
    probe_templates: np.ndarray | None = None
    probe_subjects: np.ndarray | None = None

    @property
    def has_1vn(self) -> bool:
        """Whether the release has the 1:N gallery and probe files."""
        return self.gallery_templates is not None

    def image_paths(self) -> list[Path]:
        """`root/loose_crop/<image>` for every image, in row order."""
        crops = self.root / "loose_crop"
        return [crops / name for name in self.images]


# ---------------------------------------------------------------------------------------------- reading


def read_ijb(root: Path | str, name: str | None = None) -> IJBDataset:
    """Read and check an IJB release under `root` (`loose_crop/`, `meta/`); `name` IJBB or IJBC, else found.

    Every problem is one FembError naming the file and line: a missing meta file, a short row, a
    field that is not a number, an image missing from loose_crop or from one of the two image files,
    a pair or 1:N row naming a template no image belongs to, a label other than 0/1.
    """
    root = Path(root)
    meta = root / "meta"
    if not meta.is_dir():
        raise FembError(f"{meta}: no such directory; expected an IJB release (loose_crop/ and meta/)")
    name = _release_name(meta, name)

    def meta_file(suffix: str, required: bool = True) -> Path | None:
        for prefix in (name.lower(), name):
            path = meta / f"{prefix}_{suffix}"
            if path.is_file():
                return path
        if required:
            raise FembError(f"{meta / f'{name.lower()}_{suffix}'}: no such file (IJB meta file)")
        return None

    tid_path = meta_file("face_tid_mid.txt")
    pts_path = meta_file("name_5pts_score.txt")
    pair_path = meta_file("template_pair_label.txt")
    assert tid_path is not None and pts_path is not None and pair_path is not None

    pts_names, pts_lines, values = _read_named_rows(pts_path, 11, float, "x1 y1 ... x5 y5 faceness")
    tid_names, tid_lines, ids = _read_named_rows(tid_path, 2, int, "template media")
    order = _match_names(pts_path, pts_names, pts_lines, tid_path, tid_names, tid_lines)
    _check_images_exist(root / "loose_crop", pts_path, pts_names, pts_lines)
    templates = ids[order, 0]
    medias = ids[order, 1]
    known = np.unique(templates)

    pairs, pair_lines = _read_int_table(pair_path, 3, "t1 t2 label")
    for column in (0, 1):
        _check_known(pair_path, pair_lines, pairs[:, column], known)
    bad = np.flatnonzero((pairs[:, 2] != 0) & (pairs[:, 2] != 1))
    if bad.size:
        i = bad[0]
        raise FembError(f"{pair_path}:{pair_lines[i]}: label {pairs[i, 2]} is not 0 or 1")

    one_n: dict[str, np.ndarray | None] = {}
    gallery_paths = [meta_file(f"1N_gallery_{g}.csv", required=False) for g in GALLERIES[name]]
    probe_path = meta_file("1N_probe_mixed.csv", required=False)
    if all(p is not None for p in (*gallery_paths, probe_path)):
        parts = [_read_subject_csv(p, known) for p in gallery_paths]  # type: ignore[arg-type]
        probe = _read_subject_csv(probe_path, known)  # type: ignore[arg-type]
        one_n = {
            "gallery_templates": np.concatenate([t for t, _ in parts]),
            "gallery_subjects": np.concatenate([s for _, s in parts]),
            "probe_templates": probe[0],
            "probe_subjects": probe[1],
        }
    return IJBDataset(
        name=name,
        root=root,
        images=tuple(pts_names),
        landmarks=values[:, :10].astype(np.float32).reshape(-1, 5, 2),
        faceness=values[:, 10].astype(np.float32),
        templates=templates,
        medias=medias,
        pair_t1=pairs[:, 0],
        pair_t2=pairs[:, 1],
        pair_labels=pairs[:, 2],
        **one_n,
    )


def _release_name(meta: Path, name: str | None) -> str:
    if name is not None:
        if name.upper() not in NAMES:
            raise FembError(f"name must be one of {', '.join(NAMES)}, got {name!r}")
        return name.upper()
    found = sorted(
        {
            p.name.split("_", 1)[0].upper()
            for p in meta.iterdir()
            if p.name.endswith(_REQUIRED) and p.name.split("_", 1)[0].upper() in NAMES
        }
    )
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise FembError(
            f"{meta}: {what} IJB release found (expected ijbb_* or ijbc_* meta files: "
            f"{', '.join(_REQUIRED)}); pass name='IJBB' or 'IJBC'"
        )
    return found[0]


def _read_named_rows(
    path: Path, fields: int, kind: type, layout: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Lines `name v1 ... v<fields>` (blank lines skipped): names, 1-based line numbers, values (n, fields)."""
    text = _read_text(path)
    names: list[str] = []
    numbers: list[int] = []
    tokens: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < fields + 1:
            raise FembError(
                f"{path}:{number}: expected 'image {layout}' ({fields + 1} fields), found {len(parts)}"
            )
        names.append(parts[0])
        numbers.append(number)
        tokens.extend(parts[1 : fields + 1])
    if not names:
        raise FembError(f"{path}: holds no rows")
    dtype = np.float64 if kind is float else np.int64
    try:
        values = np.array(tokens, dtype=dtype) if kind is float else np.array(tokens).astype(np.int64)
    except (ValueError, OverflowError):
        values = None
    if values is None or (kind is float and not np.isfinite(values).all()):
        what = "a finite number" if kind is float else "a whole number"
        for row, number in enumerate(numbers):
            for token in tokens[row * fields : (row + 1) * fields]:
                if not _parses(token, kind):
                    raise FembError(f"{path}:{number}: {token!r} is not {what} ('image {layout}')")
        raise AssertionError("a token failed to convert but each one parses")  # pragma: no cover
    return names, np.asarray(numbers), values.reshape(-1, fields)


def _parses(token: str, kind: type) -> bool:
    try:
        value = kind(token)
    except (ValueError, OverflowError):
        return False
    return kind is not float or math.isfinite(value)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise FembError(f"{path}:{line}: not UTF-8 text") from None


def _match_names(
    pts_path: Path,
    pts_names: list[str],
    pts_lines: np.ndarray,
    tid_path: Path,
    tid_names: list[str],
    tid_lines: np.ndarray,
) -> np.ndarray:
    """For each row of the landmark file, the row of the template file with the same image name."""
    for path, names, lines in ((pts_path, pts_names, pts_lines), (tid_path, tid_names, tid_lines)):
        seen: dict[str, int] = {}
        for name, line in zip(names, lines):
            if name in seen:
                raise FembError(f"{path}:{line}: image {name} is listed twice (first on line {seen[name]})")
            seen[name] = int(line)
    where = {name: row for row, name in enumerate(tid_names)}
    order = np.empty(len(pts_names), dtype=np.int64)
    for row, name in enumerate(pts_names):
        found = where.pop(name, None)
        if found is None:
            raise FembError(f"{pts_path}:{pts_lines[row]}: image {name} has no row in {tid_path.name}")
        order[row] = found
    if where:
        name, row = next(iter(where.items()))
        raise FembError(f"{tid_path}:{tid_lines[row]}: image {name} has no row in {pts_path.name}")
    return order


def _check_images_exist(crops: Path, path: Path, names: list[str], lines: np.ndarray) -> None:
    try:
        present = {entry.name for entry in os.scandir(crops)}
    except FileNotFoundError:
        raise FembError(f"{crops}: no such directory (the IJB face crops)") from None
    for name, line in zip(names, lines):
        if name not in present and not (os.sep in name and (crops / name).is_file()):
            raise FembError(f"{path}:{line}: image {name} is not in {crops}")


def _check_known(path: Path, lines: np.ndarray, templates: np.ndarray, known: np.ndarray) -> None:
    """FembError naming the first line whose template no image belongs to."""
    where = np.minimum(np.searchsorted(known, templates), len(known) - 1)
    bad = np.flatnonzero(known[where] != templates)
    if bad.size:
        i = bad[0]
        raise FembError(f"{path}:{lines[i]}: template {templates[i]} has no image in the face_tid_mid file")


def _read_int_table(path: Path, columns: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """A text file of whole numbers, `columns` per line (blank lines skipped): (n, columns) int64, line numbers.

    Parsed with numpy on the bytes, a piece of the file at a time: no Python work per line.
    """
    data = np.fromfile(path, dtype=np.uint8)
    rows: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    start, first_line = 0, 1
    while start < len(data):
        stop = min(start + _PAIR_CHUNK_BYTES, len(data))
        if stop < len(data):
            newline = np.flatnonzero(data[stop:] == 10)
            stop = stop + int(newline[0]) + 1 if newline.size else len(data)
        piece_rows, piece_lines, line_count = _parse_int_piece(
            data[start:stop], path, columns, layout, first_line
        )
        rows.append(piece_rows)
        numbers.append(piece_lines)
        start, first_line = stop, first_line + line_count
    table = np.concatenate(rows) if rows else np.empty((0, columns), dtype=np.int64)
    if not len(table):
        raise FembError(f"{path}: holds no rows")
    return table, np.concatenate(numbers)


def _parse_int_piece(
    piece: np.ndarray, path: Path, columns: int, layout: str, first_line: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of one piece of whole lines, their line numbers, and the number of lines it holds."""
    digit = (piece >= 48) & (piece <= 57)
    newline = piece == 10
    blank = (piece == 32) | (piece == 9) | (piece == 13)
    ends_at = np.flatnonzero(newline)
    line_count = len(ends_at) + (0 if len(piece) and piece[-1] == 10 else 1)

    def line_of(position: np.ndarray | int) -> np.ndarray:
        return np.searchsorted(ends_at, position)  # 0-based line within the piece

    other = np.flatnonzero(~(digit | newline | blank))
    if other.size:
        line = int(line_of(other[0]))
        lo = ends_at[line - 1] + 1 if line else 0
        hi = ends_at[line] if line < len(ends_at) else len(piece)
        text = piece[lo:hi].tobytes().decode("utf-8", "replace").strip()
        raise FembError(f"{path}:{first_line + line}: {text!r} is not {columns} whole numbers ('{layout}')")
    previous = np.r_[False, digit[:-1]]
    following = np.r_[digit[1:], False]
    starts = np.flatnonzero(digit & ~previous)
    stops = np.flatnonzero(digit & ~following)  # last digit of each number
    per_line = np.bincount(line_of(starts), minlength=line_count)
    wrong = np.flatnonzero((per_line != 0) & (per_line != columns))
    if wrong.size:
        line = int(wrong[0])
        raise FembError(
            f"{path}:{first_line + line}: expected '{layout}' ({columns} fields), found {per_line[line]}"
        )
    long = np.flatnonzero(stops - starts + 1 > _MAX_DIGITS)
    if long.size:
        raise FembError(f"{path}:{first_line + int(line_of(starts[long[0]]))}: a number has too many digits")
    positions = np.flatnonzero(digit)
    token = np.cumsum(digit[positions] & ~previous[positions]) - 1
    weights = (piece[positions] - 48) * 10.0 ** (stops[token] - positions)
    values = np.bincount(token, weights=weights, minlength=len(starts)).astype(np.int64)
    lines = np.flatnonzero(per_line) + first_line
    return values.reshape(-1, columns), lines, line_count


def _read_subject_csv(path: Path, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two columns (template id, subject id) of a 1:N csv with a header row."""
    templates: list[int] = []
    subjects: list[int] = []
    lines: list[int] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            if reader.line_num == 1 or not any(field.strip() for field in row):
                continue
            if len(row) < 2:
                raise FembError(
                    f"{path}:{reader.line_num}: expected 'template,subject,...' (2 or more fields), found {len(row)}"
                )
            try:
                templates.append(int(row[0]))
                subjects.append(int(row[1]))
            except ValueError:
                raise FembError(
                    f"{path}:{reader.line_num}: template and subject ids must be whole numbers, got {row[:2]}"
                ) from None
            lines.append(reader.line_num)
    if not templates:
        raise FembError(f"{path}: holds no rows below its header")
    template_ids = np.asarray(templates, dtype=np.int64)
    _check_known(path, np.asarray(lines), template_ids, known)
    return template_ids, np.asarray(subjects, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- features


def ijb_fingerprint(dataset: IJBDataset) -> str:
    """sha256 of the landmark and template meta files and of every crop's name and size (no pixels read)."""
    digest = hashlib.sha256(dataset.name.encode())
    for array in (dataset.landmarks, dataset.faceness, dataset.templates, dataset.medias):
        digest.update(np.ascontiguousarray(array).tobytes())
    for path in dataset.image_paths():
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()


def weights_fingerprint(model_or_weights: nn.Module | Path | str) -> str:
    """sha256 of a weights file's bytes, or of a module's state dict (names, shapes, values)."""
    digest = hashlib.sha256()
    if isinstance(model_or_weights, OnnxBackbone):
        model_or_weights = model_or_weights.path
    if isinstance(model_or_weights, nn.Module):
        for key, tensor in model_or_weights.state_dict().items():
            digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
    return file_sha256(model_or_weights)


def load_aligned_crop(path: Path, landmarks: np.ndarray) -> np.ndarray:
    """One loose crop read as eval_ijbc.py does (cv2.imread), aligned by its landmarks: 112 x 112 x 3 RGB."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FembError(f"{path}: cannot read image")
    return norm_crop(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), landmarks, name=str(path))


def embed_ijb(
    model_or_weights: nn.Module | Path | str,
    dataset: IJBDataset,
    batch_size: int = 128,
    device: str | None = None,
    progress: bool | None = None,
    *,
    cache_dir: Path | str | None = None,
) -> np.ndarray:
    """Float32 (N, D) image features: emb(crop) + emb(mirror) of each aligned crop (mode F1), in row order.

    `model_or_weights` is a backbone or any weights file `femb.weights.load_backbone` reads. With
    `cache_dir`, the features are kept as `<name>-<weights sha256[:16]>-<data sha256[:16]>.npy`
    there and read back on the next call with the same weights and release.
    """
    check_batch_size(batch_size)
    cache = None
    if cache_dir is not None:
        key = f"{dataset.name.lower()}-{weights_fingerprint(model_or_weights)[:16]}-{ijb_fingerprint(dataset)[:16]}"
        cache = Path(cache_dir) / f"{key}.npy"
        if cache.is_file():
            features = np.load(cache)
            if features.shape[0] == len(dataset.images):
                return features
    model = model_or_weights if isinstance(model_or_weights, nn.Module) else load_backbone(model_or_weights)
    if not isinstance(model, OnnxBackbone) and device is not None:
        model = model.to(resolve_device(device))
    pool = ThreadPoolExecutor(max_workers=min(_READ_THREADS, os.cpu_count() or 1))
    try:
        batches = _aligned_batches(pool, dataset, batch_size)
        plain, flipped = embed_batches(
            model,
            batches,
            batch_size,
            mirrored=True,
            total=len(dataset.images),
            desc="ijb",
            progress=progress,
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    assert flipped is not None
    plain += flipped
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.save(f, plain)
    return plain


def _aligned_batches(
    pool: ThreadPoolExecutor, dataset: IJBDataset, batch_size: int
) -> Iterator[torch.Tensor]:
    """uint8 N x 3 x 112 x 112 batches of aligned crops, aligning the next batch while one is embedded."""
    paths = dataset.image_paths()
    starts = range(0, len(paths), batch_size)

    def submit(start: int) -> list:
        stop = min(start + batch_size, len(paths))
        return [pool.submit(load_aligned_crop, paths[i], dataset.landmarks[i]) for i in range(start, stop)]

    pending = submit(0)
    for start in starts:
        pixels = np.stack([future.result() for future in pending])
        if start + batch_size < len(paths):
            pending = submit(start + batch_size)
        yield torch.from_numpy(pixels).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- pooling


def template_features(
    features: np.ndarray,
    faceness: np.ndarray | None,
    templates: np.ndarray,
    medias: np.ndarray,
    *,
    normalize_images: bool = False,
    use_faceness: bool = True,
    choose: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids, their L2-normalised float64 features), eval_ijbc.py `image2template_feature`.

    Image features (L2-normalised first with `normalize_images`, times `faceness` with `use_faceness`)
    are averaged within each (template, media) and the media means summed per template. With `choose`
    (template ids), only those templates are pooled (ijb_1n.py's `choose_templates`).
    """
    features = np.asarray(features)
    templates = np.asarray(templates, dtype=np.int64)
    medias = np.asarray(medias, dtype=np.int64)
    n = features.shape[0] if features.ndim == 2 else -1
    if features.ndim != 2 or templates.shape != (n,) or medias.shape != (n,) or n == 0:
        raise FembError(
            f"features must be (N, D) with N templates and medias, got {features.shape}, "
            f"{templates.shape} and {medias.shape}"
        )
    if use_faceness:
        faceness = np.asarray(faceness)
        if faceness.shape != (n,):
            raise FembError(f"faceness: expected shape ({n},), got {faceness.shape}")
    rows = (
        np.arange(n) if choose is None else np.flatnonzero(np.isin(templates, np.asarray(choose, np.int64)))
    )
    unique, template_of = np.unique(templates[rows], return_inverse=True)
    _, media_of = np.unique(np.stack([templates[rows], medias[rows]]), axis=1, return_inverse=True)
    media_size = np.bincount(media_of.reshape(-1))
    # Each image's weight in its template's sum of media means: faceness / (images in its media).
    weight = 1.0 / media_size[media_of.reshape(-1)]
    if use_faceness:
        weight = weight * np.asarray(faceness, np.float64)[rows]
    if normalize_images:  # float32 norms of float32 features, as the official computes them
        for start in range(0, len(rows), 65536):
            block = features[rows[start : start + 65536]]
            weight[start : start + 65536] /= np.sqrt(np.sum(block**2, -1))
    pooling = scipy.sparse.csr_matrix(
        (weight, (template_of.reshape(-1), np.arange(len(rows)))), shape=(len(unique), len(rows))
    )
    pooled = np.empty((len(unique), features.shape[1]), dtype=np.float64)
    for column in range(0, features.shape[1], _POOL_COLUMNS):
        block = (
            features[rows, column : column + _POOL_COLUMNS]
            if choose is not None
            else features[:, column : column + _POOL_COLUMNS]
        )
        pooled[:, column : column + _POOL_COLUMNS] = pooling @ block.astype(np.float64)
    norms = np.sqrt(np.sum(pooled**2, -1, keepdims=True))
    pooled /= np.where(norms > 0, norms, 1.0)  # sklearn.preprocessing.normalize leaves zero rows zero
    return unique, pooled


# ---------------------------------------------------------------------------------------------- 1:1


def pair_scores(
    unique_templates: np.ndarray, template_feats: np.ndarray, t1: np.ndarray, t2: np.ndarray
) -> np.ndarray:
    """Cosine of each pair's two template features (float64), from BLAS products of template blocks.

    A pair and its reverse, and repeated pairs, get bit-identical scores (one matrix entry each).
    """
    index1 = _template_index(unique_templates, t1, "t1")
    index2 = _template_index(unique_templates, t2, "t2")
    low, high = np.minimum(index1, index2), np.maximum(index1, index2)
    blocks = low // _BLOCK_ROWS
    # Pairs grouped by row block (their order within a block does not matter): a radix sort on 16 bits.
    order = np.argsort(
        blocks.astype(np.uint16) if len(unique_templates) < 65536 * _BLOCK_ROWS else blocks, kind="stable"
    )
    low, high = low[order], high[order]
    scores = np.empty(len(order), dtype=np.float64)
    bounds = np.searchsorted(blocks[order], np.arange(len(unique_templates) // _BLOCK_ROWS + 2))
    for block, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if lo == hi:
            continue
        row0 = block * _BLOCK_ROWS
        partners = high[lo:hi]
        first = int(partners.min())
        seen = np.zeros(int(partners.max()) + 1 - first, dtype=bool)
        seen[partners - first] = True
        rows = template_feats[row0 : row0 + _BLOCK_ROWS]
        if 2 * np.count_nonzero(seen) >= len(seen):  # dense enough: multiply the whole column range
            products = rows @ template_feats[first : first + len(seen)].T
            picked = products[low[lo:hi] - row0, partners - first]
        else:  # only the partner columns, numbered by a running count of the seen ones
            products = rows @ template_feats[first + np.flatnonzero(seen)].T
            picked = products[low[lo:hi] - row0, np.cumsum(seen)[partners - first] - 1]
        scores[order[lo:hi]] = picked
    return scores


def _template_index(unique_templates: np.ndarray, ids: np.ndarray, name: str) -> np.ndarray:
    """Row of each id in the sorted `unique_templates`: a lookup table when ids are small, else a search."""
    ids = np.asarray(ids, dtype=np.int64)
    low, high = int(unique_templates[0]), int(unique_templates[-1])
    if high - low < 64 * len(unique_templates) + (1 << 20):
        table = np.full(high - low + 2, -1, dtype=np.int64)  # the last slot answers every id out of range
        table[unique_templates - low] = np.arange(len(unique_templates))
        offset = ids - low
        offset[(offset < 0) | (offset > high - low)] = high - low + 1
        where = table[offset]
        bad = np.flatnonzero(where < 0)
    else:
        where = np.minimum(np.searchsorted(unique_templates, ids), len(unique_templates) - 1)
        bad = np.flatnonzero(unique_templates[where] != ids)
    if bad.size:
        raise FembError(f"{name}: pair {bad[0]} names template {ids[bad[0]]}, which has no image")
    return where


def evaluate_1v1(
    features: np.ndarray,
    faceness: np.ndarray | None,
    templates: np.ndarray,
    medias: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    labels: np.ndarray,
    *,
    normalize_images: bool = False,
    use_faceness: bool = True,
    fars: Sequence[float] = FAR_TARGETS,
) -> dict[str, Any]:
    """IJB 1:1 verification of image features, as arcface_torch eval_ijbc.py computes it.

    Returns `tar_at_far` (official nearest-point rule), `tar_at_far_interpolated` (linear on the
    ROC), `threshold_at_far` (the official point's score threshold; None where it accepts nothing),
    `auc`, `pairs`, `genuine`, and the arrays `scores` (per pair), `fpr`, `tpr`, `thresholds` (sklearn).
    """
    from sklearn.metrics import auc, roc_curve

    labels = np.asarray(labels)
    if labels.shape != np.shape(t1) or labels.shape != np.shape(t2) or labels.ndim != 1 or not len(labels):
        raise FembError(
            f"t1, t2 and labels must be 1-D of one length, got {np.shape(t1)}, {np.shape(t2)}, {labels.shape}"
        )
    if not np.isin(labels, (0, 1)).all() or labels.min() == labels.max():
        raise FembError("labels must be 0 or 1, with at least one of each")
    unique, feats = template_features(
        features, faceness, templates, medias, normalize_images=normalize_images, use_faceness=use_faceness
    )
    scores = pair_scores(unique, feats, t1, t2)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    flipped_fpr, flipped_tpr, flipped_thr = fpr[::-1], tpr[::-1], thresholds[::-1]
    tar: dict[str, float] = {}
    tar_interp: dict[str, float] = {}
    threshold: dict[str, float | None] = {}
    for far in fars:
        index = int(np.argmin(np.abs(flipped_fpr - far)))  # first of equally near points, as min() picks
        tar[far_key(far)] = float(flipped_tpr[index])
        value = float(flipped_thr[index])
        threshold[far_key(far)] = value if math.isfinite(value) else None
        tar_interp[far_key(far)] = _interpolated_tpr(fpr, tpr, far)
    return {
        "tar_at_far": tar,
        "tar_at_far_interpolated": tar_interp,
        "threshold_at_far": threshold,
        "auc": float(auc(fpr, tpr)),
        "pairs": int(len(labels)),
        "genuine": int(labels.sum()),
        "scores": scores,
        "fpr": fpr,
        "tpr": tpr,
        "thresholds": thresholds,
    }


def _interpolated_tpr(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """TPR at FPR `far` on the ROC polyline; on a vertical step at exactly `far`, its top."""
    right = int(np.searchsorted(fpr, far, side="right"))
    if right == len(fpr):
        return float(tpr[-1])
    left = right - 1
    if left < 0:
        return float(tpr[0])
    if fpr[left] == far:
        return float(tpr[left])
    weight = (far - fpr[left]) / (fpr[right] - fpr[left])
    return float(tpr[left] + weight * (tpr[right] - tpr[left]))


# ---------------------------------------------------------------------------------------------- 1:N


def subject_templates(templates: np.ndarray, subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique template ids and each one's subject (of its first row), as ijb_1n.py takes them."""
    unique, first = np.unique(np.asarray(templates, dtype=np.int64), return_index=True)
    return unique, np.asarray(subjects, dtype=np.int64)[first]


def evaluate_1vn(
    gallery_features: np.ndarray,
    gallery_subjects: np.ndarray,
    probe_features: np.ndarray,
    probe_subjects: np.ndarray,
    *,
    fpirs: Sequence[float] = FPIR_TARGETS,
    ranks: Sequence[int] = RANKS,
) -> dict[str, Any]:
    """IJB 1:N identification of L2-normalised template features, as InsightFace ijb_1n.py computes it.

    Every probe subject must have exactly one gallery template (else a FembError naming it). Returns
    `rank_<k>` identification rates, `tpir_at_fpir` and `threshold_at_fpir` (keyed like TAR@FAR),
    `probes` and `gallery`.
    """
    gallery = np.asarray(gallery_features, dtype=np.float64)
    probes = np.asarray(probe_features, dtype=np.float64)
    gallery_subjects = np.asarray(gallery_subjects, dtype=np.int64)
    probe_subjects = np.asarray(probe_subjects, dtype=np.int64)
    if gallery.ndim != 2 or probes.ndim != 2 or gallery.shape[1] != probes.shape[1]:
        raise FembError(
            f"gallery and probe features must be (N, D) of one D, got {gallery.shape} and {probes.shape}"
        )
    if gallery_subjects.shape != (len(gallery),) or probe_subjects.shape != (len(probes),) or not len(probes):
        raise FembError("one subject per gallery and per probe template is needed")
    mated = _mated_gallery(gallery_subjects, probe_subjects)
    queries = len(probes)
    wanted = [math.ceil(queries * f) for f in fpirs]  # the official `required_topk`
    keep = max(wanted)
    if keep > queries * (len(gallery) - 1):
        raise FembError(
            f"{queries} probes against {len(gallery)} gallery templates give too few non-mated scores for FPIR {max(fpirs)}"
        )
    positive = np.empty(queries)
    rank = np.empty(queries, dtype=np.int64)
    top_negative = np.empty(0)
    columns = np.arange(len(gallery))
    for start in range(0, queries, _PROBE_ROWS):
        stop = min(start + _PROBE_ROWS, queries)
        sims = probes[start:stop] @ gallery.T
        rows = np.arange(stop - start)
        gt = mated[start:stop]
        pos = sims[rows, gt]
        positive[start:stop] = pos
        above = (sims > pos[:, None]) | ((sims == pos[:, None]) & (columns < gt[:, None]))
        rank[start:stop] = above.sum(axis=1)
        sims[rows, gt] = -np.inf
        negatives = np.concatenate([top_negative, sims[np.isfinite(sims)]])
        if len(negatives) > keep:
            negatives = np.partition(negatives, len(negatives) - keep)[-keep:]
        top_negative = negatives
    descending = np.sort(top_negative)[::-1]
    result: dict[str, Any] = {f"rank_{k}": float(np.mean(rank < k)) for k in ranks}
    result["tpir_at_fpir"] = {}
    result["threshold_at_fpir"] = {}
    for fpir, position in zip(fpirs, wanted):
        threshold = descending[position - 1]
        result["tpir_at_fpir"][far_key(fpir)] = float(np.sum(positive > threshold) / queries)
        result["threshold_at_fpir"][far_key(fpir)] = float(threshold)
    result["probes"] = int(queries)
    result["gallery"] = int(len(gallery))
    return result


def _mated_gallery(gallery_subjects: np.ndarray, probe_subjects: np.ndarray) -> np.ndarray:
    """Each probe's gallery position, ijb_1n.py's `gen_mask`: its subject must be there exactly once."""
    subjects, first, counts = np.unique(gallery_subjects, return_index=True, return_counts=True)
    where = np.minimum(np.searchsorted(subjects, probe_subjects), len(subjects) - 1)
    found = subjects[where] == probe_subjects
    bad = np.flatnonzero(~found | (counts[where] != 1))
    if bad.size:
        subject = int(probe_subjects[bad[0]])
        count = int(counts[where[bad[0]]]) if found[bad[0]] else 0
        raise FembError(
            f"probe subject {subject} has {count} gallery templates; IJB 1:N needs exactly one per probe subject"
        )
    return first[where]


# ---------------------------------------------------------------------------------------------- both


def evaluate_ijb(
    dataset: IJBDataset,
    features: np.ndarray,
    *,
    normalize_images: bool = False,
    use_faceness: bool = True,
    arrays: bool = False,
) -> dict[str, Any]:
    """1:1 (and 1:N when the release has its files) metrics of a release's image features, JSON-ready.

    The per-pair arrays (`scores`, `fpr`, `tpr`, `thresholds` of `evaluate_1v1`) are left out of `1v1`
    unless `arrays`, which keeps them (numpy, not JSON) for plots and quality curves.
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != len(dataset.images):
        raise FembError(
            f"features: expected one row per image ({len(dataset.images)}), got shape {features.shape}"
        )
    one = evaluate_1v1(
        features,
        dataset.faceness,
        dataset.templates,
        dataset.medias,
        dataset.pair_t1,
        dataset.pair_t2,
        dataset.pair_labels,
        normalize_images=normalize_images,
        use_faceness=use_faceness,
    )
    result: dict[str, Any] = {
        "name": dataset.name,
        "1v1": one if arrays else {k: v for k, v in one.items() if not isinstance(v, np.ndarray)},
    }
    if dataset.has_1vn:
        pooled = {}
        for side, templates, subjects in (
            ("gallery", dataset.gallery_templates, dataset.gallery_subjects),
            ("probe", dataset.probe_templates, dataset.probe_subjects),
        ):
            ids, subject_ids = subject_templates(templates, subjects)
            unique, feats = template_features(
                features,
                dataset.faceness,
                dataset.templates,
                dataset.medias,
                normalize_images=normalize_images,
                use_faceness=use_faceness,
                choose=ids,
            )
            assert np.array_equal(unique, ids)  # read_ijb checked every id has images
            pooled[side] = (feats, subject_ids)
        result["1vn"] = evaluate_1vn(*pooled["gallery"], *pooled["probe"])
    return result
