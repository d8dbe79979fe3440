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

from femb.data import layout
from femb.data.binfile import read_bin
from femb.data.image_shards import (
    IDENTITIES,
    image_fingerprint,
    is_finished,
    plan_image_shards,
    warn_skipped,
    write_identities,
    write_image_shards,
)
from femb.data.images import ImageOptions, read_image_list, scan_folder
from femb.data.landmarks import read_landmarks
from femb.data.parquet import (
    ROW_GROUP_ROWS,
    PairTask,
    ShardTask,
    read_footer,
    row_group_bounds,
    split_by_bytes,
    write_pairs,
    write_shard,
)
from femb.data.recordio import ImageSpans, InsightFaceRecords
from femb.errors import FembError
from femb.io import file_sha256, remove_temps, temp_target
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


def source_fingerprint(src: Path, bins: Sequence[Path], pair_lists: Sequence[Path] = ()) -> str:
    """sha256 of property, train.idx, size + first/last MiB of train.rec and each .bin, and any pair list."""
    parts: dict[str, Any] = {
        "property": (src / "property").read_text(encoding="ascii", errors="replace").strip(),
        "train.idx": hashlib.sha256((src / "train.idx").read_bytes()).hexdigest(),
        "train.rec": _sample_digest(src / "train.rec"),
        "bins": {path.name: _sample_digest(path) for path in bins},
    }
    if pair_lists:  # only then: fingerprints of plain conversions stay what they were
        parts["pair_lists"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pair_lists}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


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
    bounds = split_by_bytes(spans.lengths + _ROW_OVERHEAD, count)
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
        groups = row_group_bounds(part.lengths, rg_rows)
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
    """Whether `name` is one convert writes: the manifest, the identity names or a Parquet file."""
    return name in (layout.MANIFEST, IDENTITIES) or name.endswith(".parquet")


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
        if entry.is_file() and entry.name in (layout.MANIFEST, IDENTITIES):
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
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


# ---------------------------------------------------------------- convert


SOURCE_KINDS = ("auto", "insightface", "folder", "list")
_INSIGHTFACE_FILES = ("train.rec", "train.idx", "property")


def detect_source_kind(src: Path, source_kind: str = "auto") -> str:
    """What SRC is: "insightface" (train.rec/.idx/property), "folder" (one folder per identity) or "list" (a file)."""
    if source_kind not in SOURCE_KINDS:
        raise FembError(f"source_kind must be one of {', '.join(SOURCE_KINDS)}, got {source_kind!r}")
    if source_kind == "auto":
        if src.is_file():
            return "list"
        if src.is_dir():
            return "insightface" if any((src / n).exists() for n in _INSIGHTFACE_FILES) else "folder"
    elif source_kind == "list":
        if src.is_file():
            return source_kind
        raise FembError(f"{src}: no such image list file")
    elif src.is_dir():
        return source_kind
    raise FembError(
        f"{src}: no such directory (expected train.rec, train.idx, property and *.bin, one folder of images "
        "per identity, or an image list file)"
    )


def _reused(task: Any, finished: dict[str, dict]) -> bool:
    return finished.get(task.file) == task.meta


def _write_pair_lists(
    tasks: Sequence[Any], finished: dict[str, dict], out: Path, workers: int, bar: Any
) -> dict:
    """Write the pair sets of pair lists not already finished; every pair list's manifest entry by file."""
    results: dict[str, dict] = {}
    for task in tasks:
        if _reused(task, finished):
            results[task.file] = {**_file_sha256(out / task.file), "pairs": task.meta["pairs"]}
        else:
            from femb.data.pairs import write_pair_list

            results[task.file] = write_pair_list(task, workers, bar)
    return results


def _pair_images(tasks: Sequence[Any], finished: dict[str, dict]) -> int:
    """The images the pair lists still to write will prepare (the progress bar counts them too)."""
    return sum(len(t.images) for t in tasks if not _reused(t, finished))


def _remove_other_plans(out: Path, finished: dict[str, dict], files: set[str]) -> None:
    """Remove our files of the same source but another plan (e.g. another shard size)."""
    for name in set(finished) - files:
        (out / name).unlink(missing_ok=True)


