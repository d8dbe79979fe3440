"""Train shards from loose image files (an image folder or image list, `femb.data.images`), optionally aligned.

The source's photos, in label order, get keys 1..N (as InsightFace numbers records) and are planned into
shards of about `shard_size_mb` by their expected stored size. Workers (processes) prepare chunks of
photos (`images.prepare_image`: kept, or decoded, aligned and encoded once) and the parent writes each
shard as soon as its chunks are in, so a shard is the unit of resume: its footer holds the plan entry,
and, besides, the rows actually stored and the photos skipped under `skip_bad`.

Source fingerprint: the sha256 of the source kind, every photo's relative path, label and size, the
identity names, and the sha256 of the image list, the landmarks file and the pair lists. It reads no
image (a rerun on a million photos costs a directory walk); it does not notice an edit that keeps a
file's size.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from femb.data import layout
from femb.data.images import BadImage, ImageOptions, ImageSource, check_image, prepare_image, read_image
from femb.data.landmarks import Landmarks
from femb.data.parquet import row_group_bounds, split_by_bytes, write_parquet
from femb.errors import FembError
from femb.io import write_text
from femb.parallel import Report, imap_tasks, report_progress

IDENTITIES = "identities.csv"  # label,identity: the names behind the labels
CHUNK_IMAGES = 256  # photos a worker prepares per task
_INLINE_SECONDS = 2e-4  # per photo: below this, preparing costs less than a round trip to a worker
_BYTES_PER_PIXEL = {"jpeg": 0.65, "png": 2.0}  # expected stored size of a re-encoded face crop, for the plan
_FOOTER_EXTRA = ("rows", "skipped", "verified")  # footer entries known only after writing

log = logging.getLogger(__name__)


@dataclass
class ImageShardTask:
    """One train shard of photos: (key, label, relative name, error name, landmarks or None) per photo."""

    file: str
    images: list[tuple[int, int, str, str, np.ndarray | None]]
    meta: dict  # the plan entry of the footer


@dataclass
class Chunk:
    """Photos one worker prepares: their paths under `root`, error names and landmarks."""

    root: str
    items: list[tuple[str, str, np.ndarray | None]]
    options: ImageOptions
    skip_bad: bool
    verify: bool


def image_fingerprint(
    source: ImageSource, landmarks: Landmarks | None, pair_lists: Sequence[Path] = ()
) -> str:
    """sha256 of the photos' names, labels and sizes, the identities and the list/landmark/pair files (module doc)."""
    h = hashlib.sha256()
    for image in source.images:
        h.update(f"{image.name}\0{image.label}\0{image.size}\n".encode())
    parts = {
        "kind": source.kind,
        "images": h.hexdigest(),
        "identities": hashlib.sha256("\n".join(source.identities).encode()).hexdigest(),
        "list": hashlib.sha256(source.list_path.read_bytes()).hexdigest() if source.list_path else None,
        "landmarks": landmarks.sha256 if landmarks is not None else None,
        "pairs": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pair_lists},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _expected_bytes(source: ImageSource, options: ImageOptions, aligned: bool) -> np.ndarray:
    sizes = np.array([image.size for image in source.images], dtype=np.float64)
    if not aligned and not options.lossless:
        return sizes  # most photos keep their bytes
    crop = options.image_size**2 * _BYTES_PER_PIXEL["png" if options.lossless else "jpeg"]
    return np.full(sizes.size, crop)


def plan_image_shards(
    source: ImageSource,
    landmarks: Landmarks | None,
    fingerprint: str,
    options: ImageOptions,
    shard_bytes: float,
    row_group_rows: int,
    skip_bad: bool,
) -> tuple[list[ImageShardTask], list[dict]]:
    """Shards of about `shard_bytes`, and the photos left out for lack of a landmark row (under skip_bad).

    A photo without a landmark row is a FembError naming it and the landmarks file, unless `skip_bad`.
    """
    rows: list[tuple[int, int, str, str, np.ndarray | None]] = []
    skipped: list[dict] = []
    for key, image in enumerate(source.images, start=1):
        points = None
        if landmarks is not None:
            points = landmarks.lookup(image.name)
            if points is None:
                reason = f"{image.where}: no row for {image.name} in the landmarks file {landmarks.path}"
                if not skip_bad:
                    raise BadImage(reason)
                skipped.append({"file": image.name, "reason": reason})
                continue
        rows.append((key, image.label, image.name, image.where, points))
    if not rows:
        raise FembError(f"{source.root}: no image left to convert ({len(skipped)} skipped)")
    expected = _expected_bytes(source, options, landmarks is not None)
    lengths = np.array([expected[key - 1] for key, *_ in rows]) + 32
    count = max(1, min(len(rows), int(np.ceil(lengths.sum() / shard_bytes))))
    bounds = split_by_bytes(lengths, count)
    count = bounds.size - 1
    settings = {"options": vars(options), "aligned": landmarks is not None, "skip_bad": skip_bad}
    tasks = []
    for index, (start, stop) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        part = rows[start:stop]
        name = layout.shard_name(index, count)
        meta = {
            "format": layout.FORMAT,
            "fingerprint": fingerprint,
            "file": name,
            "images": len(part),
            "first_key": part[0][0],
            "last_key": part[-1][0],
            "row_group_rows": row_group_rows,
            **settings,
        }
        tasks.append(ImageShardTask(name, part, meta))
    return tasks, skipped


