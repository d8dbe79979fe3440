"""InsightFace RecordIO + .bin pair sets -> Parquet shards (DESIGN.md "Parquet shards"), bytes copied unchanged.

`convert(SRC, OUT)` writes `OUT/train-00000-of-0000N.parquet` (key int64, label int64, image
binary), one `OUT/<name>.parquet` per `SRC/<name>.bin` (left, right binary, is_same bool) and,
last, `OUT/manifest.json`. The image column is stored PLAIN, uncompressed, without dictionary or
statistics, so a shard is the encoded images plus a few bytes per row and the write runs near
disk speed: image bytes go from the mmap of train.rec to Parquet pages through Arrow binary-view
arrays that point into the mapping (a gathered copy on pyarrow builds that cannot write views).

Source fingerprint (`manifest.json` "fingerprint", also in every file's footer as `femb`): the
sha256 of `property`, all of `train.idx`, the size and first/last MiB of `train.rec`, and the
name, size and first/last MiB of each `.bin`. It is cheap (no full read of the .rec) and stable
under copies (no paths or mtimes); it does not notice an in-place edit in the middle of an image.

Every file is written under a temporary name and renamed when complete, the manifest last. A
rerun with the same fingerprint and settings is a no-op; after an interruption, finished files
whose footer matches the plan are kept and the rest is written. An OUT holding anything else
(foreign files, or the output of another source) is refused before anything is touched.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import queue
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from femb.data.recordio import ImageSpans, InsightFaceRecords, RecordReader, unpack
from femb.errors import FembError

FORMAT = "femb-shards/1"
ROW_GROUP_ROWS = 2048  # ~15 MB of 112x112 JPEGs: the unit the loader shuffles, several fit its buffer
ROW_GROUP_MAX_BYTES = 256 << 20  # a row group's image bytes (keeps Arrow int32 offsets far from overflow)
MANIFEST = "manifest.json"
SAMPLE_BYTES = 1 << 20
SHARD_NAME = re.compile(r"train-(\d{5})-of-(\d{5})\.parquet")  # the loader reads exactly these
_TEMP_NAME = re.compile(r"\.(.+\.parquet|manifest\.json)\.[0-9a-f]{8}\.tmp")
_VIEW_SPAN_LIMIT = (1 << 31) - 1  # Arrow view offsets are int32: a row group's bytes must lie this close
_MAX_REPORTED = 10  # corrupt keys named in a verify error
_REPORT: Callable[[int], None] | None = None  # progress callback of a worker process


# ---------------------------------------------------------------- fingerprint, plan


def _sample_digest(path: Path) -> dict:
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


@dataclass
class ShardTask:
    """One train shard: which images go in it and where their bytes lie in train.rec."""

    rec_path: str
    out_dir: str
    file: str
    spans: ImageSpans
    row_groups: list[int]  # row-group boundaries within the shard: [0, ..., rows]
    meta: dict  # the footer's `femb` entry, also how a finished file is recognised on resume


@dataclass
class PairTask:
    """One .bin pair set -> OUT/<name>.parquet."""

    bin_path: str
    out_dir: str
    file: str
    meta: dict


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
    total = int(spans.lengths.sum()) + 32 * spans.keys.size
    count = max(1, min(spans.keys.size, math.ceil(total / shard_bytes)))
    bounds = _split_by_bytes(spans.lengths + 32, count)
    count = bounds.size - 1
    tasks = []
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = ImageSpans(*(column[start:stop] for column in spans))
        name = f"train-{index:05d}-of-{count:05d}.parquet"
        meta = {
            "format": FORMAT,
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


# ---------------------------------------------------------------- writing


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through while a thread writes it: sha256 costs no second read."""

    def __init__(self, path: Path):
        super().__init__()
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 (closed by close())
        self._writer = ThreadPoolExecutor(max_workers=1)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def _write_all(self, data: memoryview) -> None:
        while data:
            data = data[self._file.write(data) :]

    def write(self, data: bytes | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        pending = self._writer.submit(self._write_all, view)  # both release the GIL: hash and write overlap
        self.sha256.update(view)
        pending.result()
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self.closed:
            self._writer.shutdown()
            self._file.close()
        super().close()


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")


def _write_atomic(
    final: Path,
    schema: pa.Schema,
    write: Callable[[pq.ParquetWriter], None],
    meta: dict,
    image_columns: Sequence[str],
) -> dict:
    """Write one Parquet file under a temporary name, rename it when complete; its size and sha256.

    `image_columns` are stored PLAIN: no compression, dictionary or statistics.
    """
    tmp = _temp_path(final)
    sink = _HashingFile(tmp)
    try:
        other_columns = [name for name in schema.names if name not in image_columns]
        footer = {"femb": json.dumps(meta, sort_keys=True)}
        # The Arrow schema is left out (binary views would read back as binary_view, not binary) and the
        # footer entry added at the end; pyarrow < 17 cannot add one, but writes no views either.
        late_footer = hasattr(pq.ParquetWriter, "add_key_value_metadata")
        writer = pq.ParquetWriter(
            sink,
            schema if late_footer else schema.with_metadata(footer),
            compression={name: ("none" if name in image_columns else "snappy") for name in schema.names},
            use_dictionary=[name for name in other_columns if name != "key"],
            write_statistics=other_columns,
            store_schema=not late_footer,
        )
        try:
            write(writer)
            if late_footer:
                writer.add_key_value_metadata(footer)
        finally:
            writer.close()
        sink.close()
        os.replace(tmp, final)
    except BaseException:
        sink.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"file": final.name, "bytes": sink.size, "sha256": sink.sha256.hexdigest()}


