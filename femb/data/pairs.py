"""Verification pair lists (LFW `pairs.txt`, or a `left,right,is_same` CSV) -> a pair set `<name>.parquet`.

Two layouts are read (docs/architecture.md "Pair lists"), told apart by their first line:

- **LFW** `pairs.txt`: a header `folds pairs` (`10\t300`; a single number, as `pairsDevTrain.txt`
  has, is one fold), then per fold `pairs` same-person lines `name i j` and `pairs` different-person
  lines `name1 i name2 j`, tab or space separated; image `i` of `name` is `name/name_%04d.jpg`.
- **CSV** with a header row naming the columns `left`, `right` and `is_same` (1/0, true/false, yes/no,
  in any letter case), paths relative to the root.

The pair set keeps the list's order, so `femb evaluate`'s 10 folds over file order are LFW's own folds
for a 10 x 300 `pairs.txt`. The list, every image's existence and its landmark row are checked before
anything is written; then each distinct image is read and prepared once (`images.prepare_image`:
kept when an aligned JPEG, else decoded, aligned with its landmarks and encoded), on processes, and
the table written atomically with its plan in the footer (`parquet.write_parquet`).

`femb convert SRC OUT --pairs FILE` adds `OUT/<stem>.parquet` through `plan_pair_list` and
`write_pair_list`; `femb pairs FILE OUT.parquet` is `convert_pairs`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from femb.data import layout
from femb.data.image_shards import CHUNK_IMAGES, Chunk, inline_seconds, prepare_chunk
from femb.data.images import BadImage, ImageOptions
from femb.data.landmarks import Landmarks, read_landmarks
from femb.data.parquet import ROW_GROUP_ROWS, row_group_bounds, write_parquet
from femb.errors import FembError
from femb.parallel import progress_bar, run_tasks

CSV_COLUMNS = ("left", "right", "is_same")
_TRUTH = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_NUMBER = re.compile(r"[0-9]+")  # ASCII digits only: int() would also take "+3", "1_0" and other scripts


@dataclass(frozen=True)
class Pair:
    """One pair of a list: the two images' paths under the root, is_same, and the list line it came from."""

    left: str
    right: str
    is_same: bool
    line: int


@dataclass
class PairListTask:
    """One pair list -> OUT/<file>: its distinct images (prepared once each) and the pairs as indices into them."""

    file: str
    out_dir: str
    root: str
    images: list[tuple[str, str, np.ndarray | None]]  # (relative name, error name, landmarks or None)
    left: list[int]
    right: list[int]
    is_same: list[bool]
    options: ImageOptions
    meta: dict  # the footer's entry, also how `femb convert` recognises a finished file


# ---------------------------------------------------------------- reading a list


def read_pair_list(path: Path) -> list[tuple[str, str, bool]]:
    """The (left, right, is_same) of every pair of an LFW pairs.txt or a CSV, paths relative, in file order.

    Any malformed line is a FembError naming the file and line.
    """
    pairs, _ = _read_pairs(Path(path))
    return [(p.left, p.right, p.is_same) for p in pairs]


