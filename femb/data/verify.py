"""`convert --verify`: decode every image with the training decoder before anything is written.

An image passes when `femb.data.decode.decode_rgb` turns it into RGB of the size `property` gives, so
an image that verifies is one the loader can train on; the error names the keys (train.rec) or the
indices (a .bin) of the first images that fail and the reason for the first. An image that decodes
only with repairs or reductions (a JPEG libjpeg-turbo reports corrupt, a 16-bit PNG) passes, as it
does for OpenCV in arcface_torch, and a warning names its keys or indices the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from femb.data.binfile import read_bin
from femb.data.decode import decode_checked
from femb.data.parquet import PairTask, ShardTask
from femb.data.recordio import RecordReader, record_image
from femb.errors import FembError
from femb.parallel import Report, progress_bar, report_progress, run_tasks

MAX_REPORTED = 10  # failing keys or indices named in the error
_REPORT_EVERY = 1024  # images decoded between progress reports
log = logging.getLogger(__name__)
# (key or index, problem) for each image that fails, (key or index, warning) for each one repaired.
Found = tuple[list[tuple[int, str]], list[tuple[int, str]]]


def decode_report(data: bytes, size: int, out: np.ndarray | None = None) -> tuple[str | None, str | None]:
    """(why the image does not decode, what was repaired or reduced to decode it): at most one is not None."""
    try:
        return None, decode_checked(data, size, out)
    except ValueError as err:
        reason = str(err).strip()
        return (reason.splitlines()[0] if reason else type(err).__name__), None


def _verify_shard(task: ShardTask, size: int, report: Report | None = None) -> Found:
    """Decode every image of a shard's range; (key, problem) for each one that fails, (key, warning) for repairs."""
    problems, warnings = [], []
    spans = task.spans
    out = np.empty((size, size, 3), np.uint8)
    columns = (spans.keys.tolist(), spans.starts.tolist(), spans.lengths.tolist(), spans.offsets.tolist())
    with RecordReader(task.rec_path) as reader:
        for i, (key, start, length, offset) in enumerate(zip(*columns)):
            data = reader.bytes_at(start, length) if start >= 0 else record_image(reader, offset)
            problem, warning = decode_report(data, size, out)
            if problem is not None:
                problems.append((key, problem))
            elif warning is not None:
                warnings.append((key, warning))
            if i % _REPORT_EVERY == _REPORT_EVERY - 1:
                report_progress(_REPORT_EVERY, report)
        report_progress(len(spans.keys) % _REPORT_EVERY, report)
    return problems, warnings


def _verify_pairs(task: PairTask, size: int, report: Report | None = None) -> Found:
    """Decode every image of a .bin; (index, problem) for each one that fails, (index, warning) for repairs."""
    images, _ = read_bin(Path(task.bin_path))
    out = np.empty((size, size, 3), np.uint8)
    problems, warnings = [], []
    for i, image in enumerate(images):
        problem, warning = decode_report(image, size, out)
        if problem is not None:
            problems.append((i, problem))
        elif warning is not None:
            warnings.append((i, warning))
    return problems, warnings


def _listed(items: Sequence[object]) -> str:
    return ", ".join(map(str, items[:MAX_REPORTED])) + (", ..." if len(items) > MAX_REPORTED else "")


def verify_images(
    shard_tasks: Sequence[ShardTask],
    pair_tasks: Sequence[PairTask],
    image_size: tuple[int, int],
    workers: int,
    progress: bool | None = None,
) -> list[str]:
    """Decode every image the tasks would write, on `workers` processes; a FembError naming those that fail.

    Returns the warning lines (also logged) for images that decode only with repairs or reductions.
    """
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
    problems = [problem for shard, _ in found for problem in shard]
    repaired = [warning for _, shard in found for warning in shard]
    lines = []
    if repaired:
        lines.append(
            f"{shard_tasks[0].rec_path}: {len(repaired):,} image(s) decode only with repairs or reductions, "
            f"keys {_listed([key for key, _ in repaired])} (key {repaired[0][0]}: {repaired[0][1]})"
        )
    for task, (_, set_warnings) in zip(pair_tasks, pair_problems):
        if set_warnings:
            lines.append(
                f"{task.bin_path}: {len(set_warnings):,} image(s) decode only with repairs or reductions, "
                f"indices {_listed([i for i, _ in set_warnings])} (image {set_warnings[0][0]}: {set_warnings[0][1]})"
            )
    for line in lines:
        log.warning("femb convert: warning: %s", line)
    if problems:
        raise FembError(
            f"{shard_tasks[0].rec_path}: {len(problems):,} image(s) do not decode, "
            f"keys {_listed([key for key, _ in problems])} (key {problems[0][0]}: {problems[0][1]})"
        )
    for task, (found_in_set, _) in zip(pair_tasks, pair_problems):
        if found_in_set:
            raise FembError(
                f"{task.bin_path}: {len(found_in_set):,} image(s) do not decode, "
                f"indices {_listed([i for i, _ in found_in_set])} (image {found_in_set[0][0]}: {found_in_set[0][1]})"
            )