def _views_supported() -> bool:
    """Whether this pyarrow writes binary-view columns to Parquet (Arrow >= 21); else images are gathered."""
    try:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"x": pa.array([b"0123456789abcdef"], pa.binary_view())}), sink)
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowInvalid, AttributeError):
        return False
    return True


_VIEWS: bool | None = None


def _use_views() -> bool:
    global _VIEWS
    if _VIEWS is None:
        _VIEWS = _views_supported()
    return _VIEWS


def _image_array(mapped: pa.Buffer, starts: np.ndarray, lengths: np.ndarray, extra: list[bytes]) -> pa.Array:
    """The image column of one row group: views into the mmap of train.rec (multi-part images from `extra`)."""
    n = starts.size
    inline = starts >= 0
    if not _use_views():
        pieces = iter(extra)
        view = memoryview(mapped)  # type: ignore[arg-type]
        data = b"".join(
            [view[s : s + k] if s >= 0 else next(pieces) for s, k in zip(starts.tolist(), lengths.tolist())]
        )
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    buffers: list[pa.Buffer] = []
    buffer_index = np.zeros(n, dtype=np.int32)
    offset_in_buffer = np.zeros(n, dtype=np.int64)
    arrays: list[np.ndarray] = []
    if inline.any():
        base = int(starts[inline].min())
        end = int((starts + lengths)[inline].max())
        if end - base <= _VIEW_SPAN_LIMIT:
            buffers.append(mapped.slice(base, end - base))
            offset_in_buffer[inline] = starts[inline] - base
        else:  # records far apart in the file (a shuffled .idx): gather this group's bytes
            view = memoryview(mapped)  # type: ignore[arg-type]
            data = b"".join(
                view[s : s + k] for s, k in zip(starts[inline].tolist(), lengths[inline].tolist())
            )
            buffers.append(pa.py_buffer(data))
            offset_in_buffer[inline] = np.concatenate([[0], np.cumsum(lengths[inline])[:-1]])
        arrays.append(np.frombuffer(buffers[-1], dtype=np.uint8))
    if extra:
        buffer_index[~inline] = len(buffers)
        buffers.append(pa.py_buffer(b"".join(extra)))
        offset_in_buffer[~inline] = np.concatenate([[0], np.cumsum(lengths[~inline])[:-1]])
        arrays.append(np.frombuffer(buffers[-1], dtype=np.uint8))
    views = np.zeros((n, 4), dtype=np.int32)
    views[:, 0] = lengths
    views[:, 2] = buffer_index
    views[:, 3] = offset_in_buffer
    raw = views.view(np.uint8).reshape(n, 16)
    for b, array in enumerate(arrays):
        rows = np.flatnonzero((buffer_index == b) & (lengths >= 4))
        if rows.size:
            raw[rows, 4:8] = array[offset_in_buffer[rows, None] + np.arange(4)]
    for row in np.flatnonzero(lengths <= 12):  # short values live inside the view (Arrow spec)
        array, at, k = arrays[buffer_index[row]], offset_in_buffer[row], lengths[row]
        raw[row, 4:] = 0
        raw[row, 4 : 4 + k] = array[at : at + k]
    return pa.Array.from_buffers(pa.binary_view(), n, [None, pa.py_buffer(views), *buffers])