def _read_pairs(path: Path) -> tuple[list[Pair], int | None]:
    """The pairs of a list and its fold count (None for a CSV), the layout told by the first line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise FembError(f"{path}: cannot read the pair list ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise FembError(f"{path}: the pair list is not UTF-8 text") from None
    lines = text.splitlines()
    first = next(((n, s) for n, s in enumerate(lines, start=1) if s.strip()), None)
    if first is None:
        raise FembError(f"{path}: the pair list is empty")
    number, header = first
    if "," in header:
        pairs, folds = _read_csv(path, text), None
    elif all(_NUMBER.fullmatch(field) for field in header.split()):
        pairs, folds = _read_lfw(path, lines)
    else:
        raise FembError(
            f"{path}:{number}: not a pair list: expected an LFW header `folds pairs` (e.g. `10 300`) or a "
            f"CSV header `left,right,is_same`, got {header.strip()!r}"
        )
    if not pairs:
        raise FembError(f"{path}: the pair list names no pair")
    return pairs, folds


def _read_lfw(path: Path, lines: list[str]) -> tuple[list[Pair], int]:
    """The pairs of an LFW pairs.txt: `folds pairs` header, then per fold the same and the different pairs."""
    rows = [(n, s.split()) for n, s in enumerate(lines, start=1) if s.strip()]
    header_line, header = rows[0]
    if len(header) not in (1, 2):
        raise FembError(
            f"{path}:{header_line}: the LFW header must be `folds pairs` or `pairs`, got {len(header)} numbers"
        )
    folds, per_fold = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    if folds < 1 or per_fold < 1:
        raise FembError(f"{path}:{header_line}: the LFW header's folds and pairs must be at least 1")
    expected = folds * 2 * per_fold
    announced = f"the header (line {header_line}) announces {folds} fold(s) x ({per_fold} same + {per_fold} different)"
    body = rows[1:]
    pairs = []
    for k, (number, fields) in enumerate(body):
        if k >= expected:
            raise FembError(f"{path}:{number}: one line too many: {announced} = {expected} pair lines")
        fold, within = divmod(k, 2 * per_fold)
        same = within < per_fold
        want, shape = (3, "name i j") if same else (4, "name1 i name2 j")
        if len(fields) != want:
            kind = "same-person" if same else "different-person"
            hint = f"; {announced}, do the counts match the file?" if len(fields) in (3, 4) else ""
            raise FembError(
                f"{path}:{number}: expected a {kind} pair `{shape}` (fold {fold + 1}, pair "
                f"{within % per_fold + 1} of {per_fold}), got {len(fields)} fields{hint}"
            )
        if same:
            name, i, j = fields
            pairs.append(
                Pair(_lfw_image(name, i, path, number), _lfw_image(name, j, path, number), True, number)
            )
        else:
            name1, i, name2, j = fields
            pairs.append(
                Pair(_lfw_image(name1, i, path, number), _lfw_image(name2, j, path, number), False, number)
            )
    if len(body) < expected:
        last = body[-1][0] if body else header_line
        raise FembError(
            f"{path}:{last}: the file ends after {len(body)} pair lines, but {announced} = {expected}"
        )
    return pairs, folds


def _lfw_image(name: str, index: str, path: Path, line: int) -> str:
    """LFW's name for image `index` of `name`: `name/name_%04d.jpg`."""
    if not _NUMBER.fullmatch(index):
        raise FembError(f"{path}:{line}: the image index {index!r} of {name} is not a whole number")
    if int(index) < 1:
        raise FembError(
            f"{path}:{line}: the image index {index} of {name} is not at least 1 (LFW counts from 1)"
        )
    return f"{name}/{name}_{int(index):04d}.jpg"


def _read_csv(path: Path, text: str) -> list[Pair]:
    """The pairs of a CSV whose header row names left, right and is_same (any order, other columns ignored)."""
    reader = csv.reader(io.StringIO(text))
    columns: dict[str, int] | None = None
    width = 0
    pairs = []
    try:
        for row in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if columns is None:
                names = [cell.strip().lower() for cell in row]
                missing = [c for c in CSV_COLUMNS if c not in names]
                if missing:
                    raise FembError(
                        f"{path}:{number}: the CSV header lacks the column(s) {', '.join(missing)} "
                        f"(expected `left,right,is_same`)"
                    )
                columns, width = {c: names.index(c) for c in CSV_COLUMNS}, len(row)
                continue
            if len(row) != width:
                raise FembError(f"{path}:{number}: expected {width} fields as the header has, got {len(row)}")
            left, right, same = (row[columns[c]].strip() for c in CSV_COLUMNS)
            if not left or not right:
                raise FembError(f"{path}:{number}: an empty {'left' if not left else 'right'} image path")
            if same.lower() not in _TRUTH:
                raise FembError(f"{path}:{number}: is_same {same!r} is not one of 1/0, true/false, yes/no")
            pairs.append(Pair(_relative(left), _relative(right), _TRUTH[same.lower()], number))
    except csv.Error as err:
        raise FembError(f"{path}:{reader.line_num}: not readable as CSV ({err})") from None
    return pairs


def _relative(name: str) -> str:
    return name.replace("\\", "/")


# ---------------------------------------------------------------- plan, write


def plan_pair_list(
    path: Path,
    out_dir: Path,
    fingerprint: str,
    root: Path,
    landmarks: Landmarks | None,
    options: ImageOptions,
) -> PairListTask:
    """The pair set OUT/<stem>.parquet of a pair list, after checking the list, every image and its landmarks.

    Nothing is written: a malformed line, a missing image or (with `landmarks`) an image without a
    landmark row is a FembError naming the list's line, the image and the landmarks file.
    """
    path = Path(path)
    return _plan(
        path, Path(out_dir) / layout.pair_set_name(path.stem), fingerprint, Path(root), landmarks, options
    )


