"""`convert --verify`: decode every image with the training decoder before anything is written.

An image passes when `femb.data.decode.decode_rgb` turns it into RGB of the size `property` gives, so
an image that verifies is one the loader can train on; the error names the keys (train.rec) or the
indices (a .bin) of the first images that fail and the reason for the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from femb.data.binfile import read_bin
from femb.data.decode import decode_rgb
from femb.data.parquet import PairTask, ShardTask
from femb.data.recordio import RecordReader, record_image
from femb.errors import FembError
from femb.parallel import Report, progress_bar, report_progress, run_tasks

MAX_REPORTED = 10  # failing keys or indices named in the error
_REPORT_EVERY = 1024  # images decoded between progress reports


def decode_problem(data: bytes, size: int, out: np.ndarray | None = None) -> str | None:
    """Why an encoded image does not decode to RGB `size` x `size` as the loader decodes it, or None."""
    try:
        decode_rgb(data, size, out)
    except ValueError as err:
        reason = str(err).strip()
        return reason.splitlines()[0] if reason else type(err).__name__
    return None


def _verify_shard(task: ShardTask, size: int, report: Report | None = None) -> list[tuple[int, str]]:
    """Decode every image of a shard's range; (key, problem) for each one that fails."""
    problems = []
    spans = task.spans
    out = np.empty((size, size, 3), np.uint8)
    columns = (spans.keys.tolist(), spans.starts.tolist(), spans.lengths.tolist(), spans.offsets.tolist())
    with RecordReader(task.rec_path) as reader:
        for i, (key, start, length, offset) in enumerate(zip(*columns)):
            data = reader.bytes_at(start, length) if start >= 0 else record_image(reader, offset)
            problem = decode_problem(data, size, out)
            if problem is not None:
                problems.append((key, problem))
            if i % _REPORT_EVERY == _REPORT_EVERY - 1:
                report_progress(_REPORT_EVERY, report)
        report_progress(len(spans.keys) % _REPORT_EVERY, report)
    return problems


def _verify_pairs(task: PairTask, size: int, report: Report | None = None) -> list[tuple[int, str]]:
    """Decode every image of a .bin; (index, problem) for each one that fails."""
    images, _ = read_bin(Path(task.bin_path))
    out = np.empty((size, size, 3), np.uint8)
    return [(i, problem) for i, image in enumerate(images) if (problem := decode_problem(image, size, out))]


def _listed(items: Sequence[object]) -> str:
    return ", ".join(map(str, items[:MAX_REPORTED])) + (", ..." if len(items) > MAX_REPORTED else "")


def verify_images(
    shard_tasks: Sequence[ShardTask],
    pair_tasks: Sequence[PairTask],
    image_size: tuple[int, int],
    workers: int,
    progress: bool | None = None,
) -> None:
    """Decode every image the tasks would write, on `workers` processes; a FembError naming those that fail."""
    height, width = image_size
    if height != width:
        raise FembError(
            f"{shard_tasks[0].rec_path}: property says {width}x{height}; verify decodes square images only, "
            "as training does"
        )
    total = sum(t.meta["rows"] for t in shard_tasks)
    with progress_bar(total, "verify", progress) as bar:
        found = run_tasks(_verify_shard, shard_tasks, workers, bar, height, processes=True)
        pair_problems = run_tasks(_verify_pairs, pair_tasks, workers, bar, height, processes=True)
    problems = [problem for shard in found for problem in shard]
    if problems:
        raise FembError(
            f"{shard_tasks[0].rec_path}: {len(problems):,} image(s) do not decode, "
            f"keys {_listed([key for key, _ in problems])} (key {problems[0][0]}: {problems[0][1]})"
        )
    for task, found_in_set in zip(pair_tasks, pair_problems):
        if found_in_set:
            raise FembError(
                f"{task.bin_path}: {len(found_in_set):,} image(s) do not decode, "
                f"indices {_listed([i for i, _ in found_in_set])} (image {found_in_set[0][0]}: {found_in_set[0][1]})"
            )