def _report(images: int, report: Callable[[int], None] | None) -> None:
    if report is not None:
        report(images)
    elif _REPORT is not None:
        _REPORT(images)


def _write_shard(task: ShardTask, report: Callable[[int], None] | None = None) -> dict:
    """Write one train shard, row group by row group, straight from the mmap of train.rec."""
    spans = task.spans
    image_type = pa.binary_view() if _use_views() else pa.binary()
    schema = pa.schema([("key", pa.int64()), ("label", pa.int64()), ("image", image_type)])
    mapped_file = pa.memory_map(task.rec_path, "r")
    mapped = mapped_file.read_buffer()
    reader = RecordReader(task.rec_path) if (spans.starts < 0).any() else None

    def write(writer: pq.ParquetWriter) -> None:
        for start, stop in zip(task.row_groups[:-1], task.row_groups[1:]):
            starts = spans.starts[start:stop]
            extra = [_multipart_image(reader, int(o)) for o in spans.offsets[start:stop][starts < 0]]  # type: ignore[arg-type]
            images = _image_array(mapped, starts, spans.lengths[start:stop], extra)
            table = pa.Table.from_arrays(
                [pa.array(spans.keys[start:stop]), pa.array(spans.labels[start:stop]), images], schema=schema
            )
            writer.write_table(table, row_group_size=stop - start)
            _report(stop - start, report)

    try:
        result = _write_atomic(Path(task.out_dir) / task.file, schema, write, task.meta, ["image"])
    finally:
        if reader is not None:
            reader.close()
        mapped_file.close()
    return {
        **result,
        "rows": task.meta["rows"],
        "first_key": task.meta["first_key"],
        "last_key": task.meta["last_key"],
    }


def _multipart_image(reader: RecordReader, offset: int) -> bytes:
    """The image bytes of a record split into parts (they are not contiguous in the file)."""
    payload, _ = reader.read_at(offset)
    return bytes(unpack(payload)[1])


def _write_pairs(task: PairTask, report: Callable[[int], None] | None = None) -> dict:
    """Write one .bin pair set as OUT/<name>.parquet: left, right binary and is_same bool, in the .bin's order."""
    from femb.data.binfile import read_bin

    images, same = read_bin(Path(task.bin_path))
    schema = pa.schema([("left", pa.binary()), ("right", pa.binary()), ("is_same", pa.bool_())])
    table = pa.Table.from_arrays(
        [
            pa.array(images[0::2], pa.binary()),
            pa.array(images[1::2], pa.binary()),
            pa.array(same, pa.bool_()),
        ],
        schema=schema,
    )
    result = _write_atomic(
        Path(task.out_dir) / task.file,
        schema,
        lambda w: w.write_table(table, row_group_size=ROW_GROUP_ROWS),
        task.meta,
        ["left", "right"],
    )
    return {**result, "pairs": len(same)}


# ---------------------------------------------------------------- verification


def _decode_problem(data: bytes, size: tuple[int, int]) -> str | None:
    """Why an encoded image does not decode to `size`, or None; libjpeg-turbo first, then PIL (as the loader)."""
    import simplejpeg
    from PIL import Image

    shape, problem = None, None
    if data[:2] == b"\xff\xd8":
        try:
            shape = simplejpeg.decode_jpeg(data, colorspace="RGB").shape[:2]
        except ValueError as err:  # e.g. a CMYK JPEG: PIL may still read it
            problem = str(err)
    if shape is None:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                shape = (image.height, image.width)
        except Exception as err:  # any decoder failure is what verify reports
            reason = (problem or str(err) or type(err).__name__).strip()
            return reason.splitlines()[0] if reason else type(err).__name__
    if tuple(shape) != tuple(size):
        return f"is {shape[1]}x{shape[0]}, property says {size[1]}x{size[0]}"
    return None


def _verify_shard(
    task: ShardTask, size: tuple[int, int], report: Callable[[int], None] | None = None
) -> list:
    """Decode every image of a shard's range; (key, problem) for each one that fails."""
    problems = []
    spans = task.spans
    columns = (spans.keys.tolist(), spans.starts.tolist(), spans.lengths.tolist(), spans.offsets.tolist())
    with RecordReader(task.rec_path) as reader:
        for i, (key, start, length, offset) in enumerate(zip(*columns)):
            data = reader.bytes_at(start, length) if start >= 0 else _multipart_image(reader, offset)
            problem = _decode_problem(data, size)
            if problem is not None:
                problems.append((key, problem))
            if i % 1024 == 1023:
                _report(1024, report)
        _report(len(spans.keys) % 1024, report)
    return problems