def _plan(
    path: Path,
    target: Path,
    fingerprint: str,
    root: Path,
    landmarks: Landmarks | None,
    options: ImageOptions,
) -> PairListTask:
    if target.stem.startswith("train-"):  # the loader globs train-*.parquet
        raise FembError(
            f"{path}: a pair set named {target.name} would read as a train shard beside the shards; rename it"
        )
    if not root.is_dir():
        raise FembError(f"root {root}: no such directory (the pair list's image paths are relative to it)")
    pairs, folds = _read_pairs(path)
    index: dict[str, int] = {}
    images: list[tuple[str, str, np.ndarray | None]] = []
    for pair in pairs:
        for name in (pair.left, pair.right):
            if name in index:
                continue
            where = f"{path}:{pair.line}: {root / name}"
            if not (root / name).is_file():
                raise BadImage(f"{where}: no such image file")
            points = None
            if landmarks is not None:
                points = landmarks.lookup(name)
                if points is None:
                    raise BadImage(f"{where}: no row for {name} in the landmarks file {landmarks.path}")
            index[name] = len(images)
            images.append((name, where, points))
    meta = {
        "format": layout.FORMAT,
        "fingerprint": fingerprint,
        "file": target.name,
        "source": path.name,
        "pairs": len(pairs),
        "images": len(images),
        "folds": folds,
        "image_size": options.image_size,
        "jpeg_quality": options.jpeg_quality,
        "lossless": options.lossless,
        "landmarks": landmarks.sha256 if landmarks is not None else None,
    }
    return PairListTask(
        file=target.name,
        out_dir=str(target.parent),
        root=str(root),
        images=images,
        left=[index[p.left] for p in pairs],
        right=[index[p.right] for p in pairs],
        is_same=[p.is_same for p in pairs],
        options=options,
        meta=meta,
    )


def write_pair_list(task: PairListTask, workers: int, bar: tqdm) -> dict[str, Any]:
    """Prepare each distinct image once on `workers` processes (`bar` counts images), then write the pairs in order.

    Returns the file's name, bytes and sha256 (`write_parquet`) and its number of pairs.
    """
    chunks = [
        Chunk(task.root, task.images[start : start + CHUNK_IMAGES], task.options, False, False)
        for start in range(0, len(task.images), CHUNK_IMAGES)
    ]
    prepared: list[bytes] = []
    inline = inline_seconds(chunks)
    for images, _ in run_tasks(prepare_chunk, chunks, workers, bar, processes=True, inline_below=inline):
        prepared += images  # type: ignore[arg-type]  # never None: skip_bad is off
    left = [prepared[i] for i in task.left]
    right = [prepared[i] for i in task.right]
    lengths = np.array([len(a) + len(b) for a, b in zip(left, right)], dtype=np.int64)
    bounds = row_group_bounds(lengths, ROW_GROUP_ROWS)

    def write(writer: pq.ParquetWriter) -> None:
        for start, stop in zip(bounds[:-1], bounds[1:]):
            table = pa.Table.from_arrays(
                [
                    pa.array(left[start:stop], pa.binary()),
                    pa.array(right[start:stop], pa.binary()),
                    pa.array(task.is_same[start:stop], pa.bool_()),
                ],
                schema=layout.PAIR_SCHEMA,
            )
            writer.write_table(table, row_group_size=stop - start)

    result = write_parquet(Path(task.out_dir) / task.file, layout.PAIR_SCHEMA, write, task.meta)
    return {**result, "pairs": len(task.is_same)}


# ---------------------------------------------------------------- femb pairs


def pair_list_fingerprint(path: Path, landmarks: Landmarks | None, options: ImageOptions) -> str:
    """sha256 of the pair list's bytes, the landmarks file's sha256 and the image options."""
    parts = {
        "pairs": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "landmarks": landmarks.sha256 if landmarks is not None else None,
        "options": vars(options),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def convert_pairs(
    pairs: Path,
    output: Path,
    *,
    root: Path | None = None,
    landmarks: Path | None = None,
    image_size: int = 112,
    jpeg_quality: int = 95,
    lossless: bool = False,
    workers: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """A pair list -> one pair set `output` (.parquet, written atomically), as `femb evaluate` takes; a summary.

    Image paths are under `root` (default: the pair list's folder); `landmarks` aligns every image
    (`femb.data.landmarks`); `image_size`, `jpeg_quality` and `lossless` say how a photo becomes a
    crop; `workers` processes prepare the images (0: one per core); `progress` shows a tqdm bar
    (None: only on a terminal).
    """
    pairs, output = Path(pairs), Path(output)
    if workers < 0:
        raise FembError(f"workers must be 0 (one per core) or more, got {workers}")
    if output.suffix != ".parquet":
        raise FembError(f"{output}: the output must be a .parquet file (a pair set, as femb evaluate takes)")
    options = ImageOptions(image_size, jpeg_quality, lossless)
    options.check(aligning=landmarks is not None)
    if not pairs.is_file():
        raise FembError(f"{pairs}: no such pair list file")
    marks = read_landmarks(landmarks) if landmarks is not None else None
    fingerprint = pair_list_fingerprint(pairs, marks, options)
    task = _plan(pairs, output, fingerprint, Path(root) if root is not None else pairs.parent, marks, options)
    with progress_bar(len(task.images), "pairs", progress) as bar:
        result = write_pair_list(task, workers or os.cpu_count() or 1, bar)
    return {
        "output": str(output),
        "pairs": result["pairs"],
        "same": sum(task.is_same),
        "images": len(task.images),
        "folds": task.meta["folds"],
        "aligned": marks is not None,
        "fingerprint": fingerprint,
        "bytes": result["bytes"],
        "sha256": result["sha256"],
    }
