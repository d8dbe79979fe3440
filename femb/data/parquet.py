"""Writing the Parquet files of a shard directory (docs/architecture.md "Parquet shards", "Pair files").

A train shard's image bytes go from the mmap of train.rec to Parquet pages through Arrow binary-view
arrays that point into the mapping (a gathered copy on pyarrow builds that cannot write views). Image
columns are stored PLAIN, uncompressed, without dictionary or statistics, so a file is the encoded
images plus a few bytes per row and the write runs near disk speed; its sha256 is taken on the way
out. Every file carries its task's `meta` in the footer (`layout.FOOTER_KEY`), which is how a later
run recognises a finished file.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from femb.data import layout
from femb.data.binfile import read_bin
from femb.data.recordio import ImageSpans, RecordReader, record_image
from femb.io import atomic_path
from femb.parallel import Report, report_progress

ROW_GROUP_ROWS = 2048  # ~15 MB of 112x112 JPEGs: the unit the loader shuffles, several fit its buffer
ROW_GROUP_MAX_BYTES = 256 << 20  # a row group's image bytes (keeps Arrow int32 offsets far from overflow)
_VIEW_SPAN_LIMIT = (1 << 31) - 1  # Arrow view offsets are int32: a row group's bytes must lie this close
_VIEWS: bool | None = None  # whether this pyarrow writes binary views, once asked


@dataclass
class ShardTask:
    """One train shard: which images go in it and where their bytes lie in train.rec."""

    rec_path: str
    out_dir: str
    file: str
    spans: ImageSpans
    row_groups: list[int]  # row-group boundaries within the shard: [0, ..., rows]
    meta: dict  # the footer's entry, also how a finished file is recognised on resume


@dataclass
class PairTask:
    """One .bin pair set -> OUT/<name>.parquet."""

    bin_path: str
    out_dir: str
    file: str
    meta: dict


def split_by_bytes(lengths: np.ndarray, parts: int) -> np.ndarray:
    """Boundaries [0, ..., n] cutting rows into `parts` runs of about equal byte size."""
    cumulative = np.cumsum(lengths)
    targets = cumulative[-1] * np.arange(1, parts) / parts
    inner = np.searchsorted(cumulative, targets, side="left") + 1
    return np.unique(np.concatenate([[0], inner, [lengths.size]]))


def row_group_bounds(lengths: np.ndarray, max_rows: int) -> list[int]:
    """Boundaries of row groups of at most `max_rows` rows and ROW_GROUP_MAX_BYTES image bytes."""
    bounds, start, n = [0], 0, lengths.size
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    while start < n:
        by_bytes = int(np.searchsorted(cumulative, cumulative[start] + ROW_GROUP_MAX_BYTES, side="right")) - 1
        start = min(n, start + max_rows, max(by_bytes, start + 1))
        bounds.append(start)
    return bounds


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


def write_parquet(
    path: Path, schema: pa.Schema, write: Callable[[pq.ParquetWriter], None], meta: dict
) -> dict[str, Any]:
    """Write one Parquet file atomically, `meta` in its footer; its name, size and sha256.

    `write(writer)` writes the tables; columns named in `layout.IMAGE_COLUMNS` are stored PLAIN.
    """
    image_columns = [name for name in schema.names if name in layout.IMAGE_COLUMNS]
    other_columns = [name for name in schema.names if name not in layout.IMAGE_COLUMNS]
    footer = {layout.FOOTER_KEY.decode(): json.dumps(meta, sort_keys=True)}
    # The Arrow schema is left out (binary views would read back as binary_view, not binary) and the
    # footer entry added at the end; pyarrow < 17 cannot add one, but writes no views either.
    late_footer = hasattr(pq.ParquetWriter, "add_key_value_metadata")
    with atomic_path(path, sync=False) as tmp:  # shards are bulk data: no fsync per file, as `cp`
        sink = _HashingFile(tmp)
        try:
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
        finally:
            sink.close()
    return {"file": path.name, "bytes": sink.size, "sha256": sink.sha256.hexdigest()}


def read_footer(path: Path) -> dict | None:
    """The footer entry of a Parquet file `write_parquet` wrote, or None for any other file."""
    try:
        kv = pq.read_metadata(path).metadata or {}
        return json.loads(kv[layout.FOOTER_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None


def arrow_views() -> bool:
    """Whether this pyarrow writes binary-view columns to Parquet (Arrow >= 21); else images are gathered."""
    global _VIEWS
    if _VIEWS is None:
        try:
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table({"x": pa.array([b"0123456789abcdef"], pa.binary_view())}), sink)
            _VIEWS = True
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowInvalid, AttributeError):
            _VIEWS = False
    return _VIEWS


def _gather(mapped: pa.Buffer, starts: np.ndarray, lengths: np.ndarray) -> bytes:
    view = memoryview(mapped)  # type: ignore[arg-type]
    return b"".join(view[s : s + k] for s, k in zip(starts.tolist(), lengths.tolist()))


def _image_array(mapped: pa.Buffer, starts: np.ndarray, lengths: np.ndarray, extra: list[bytes]) -> pa.Array:
    """The image column of one row group: views into the mmap of train.rec (multi-part images from `extra`)."""
    n = starts.size
    inline = starts >= 0
    if not arrow_views():
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
            buffers.append(pa.py_buffer(_gather(mapped, starts[inline], lengths[inline])))
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


def write_shard(task: ShardTask, report: Report | None = None) -> dict[str, Any]:
    """Write one train shard, row group by row group, straight from the mmap of train.rec."""
    spans = task.spans
    image_type = pa.binary_view() if arrow_views() else pa.binary()
    schema = layout.SHARD_SCHEMA.set(
        layout.SHARD_SCHEMA.get_field_index("image"), pa.field("image", image_type)
    )
    mapped_file = pa.memory_map(task.rec_path, "r")
    mapped = mapped_file.read_buffer()
    reader = RecordReader(task.rec_path) if (spans.starts < 0).any() else None

    def write(writer: pq.ParquetWriter) -> None:
        for start, stop in zip(task.row_groups[:-1], task.row_groups[1:]):
            starts = spans.starts[start:stop]
            extra = [record_image(reader, int(o)) for o in spans.offsets[start:stop][starts < 0]]  # type: ignore[arg-type]
            images = _image_array(mapped, starts, spans.lengths[start:stop], extra)
            table = pa.Table.from_arrays(
                [pa.array(spans.keys[start:stop]), pa.array(spans.labels[start:stop]), images], schema=schema
            )
            writer.write_table(table, row_group_size=stop - start)
            report_progress(stop - start, report)

    try:
        result = write_parquet(Path(task.out_dir) / task.file, schema, write, task.meta)
    finally:
        if reader is not None:
            reader.close()
        mapped_file.close()
    return {**result, **{k: task.meta[k] for k in ("rows", "first_key", "last_key")}}


def write_pairs(task: PairTask, report: Report | None = None) -> dict[str, Any]:
    """Write one .bin pair set as OUT/<name>.parquet: left, right and is_same, in the .bin's order."""
    images, same = read_bin(Path(task.bin_path))
    table = pa.Table.from_arrays(
        [
            pa.array(images[0::2], pa.binary()),
            pa.array(images[1::2], pa.binary()),
            pa.array(same, pa.bool_()),
        ],
        schema=layout.PAIR_SCHEMA,
    )
    result = write_parquet(
        Path(task.out_dir) / task.file,
        layout.PAIR_SCHEMA,
        lambda w: w.write_table(table, row_group_size=ROW_GROUP_ROWS),
        task.meta,
    )
    return {**result, "pairs": len(same)}