def _verify_pairs(task: PairTask, size: tuple[int, int], report: Callable[[int], None] | None = None) -> list:
    from femb.data.binfile import read_bin

    images, _ = read_bin(Path(task.bin_path))
    return [
        (index, problem) for index, image in enumerate(images) if (problem := _decode_problem(image, size))
    ]


# ---------------------------------------------------------------- the output directory


def _footer_meta(path: Path) -> dict | None:
    """The `femb` footer entry of a Parquet file we wrote, or None."""
    try:
        kv = pq.read_metadata(path).metadata or {}
        return json.loads(kv[b"femb"])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None


def _inspect_out(out: Path, fingerprint: str) -> tuple[dict | None, dict[str, dict], list[Path]]:
    """Our manifest (same source), our finished files by name, our stale temporaries; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise FembError(f"{out}: exists and is not a directory")
    if not out.exists():
        return None, {}, []
    manifest, finished, temps = None, {}, []
    for entry in sorted(out.iterdir(), key=lambda e: (e.name != MANIFEST, e.name)):  # the manifest says most
        if entry.is_file() and _TEMP_NAME.fullmatch(entry.name):
            temps.append(entry)
            continue
        if entry.is_file() and entry.name == MANIFEST:
            try:
                manifest = json.loads(entry.read_text())
                theirs = manifest["fingerprint"] if manifest.get("format") == FORMAT else None
            except (ValueError, KeyError, TypeError, AttributeError):
                theirs = None
            if theirs is None:
                raise FembError(f"{entry}: not a femb convert manifest; choose an empty output directory")
            if theirs != fingerprint:
                raise FembError(
                    f"{entry}: describes the conversion of another source (fingerprint {theirs[:12]}, "
                    f"this one {fingerprint[:12]}); remove {out} or choose another output directory"
                )
            continue
        meta = _footer_meta(entry) if entry.is_file() and entry.suffix == ".parquet" else None
        if meta is None or meta.get("format") != FORMAT:
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


def _file_sha256(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _write_json(path: Path, obj: dict) -> None:
    tmp = _temp_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- running tasks


def _init_worker(progress: mp.Queue) -> None:
    global _REPORT
    _REPORT = progress.put


def _run(fn: Callable, tasks: list, workers: int, bar: tqdm, *args: object, processes: bool = False) -> list:
    """fn(task, *args, report) for every task on `workers` threads or processes; results in task order.

    Writing runs on threads: Arrow's encoder, sha256 and file writes release the GIL, and threads
    start at once (a process pool costs a pyarrow import per worker). Decoding runs on processes.
    """
    if workers <= 1 or len(tasks) <= 1:
        return [fn(task, *args, bar.update) for task in tasks]
    workers = min(workers, len(tasks))
    if not processes:
        lock = threading.Lock()

        def report(images: int) -> None:
            with lock:
                bar.update(images)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, task, *args, report) for task in tasks]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    ctx = mp.get_context("forkserver")  # no plain fork: pyarrow's threads do not survive it
    ctx.set_forkserver_preload([__name__])
    progress = ctx.Queue()
    results: list = [None] * len(tasks)
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(progress,)
    ) as pool:
        futures_by = {pool.submit(fn, task, *args): i for i, task in enumerate(tasks)}
        pending = set(futures_by)
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                _drain(progress, bar)
                for future in done:
                    results[futures_by[future]] = future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            _drain(progress, bar)
    return results


def _drain(progress: mp.Queue, bar: tqdm) -> None:
    try:
        while True:
            bar.update(progress.get_nowait())
    except queue.Empty:
        pass


# ---------------------------------------------------------------- convert


def _check_bins(src: Path, bins: list[Path]) -> dict[str, int]:
    """Read every .bin (FembError naming a bad one) before anything is written; pairs per set."""
    from femb.data.binfile import read_bin

    counts = {}
    for path in bins:
        if path.stem.startswith("train-"):
            raise FembError(
                f"{path}: a pair set named train-* would read as a train shard in the output; rename it"
            )
        counts[path.stem] = len(read_bin(path)[1])
    return counts


def _verify(
    shard_tasks: list[ShardTask],
    pair_tasks: list[PairTask],
    size: tuple[int, int],
    workers: int,
    progress: bool | None,
) -> None:
    total = sum(t.meta["rows"] for t in shard_tasks)
    with tqdm(total=total, unit="img", desc="verify", disable=_disable(progress)) as bar:
        problems = [
            p for found in _run(_verify_shard, shard_tasks, workers, bar, size, processes=True) for p in found
        ]
        pair_problems = _run(_verify_pairs, pair_tasks, workers, bar, size, processes=True)
    if problems:
        keys = ", ".join(str(key) for key, _ in problems[:_MAX_REPORTED])
        more = ", ..." if len(problems) > _MAX_REPORTED else ""
        rec = shard_tasks[0].rec_path
        raise FembError(
            f"{rec}: {len(problems):,} image(s) do not decode, keys {keys}{more} "
            f"(key {problems[0][0]}: {problems[0][1]})"
        )
    for task, found in zip(pair_tasks, pair_problems):
        if found:
            indices = ", ".join(str(i) for i, _ in found[:_MAX_REPORTED])
            raise FembError(
                f"{task.bin_path}: {len(found):,} image(s) do not decode, indices {indices} "
                f"(image {found[0][0]}: {found[0][1]})"
            )


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def convert(
    src: Path,
    out: Path,
    shard_size_mb: float = 256.0,
    workers: int = 0,
    verify: bool = False,
    progress: bool | None = None,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> dict:
    """Convert SRC (train.rec/.idx/property, *.bin) to Parquet shards + pair files + manifest in OUT; the manifest.

    `shard_size_mb` is the target shard size in MiB; `workers` the shards written at once (threads)
    or verified at once (processes), 0 for one per core; `verify` decodes every image before
    writing; `progress` shows a tqdm bar in images (None: only on a terminal); `row_group_rows`
    caps a Parquet row group (the loader's shuffle unit).
    """
    src, out = Path(src), Path(out)
    if not shard_size_mb > 0:
        raise FembError(f"--shard-size-mb must be positive, got {shard_size_mb}")
    if workers < 0:
        raise FembError(f"--workers must be 0 (one per core) or more, got {workers}")
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
            "format": FORMAT,
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
        pair_counts = _check_bins(src, bins)
        shard_tasks = _plan_shards(
            records, spans, out, fingerprint, shard_size_mb * (1 << 20), row_group_rows
        )
        pair_tasks = [
            PairTask(
                str(path),
                str(out),
                f"{path.stem}.parquet",
                {
                    "format": FORMAT,
                    "fingerprint": fingerprint,
                    "file": f"{path.stem}.parquet",
                    "source": path.name,
                    "pairs": pair_counts[path.stem],
                },
            )
            for path in bins
        ]
        if verify:
            _verify(shard_tasks, pair_tasks, records.image_size, workers, progress)
        if current is not None:  # a finished output now verified: only the manifest changes
            current = {**current, "verified": True}
            _write_json(out / MANIFEST, current)
            return current

        out.mkdir(parents=True, exist_ok=True)
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        reuse = {t.file for t in [*shard_tasks, *pair_tasks] if finished.get(t.file) == t.meta}
        todo_shards = [t for t in shard_tasks if t.file not in reuse]
        todo_pairs = [t for t in pair_tasks if t.file not in reuse]
        total = sum(t.meta["rows"] for t in shard_tasks)
        try:
            with tqdm(total=total, unit="img", desc="convert", disable=_disable(progress)) as bar:
                bar.update(sum(t.meta["rows"] for t in shard_tasks if t.file in reuse))
                written = _run(_write_shard, todo_shards, workers, bar)
                written += _run(_write_pairs, todo_pairs, workers, bar)
        except BaseException:
            for entry in out.iterdir():
                if _TEMP_NAME.fullmatch(entry.name):
                    entry.unlink(missing_ok=True)
            raise
        results = {r["file"]: r for r in written}
        for t in shard_tasks:
            if t.file in reuse:
                results[t.file] = {
                    **_file_sha256(out / t.file),
                    **{k: t.meta[k] for k in ("rows", "first_key", "last_key")},
                }
        for t in pair_tasks:
            if t.file in reuse:
                results[t.file] = {**_file_sha256(out / t.file), "pairs": t.meta["pairs"]}
        planned = {t.file for t in [*shard_tasks, *pair_tasks]}
        for name in set(finished) - planned:  # ours, same source, another plan (e.g. another shard size)
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
        _write_json(out / MANIFEST, manifest)
        return manifest