def is_finished(task: ImageShardTask, footer: dict | None) -> bool:
    """Whether a file's footer says it is this task's shard, fully written."""
    return footer is not None and {k: v for k, v in footer.items() if k not in _FOOTER_EXTRA} == task.meta


def prepare_chunk(chunk: Chunk, report: Report | None = None) -> tuple[list[bytes | None], list[dict]]:
    """Each photo's stored bytes (None when skipped) and the skipped photos with their reasons."""
    root = chunk.root
    out: list[bytes | None] = []
    skipped: list[dict] = []
    for name, where, points in chunk.items:
        try:
            data = prepare_image(read_image(os.path.join(root, name), where), chunk.options, points, where)
            if chunk.verify:
                check_image(data, chunk.options, where)
            out.append(data)
        except BadImage as err:
            if not chunk.skip_bad:
                raise
            out.append(None)
            skipped.append({"file": name, "reason": str(err)})
    report_progress(len(chunk.items), report)
    return out, skipped


def _write_shard(
    path: Path, task: ImageShardTask, images: list[bytes | None], skipped: list[dict], verified: bool
) -> dict:
    kept = [i for i, data in enumerate(images) if data is not None]
    keys = [task.images[i][0] for i in kept]
    labels = [task.images[i][1] for i in kept]
    blobs = [images[i] for i in kept]
    bounds = row_group_bounds(np.array([len(b) for b in blobs], dtype=np.int64), task.meta["row_group_rows"])  # type: ignore[arg-type]

    def write(writer: pq.ParquetWriter) -> None:
        for start, stop in zip(bounds[:-1], bounds[1:]):
            table = pa.Table.from_arrays(
                [
                    pa.array(keys[start:stop], pa.int64()),
                    pa.array(labels[start:stop], pa.int64()),
                    pa.array(blobs[start:stop], pa.binary()),
                ],
                schema=layout.SHARD_SCHEMA,
            )
            writer.write_table(table, row_group_size=stop - start)

    footer = {**task.meta, "rows": len(kept), "skipped": skipped, "verified": verified}
    result = write_parquet(path, layout.SHARD_SCHEMA, write, footer)
    first, last = (keys[0], keys[-1]) if keys else (None, None)
    return {**result, "rows": len(kept), "first_key": first, "last_key": last, "skipped": skipped}


def write_image_shards(
    tasks: Sequence[ImageShardTask],
    source: ImageSource,
    out: Path,
    options: ImageOptions,
    skip_bad: bool,
    verify: bool,
    workers: int,
    bar: tqdm,
) -> list[dict[str, Any]]:
    """Prepare the photos of `tasks` on `workers` processes and write each shard once its chunks are in."""
    chunks: list[Chunk] = []
    owner: list[int] = []  # the task of each chunk
    for index, task in enumerate(tasks):
        for start in range(0, len(task.images), CHUNK_IMAGES):
            items = [
                (name, where, pts) for _, _, name, where, pts in task.images[start : start + CHUNK_IMAGES]
            ]
            chunks.append(Chunk(str(source.root), items, options, skip_bad, verify))
            owner.append(index)
    results: list[dict[str, Any]] = []
    images: list[bytes | None] = []
    skipped: list[dict] = []
    for number, (prepared, skipped_here) in enumerate(
        imap_tasks(prepare_chunk, chunks, workers, bar, inline_below=inline_seconds(chunks))
    ):
        images += prepared
        skipped += skipped_here
        task = tasks[owner[number]]
        if number + 1 == len(chunks) or owner[number + 1] != owner[number]:
            results.append(_write_shard(out / task.file, task, images, skipped, verify))
            images, skipped = [], []
    return results


def inline_seconds(chunks: Sequence[Chunk]) -> float:
    """The time under which a first chunk of photos is kept in-process (`imap_tasks(inline_below=)`)."""
    return _INLINE_SECONDS * len(chunks[0].items) if chunks else 0.0


def write_identities(out: Path, identities: Sequence[str]) -> Path:
    """`OUT/identities.csv`: `label,identity` rows, the names behind the labels."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "identity"])
    writer.writerows(enumerate(identities))
    return write_text(out / IDENTITIES, buffer.getvalue())


def warn_skipped(skipped: Sequence[dict]) -> None:
    """One warning line for the photos a conversion left out."""
    if skipped:
        log.warning(
            "femb convert: %d image(s) skipped (listed in the manifest), the first: %s",
            len(skipped),
            skipped[0]["reason"],
        )
