"""InsightFace RecordIO + .bin pair sets -> a shard directory (docs/architecture.md "Parquet shards"), bytes unchanged.

`convert(SRC, OUT)` plans train shards of about equal bytes and one pair file per `SRC/<name>.bin`,
writes them (`femb.data.parquet`) and, last, `OUT/manifest.json` (`femb.data.layout`, "Manifest").

Source fingerprint (the manifest's "fingerprint", also in every file's footer): the sha256 of
`property`, all of `train.idx`, the size and first/last MiB of `train.rec`, and the name, size and
first/last MiB of each `.bin`. It is cheap (no full read of the .rec) and stable under copies (no
paths or mtimes); it does not notice an in-place edit in the middle of an image.

Every file appears whole under its name or not at all (docs/architecture.md "Atomic output"). A rerun
with the same fingerprint and settings is a no-op; after an interruption, finished files whose footer
matches the plan are kept and the rest is written. An OUT holding anything else (foreign files, or
the output of another source) is refused before anything is touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from femb.data import layout
from femb.data.binfile import read_bin
from femb.data.parquet import (
    ROW_GROUP_MAX_BYTES,
    ROW_GROUP_ROWS,
    PairTask,
    ShardTask,
    read_footer,
    write_pairs,
    write_shard,
)
from femb.data.recordio import ImageSpans, InsightFaceRecords
from femb.errors import FembError
from femb.io import remove_temps, temp_target
from femb.parallel import progress_bar, run_tasks

SAMPLE_BYTES = 1 << 20  # how much of each end of a large file the fingerprint reads
_ROW_OVERHEAD = 32  # bytes a row adds to a shard besides its image (key, label, offsets)


# ---------------------------------------------------------------- fingerprint, plan


def _sample_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of the first and last MiB: cheap identity of a large file."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return {"size": size, "sample_sha256": h.hexdigest()}


def source_fingerprint(src: Path, bins: Sequence[Path]) -> str:
    """sha256 of property, train.idx, and size + first/last MiB of train.rec and each .bin (see module doc)."""
    parts = {
        "property": (src / "property").read_text(encoding="ascii", errors="replace").strip(),
        "train.idx": hashlib.sha256((src / "train.idx").read_bytes()).hexdigest(),
        "train.rec": _sample_digest(src / "train.rec"),
        "bins": {path.name: _sample_digest(path) for path in bins},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _split_by_bytes(lengths: np.ndarray, parts: int) -> np.ndarray:
    """Boundaries [0, ..., n] cutting rows into `parts` runs of about equal byte size."""
    cumulative = np.cumsum(lengths)
    targets = cumulative[-1] * np.arange(1, parts) / parts
    inner = np.searchsorted(cumulative, targets, side="left") + 1
    return np.unique(np.concatenate([[0], inner, [lengths.size]]))


def _row_groups(lengths: np.ndarray, max_rows: int) -> list[int]:
    """Boundaries of row groups of at most `max_rows` rows and ROW_GROUP_MAX_BYTES image bytes."""
    bounds, start, n = [0], 0, lengths.size
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    while start < n:
        by_bytes = int(np.searchsorted(cumulative, cumulative[start] + ROW_GROUP_MAX_BYTES, side="right")) - 1
        start = min(n, start + max_rows, max(by_bytes, start + 1))
        bounds.append(start)
    return bounds


def _plan_shards(
    records: InsightFaceRecords,
    spans: ImageSpans,
    out: Path,
    fingerprint: str,
    shard_bytes: float,
    rg_rows: int,
) -> list[ShardTask]:
    """Train shards of about `shard_bytes` each, in key order, with their footer entries."""
    total = int(spans.lengths.sum()) + _ROW_OVERHEAD * spans.keys.size
    count = max(1, min(spans.keys.size, math.ceil(total / shard_bytes)))
    bounds = _split_by_bytes(spans.lengths + _ROW_OVERHEAD, count)
    count = bounds.size - 1
    tasks = []
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = ImageSpans(*(column[start:stop] for column in spans))
        name = layout.shard_name(index, count)
        meta = {
            "format": layout.FORMAT,
            "fingerprint": fingerprint,
            "file": name,
            "rows": int(stop - start),
            "first_key": int(part.keys[0]),
            "last_key": int(part.keys[-1]),
            "row_group_rows": rg_rows,
        }
        groups = _row_groups(part.lengths, rg_rows)
        tasks.append(ShardTask(str(records.rec_path), str(out), name, part, groups, meta))
    return tasks


def _plan_pairs(bins: Sequence[Path], out: Path, fingerprint: str) -> list[PairTask]:
    """One pair file per .bin, after reading every .bin (a FembError names a bad one) before anything is written."""
    tasks = []
    for path in bins:
        if path.stem.startswith("train-"):  # the loader globs train-*.parquet
            raise FembError(
                f"{path}: a pair set named train-* would read as a train shard in the output; rename it"
            )
        name = layout.pair_set_name(path.stem)
        meta = {
            "format": layout.FORMAT,
            "fingerprint": fingerprint,
            "file": name,
            "source": path.name,
            "pairs": len(read_bin(path)[1]),
        }
        tasks.append(PairTask(str(path), str(out), name, meta))
    return tasks


# ---------------------------------------------------------------- the output directory


def _is_ours(name: str) -> bool:
    """Whether `name` is one convert writes: the manifest or a Parquet file."""
    return name == layout.MANIFEST or name.endswith(".parquet")


def _inspect_out(out: Path, fingerprint: str) -> tuple[dict | None, dict[str, dict], list[str]]:
    """Our manifest (same source), our finished files by name, targets of our stale temporaries; refuse the rest."""
    if out.exists() and not out.is_dir():
        raise FembError(f"{out}: exists and is not a directory")
    if not out.exists():
        return None, {}, []
    manifest = layout.read_manifest(out)
    if manifest is not None:
        theirs = manifest.get("fingerprint") if manifest.get("format") == layout.FORMAT else None
        if not isinstance(theirs, str):
            raise FembError(
                f"{layout.manifest_path(out)}: not a femb convert manifest; choose an empty output directory"
            )
        if theirs != fingerprint:
            raise FembError(
                f"{layout.manifest_path(out)}: describes the conversion of another source (fingerprint "
                f"{theirs[:12]}, this one {fingerprint[:12]}); remove {out} or choose another output directory"
            )
    finished, temps = {}, []
    for entry in sorted(out.iterdir()):
        target = temp_target(entry.name)
        if entry.is_file() and target is not None and _is_ours(target):
            temps.append(target)
            continue
        if entry.is_file() and entry.name == layout.MANIFEST:
            continue
        meta = read_footer(entry) if entry.is_file() and entry.suffix == ".parquet" else None
        if meta is None or meta.get("format") != layout.FORMAT:
            raise FembError(
                f"{entry}: not written by femb convert; the output directory {out} must be empty or hold "
                "only an earlier conversion of the same source"
            )
        if meta.get("fingerprint") != fingerprint:
            raise FembError(
                f"{entry}: belongs to the conversion of another source; remove {out} or choose another "
                "output directory"
            )
        finished[entry.name] = meta
    return manifest, finished, temps


def _manifest_current(out: Path, manifest: dict | None, settings: dict) -> bool:
    """Whether OUT already holds a complete conversion with these settings (every listed file at its size)."""
    if manifest is None or any(manifest.get(k) != v for k, v in settings.items()):
        return False
    files = [*manifest.get("shards", []), *manifest.get("pairs", {}).values()]
    return all((out / f["file"]).is_file() and (out / f["file"]).stat().st_size == f["bytes"] for f in files)


def _file_sha256(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


# ---------------------------------------------------------------- convert


def convert(
    src: Path,
    out: Path,
    shard_size_mb: float = 256.0,
    workers: int = 0,
    verify: bool = False,
    progress: bool | None = None,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> dict[str, Any]:
    """Convert SRC (train.rec/.idx/property, *.bin) to Parquet shards + pair files + manifest in OUT; the manifest.

    `shard_size_mb` is the target shard size in MiB; `workers` the shards written at once (threads)
    or verified at once (processes), 0 for one per core; `verify` decodes every image before
    writing; `progress` shows a tqdm bar in images (None: only on a terminal); `row_group_rows`
    caps a Parquet row group (the loader's shuffle unit).
    """
    src, out = Path(src), Path(out)
    if not shard_size_mb > 0:
        raise FembError(f"shard_size_mb must be positive, got {shard_size_mb}")
    if workers < 0:
        raise FembError(f"workers must be 0 (one per core) or more, got {workers}")
    if row_group_rows < 1:
        raise FembError(f"row_group_rows must be at least 1, got {row_group_rows}")
    workers = workers or os.cpu_count() or 1
    if not src.is_dir():
        raise FembError(f"{src}: no such directory (expected train.rec, train.idx, property and *.bin)")
    with InsightFaceRecords(src) as records:
        bins = sorted(src.glob("*.bin"))
        fingerprint = source_fingerprint(src, bins)
        manifest, finished, temps = _inspect_out(out, fingerprint)
        settings = {
            "format": layout.FORMAT,
            "fingerprint": fingerprint,
            "shard_size_mb": shard_size_mb,
            "row_group_rows": row_group_rows,
        }
        current = manifest if _manifest_current(out, manifest, settings) else None
        if current is not None and (current.get("verified") or not verify):
            return current

        if not len(records):
            raise FembError(f"{records.idx_path}: the dataset holds no images")
        spans = records.spans()
        pair_tasks = _plan_pairs(bins, out, fingerprint)
        shard_tasks = _plan_shards(
            records, spans, out, fingerprint, shard_size_mb * (1 << 20), row_group_rows
        )
        if verify:
            from femb.data.verify import verify_images  # imports torch: only when asked

            verify_images(shard_tasks, pair_tasks, records.image_size, workers, progress)
        if current is not None:  # a finished output now verified: only the manifest changes
            current = {**current, "verified": True}
            layout.write_manifest(out, current)
            return current

        out.mkdir(parents=True, exist_ok=True)
        remove_temps(out, temps)
        layout.manifest_path(out).unlink(missing_ok=True)
        tasks = [*shard_tasks, *pair_tasks]
        reuse = {t.file for t in tasks if finished.get(t.file) == t.meta}
        total = sum(t.meta["rows"] for t in shard_tasks)
        try:
            with progress_bar(total, "convert", progress) as bar:
                bar.update(sum(t.meta["rows"] for t in shard_tasks if t.file in reuse))
                written = run_tasks(
                    write_shard, [t for t in shard_tasks if t.file not in reuse], workers, bar
                )
                written += run_tasks(
                    write_pairs, [t for t in pair_tasks if t.file not in reuse], workers, bar
                )
        except BaseException:
            remove_temps(out, [t.file for t in tasks])
            raise
        results = {r["file"]: r for r in written}
        for t in tasks:
            if t.file in reuse:
                kept = ("rows", "first_key", "last_key") if isinstance(t, ShardTask) else ("pairs",)
                results[t.file] = {**_file_sha256(out / t.file), **{k: t.meta[k] for k in kept}}
        for name in set(finished) - {
            t.file for t in tasks
        }:  # ours, same source, another plan (e.g. shard size)
            (out / name).unlink(missing_ok=True)
        manifest = {
            **settings,
            "source": str(src),
            "layout": records.layout,
            "num_classes": records.num_classes,
            "num_images": int(spans.keys.size),
            "image_size": list(records.image_size),
            "verified": bool(verify),
            "shards": [results[t.file] for t in shard_tasks],
            "pairs": {Path(t.file).stem: results[t.file] for t in pair_tasks},
        }
        layout.write_manifest(out, manifest)
        return manifest