def convert(
    src: Path,
    out: Path,
    shard_size_mb: float = 256.0,
    workers: int = 0,
    verify: bool = False,
    progress: bool | None = None,
    row_group_rows: int = ROW_GROUP_ROWS,
    *,
    source_kind: str = "auto",
    root: Path | None = None,
    landmarks: Path | None = None,
    pairs: Sequence[Path] = (),
    image_size: int = 112,
    jpeg_quality: int = 95,
    lossless: bool = False,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Convert SRC to Parquet shards + pair files + manifest in OUT; the manifest.

    SRC is an InsightFace directory (train.rec/.idx/property, *.bin: bytes copied unchanged), an image
    folder or an image list (`femb.data.images`, `root` the list's base; `landmarks` aligns every
    photo); `source_kind` says which instead of detecting it. `pairs` are verification pair lists
    (`femb.data.pairs`) added as pair sets, their images under `root` (default: the list's folder).
    `shard_size_mb` is the target shard size in MiB; `workers` the processes (or threads) at work, 0
    for one per core; `verify` decodes every image; `progress` shows a tqdm bar in images (None: only
    on a terminal); `row_group_rows` caps a Parquet row group (the loader's shuffle unit);
    `image_size`, `jpeg_quality` and `lossless` say how loose photos become crops; `skip_bad` lists
    unusable photos in the manifest instead of stopping.
    """
    src, out = Path(src), Path(out)
    if not shard_size_mb > 0:
        raise FembError(f"shard_size_mb must be positive, got {shard_size_mb}")
    if workers < 0:
        raise FembError(f"workers must be 0 (one per core) or more, got {workers}")
    if row_group_rows < 1:
        raise FembError(f"row_group_rows must be at least 1, got {row_group_rows}")
    workers = workers or os.cpu_count() or 1
    kind = detect_source_kind(src, source_kind)
    options = ImageOptions(image_size, jpeg_quality, lossless)
    options.check(aligning=landmarks is not None)
    marks = read_landmarks(landmarks) if landmarks is not None else None
    pair_lists = [Path(p) for p in pairs]
    for path in pair_lists:
        if not path.is_file():
            raise FembError(f"{path}: no such pair list file")
    run = dict(out=out, shard_size_mb=shard_size_mb, workers=workers, verify=verify, progress=progress)
    run.update(row_group_rows=row_group_rows, root=root, marks=marks, pair_lists=pair_lists, options=options)
    if kind == "insightface":
        return _convert_records(src, **run)
    return _convert_images(src, kind, skip_bad=skip_bad, **run)


def _plan_pair_lists(
    pair_lists: Sequence[Path],
    out: Path,
    fingerprint: str,
    root: Path | None,
    marks: Any,
    options: ImageOptions,
) -> list[Any]:
    if not pair_lists:
        return []
    from femb.data.pairs import plan_pair_list

    tasks = [plan_pair_list(p, out, fingerprint, root or p.parent, marks, options) for p in pair_lists]
    return tasks


def _check_pair_names(pair_lists: Sequence[Path], bins: Sequence[Path]) -> None:
    """Two pair sets may not share a name: `lfw.txt` beside `lfw.bin`, or two `pairs.txt`, would overwrite."""
    seen: dict[str, Path] = {path.stem: path for path in bins}
    for path in pair_lists:
        if path.stem in seen:
            raise FembError(
                f"{path}: its pair set would be named {path.stem!r}, as {seen[path.stem]}'s is; rename one"
            )
        seen[path.stem] = path


def _convert_records(
    src: Path,
    out: Path,
    shard_size_mb: float,
    workers: int,
    verify: bool,
    progress: bool | None,
    row_group_rows: int,
    root: Path | None,
    marks: Any,
    pair_lists: Sequence[Path],
    options: ImageOptions,
) -> dict[str, Any]:
    """An InsightFace directory -> OUT, image bytes unchanged (module doc)."""
    with InsightFaceRecords(src) as records:
        bins = sorted(src.glob("*.bin"))
        _check_pair_names(pair_lists, bins)
        fingerprint = source_fingerprint(src, bins, pair_lists)
        manifest, finished, temps = _inspect_out(out, fingerprint)
        settings = {
            "format": layout.FORMAT,
            "fingerprint": fingerprint,
            "shard_size_mb": shard_size_mb,
            "row_group_rows": row_group_rows,
        }
        if pair_lists:
            settings["pair_options"] = {**vars(options), "aligned": marks is not None}
        current = manifest if _manifest_current(out, manifest, settings) else None
        if current is not None and (current.get("verified") or not verify):
            return current

        if not len(records):
            raise FembError(f"{records.idx_path}: the dataset holds no images")
        spans = records.spans()
        pair_tasks = _plan_pairs(bins, out, fingerprint)
        list_tasks = _plan_pair_lists(pair_lists, out, fingerprint, root, marks, options)
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
        tasks = [*shard_tasks, *pair_tasks, *list_tasks]
        reuse = {t.file for t in tasks if _reused(t, finished)}
        total = sum(t.meta["rows"] for t in shard_tasks) + _pair_images(list_tasks, finished)
        try:
            with progress_bar(total, "convert", progress) as bar:
                bar.update(sum(t.meta["rows"] for t in shard_tasks if t.file in reuse))
                written = run_tasks(
                    write_shard, [t for t in shard_tasks if t.file not in reuse], workers, bar
                )
                written += run_tasks(
                    write_pairs, [t for t in pair_tasks if t.file not in reuse], workers, bar
                )
                lists = _write_pair_lists(list_tasks, finished, out, workers, bar)
        except BaseException:
            remove_temps(out, [t.file for t in tasks])
            raise
        results = {r["file"]: r for r in written}
        results.update(lists)
        for t in [*shard_tasks, *pair_tasks]:
            if t.file in reuse:
                kept = ("rows", "first_key", "last_key") if isinstance(t, ShardTask) else ("pairs",)
                results[t.file] = {**_file_sha256(out / t.file), **{k: t.meta[k] for k in kept}}
        _remove_other_plans(out, finished, {t.file for t in tasks})
        manifest = {
            **settings,
            "source": str(src),
            "source_kind": "insightface",
            "layout": records.layout,
            "num_classes": records.num_classes,
            "num_images": int(spans.keys.size),
            "image_size": list(records.image_size),
            "verified": bool(verify),
            "shards": [results[t.file] for t in shard_tasks],
            "pairs": {Path(t.file).stem: results[t.file] for t in [*pair_tasks, *list_tasks]},
        }
        layout.write_manifest(out, manifest)
        return manifest


def _convert_images(
    src: Path,
    kind: str,
    out: Path,
    shard_size_mb: float,
    workers: int,
    verify: bool,
    progress: bool | None,
    row_group_rows: int,
    root: Path | None,
    marks: Any,
    pair_lists: Sequence[Path],
    options: ImageOptions,
    skip_bad: bool,
) -> dict[str, Any]:
    """An image folder or image list -> OUT (`femb.data.image_shards`)."""
    if kind == "folder":
        if root is not None and Path(root) != src:
            raise FembError(f"root {root}: applies to an image list; an image folder is its own root")
        source = scan_folder(src)
    else:
        source = read_image_list(src, root, skip_bad)
    _check_pair_names(pair_lists, [])
    fingerprint = image_fingerprint(source, marks, pair_lists)
    manifest, finished, temps = _inspect_out(out, fingerprint)
    settings = {
        "format": layout.FORMAT,
        "fingerprint": fingerprint,
        "source_kind": kind,
        "shard_size_mb": shard_size_mb,
        "row_group_rows": row_group_rows,
        "image_size": [options.image_size, options.image_size],
        "jpeg_quality": options.jpeg_quality,
        "lossless": options.lossless,
        "aligned": marks is not None,
        "skip_bad": skip_bad,
    }
    current = manifest if _manifest_current(out, manifest, settings) else None
    if current is not None and (current.get("verified") or not verify):
        return current

    shard_tasks, unaligned = plan_image_shards(
        source, marks, fingerprint, options, shard_size_mb * (1 << 20), row_group_rows, skip_bad
    )
    list_tasks = _plan_pair_lists(pair_lists, out, fingerprint, root, marks, options)
    out.mkdir(parents=True, exist_ok=True)
    remove_temps(out, temps)
    layout.manifest_path(out).unlink(missing_ok=True)
    footers = {t.file: read_footer(out / t.file) if t.file in finished else None for t in shard_tasks}
    reuse = {
        t.file
        for t in shard_tasks
        if is_finished(t, footers[t.file]) and (footers[t.file].get("verified") or not verify)
    }
    todo = [t for t in shard_tasks if t.file not in reuse]
    try:
        total = sum(len(t.images) for t in shard_tasks) + _pair_images(list_tasks, finished)
        with progress_bar(total, "convert", progress) as bar:
            bar.update(sum(len(t.images) for t in shard_tasks if t.file in reuse))
            written = write_image_shards(todo, source, out, options, skip_bad, verify, workers, bar)
            lists = _write_pair_lists(list_tasks, finished, out, workers, bar)
    except BaseException:
        remove_temps(out, [t.file for t in [*shard_tasks, *list_tasks]])
        raise
    results = {r["file"]: r for r in written}
    for t in shard_tasks:
        if t.file in reuse:
            footer = footers[t.file]
            keys = (
                {k: footer[k] for k in ("first_key", "last_key")}
                if footer["rows"]
                else {"first_key": None, "last_key": None}
            )
            results[t.file] = {
                **_file_sha256(out / t.file),
                "rows": footer["rows"],
                **keys,
                "skipped": footer["skipped"],
            }
    _remove_other_plans(out, finished, {t.file for t in [*shard_tasks, *list_tasks]} | {IDENTITIES})
    skipped = [*source.skipped, *unaligned, *(s for t in shard_tasks for s in results[t.file].pop("skipped"))]
    write_identities(out, source.identities)
    manifest = {
        **settings,
        "source": str(src),
        "num_classes": len(source.identities),
        "num_images": sum(results[t.file]["rows"] for t in shard_tasks),
        "verified": bool(verify),
        "identities": source.identities,
        "skipped": skipped,
        "shards": [results[t.file] for t in shard_tasks],
        "pairs": {Path(t.file).stem: lists[t.file] for t in list_tasks},
    }
    layout.write_manifest(out, manifest)
    warn_skipped(skipped)
    return manifest
