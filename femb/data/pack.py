"""`femb pack SHARDS OUT`: a shard directory back to InsightFace RecordIO (docs/architecture.md "Packing").

Plain, OUT gets InsightFace's header layout exactly as `recordio.write_insightface` writes it: record 0
`[N+1, N+1+C]`, images as keys 1..N with float labels (`IRHeader(0, label, key, 0)`), each identity's
images contiguous in label order, then one identity record `[start, end)` per class (keys N+1..N+C),
and `property` `C,H,W` from the manifest. A dataset that femb converted from such a file packs back
to the same bytes. Labels must be 0..C-1 with every class present: a gap is refused, naming the first
empty label (femb does not renumber identities, so labels keep meaning what the manifest says).

With `shuffle`, OUT gets what arcface_torch's `scripts/shuffle_rec.py` writes for DALI, whose
`readers.mxnet` reads records in file order (its `random_shuffle` only mixes a small buffer) and
would read header and identity records as images: no header or identity records, keys 0..N-1, image
`j` the image of plain key `perm[j] + 1` with `perm = numpy.random.default_rng(seed).permutation(N)`,
its IRHeader `(0, label, that plain key, 0)`. That is the flat layout, read by arcface_torch's
`MXFaceDataset` (record 0 has flag 0, so every key is an image) and by `femb convert`. Unlike
`shuffle_rec.py`, `property` is written too.

Pair sets (`SHARDS/<name>.parquet`) become `OUT/<name>.bin` (`binfile.write_bin`, what InsightFace's
`verification.load_bin` reads). Image bytes are never re-encoded.

Streaming: the label column is read first (to check the labels and plan the order), then the images
a row group at a time, by threads that decode `_PIECE_ROWS` rows at once (`iter_batches`, so a piece is
still in cache when it is framed) and frame them (Arrow joins header, image and padding in C++; one
scan of the framed words finds payloads that hold the RecordIO magic, which are reframed into parts)
while the main thread writes; memory holds a few row groups. The join costs one copy in cache, but
makes every payload start 4-byte aligned, so one aligned scan finds the magic: writing the Arrow
buffers with os.writev instead needs a scan per alignment phase, which measured slower. When the
output order is not the shard order (labels that decrease somewhere, or `shuffle`), the records are
framed in shard order into a scratch file inside the temporary output, then copied into train.rec in
output order with os.writev from a map of it (no copy in user space): one more write and read of the
data, and disk space for it, instead of reading row groups once per block.

OUT appears whole or not at all (`femb.io.atomic_dir`), with `femb-pack.json` recording the shards'
fingerprint (the manifest's, plus each shard's size and sha256 as listed) and the plan (layout,
seed, pair sets). A rerun with the same shards and plan is a no-op; the same shards with another
plan replace OUT; an OUT holding anything else (another dataset, foreign files) is refused untouched.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from femb.data import layout, recordio
from femb.data.binfile import write_bin
from femb.data.recordio import IR_SIZE, LENGTH_MASK, MAGIC, IRHeader, RecordWriter, frame_record
from femb.errors import FembError, short_text
from femb.io import atomic_dir, file_sha256, remove_temps
from femb.parallel import progress_bar

PACK_FORMAT = "femb-pack/1"
RECORD = "femb-pack.json"  # written last inside OUT: what was packed from what
_SPILL = "records.spill"  # the scratch file of the reordering pass, inside the temporary OUT
_THREADS = 2  # row groups read and framed at once (the work is memory-bound)
_WINDOW = 4  # framed row groups in flight (bounds memory: a few row groups)
_PIECE_ROWS = 512  # rows decoded, framed and written at once: ~4 MB, in cache, buffers the allocator reuses
_GATHER_ROWS = 1024  # records the reordering pass copies per os.writev (Linux IOV_MAX)
_MAX_IMAGE = LENGTH_MASK - IR_SIZE  # a RecordIO record's payload is below 2**29 bytes, IRHeader included
_IMAGE_WORDS = IR_SIZE // 4  # IRHeader (flag, label, id, id2) as uint32 words
_NO_SEPARATOR = pa.scalar(b"", pa.binary())
T = TypeVar("T")


@dataclass(frozen=True)
class _Batch:
    """One row group of one shard: rows `start .. start + rows` of the shards laid end to end."""

    path: Path
    row_group: int
    start: int
    rows: int


@dataclass
class _Source:
    """A shard directory as its manifest describes it, checked against the files."""

    directory: Path
    fingerprint: str
    num_classes: int
    image_size: tuple[int, int]
    shards: list[Path]
    batches: list[_Batch]
    pair_sets: dict[str, Path]
    pair_digests: dict[str, str]
    pair_counts: dict[str, int]


# ---------------------------------------------------------------- the shards


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_source(directory: Path) -> _Source:
    """The manifest, shards and pair sets of a shard directory; a FembError naming what does not fit."""
    if not directory.is_dir():
        raise FembError(
            f"{directory}: no such shard directory (write one with `femb convert SRC {directory}`)"
        )
    manifest = layout.read_manifest(directory)
    path = layout.manifest_path(directory)
    if manifest is None:
        raise FembError(
            f"{directory}: not a femb shard directory (no {layout.MANIFEST}; write one with "
            f"`femb convert SRC {directory}`)"
        )
    if manifest.get("format") != layout.FORMAT or not isinstance(manifest.get("fingerprint"), str):
        raise FembError(f"{path}: not a manifest of femb convert (format {manifest.get('format')!r})")
    num_classes = manifest.get("num_classes")
    if not _positive_int(num_classes):
        raise FembError(f"{path}: num_classes must be a positive integer, got {num_classes!r}")
    size = manifest.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(v) for v in size)):
        raise FembError(f"{path}: image_size must be [height, width] in pixels, got {size!r}")
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise FembError(f"{path}: shards must be a list of file entries")
    shards, batches, listed, start = [], [], [], 0
    for entry in entries:
        shard = directory / str(entry.get("file"))
        if not shard.is_file():
            raise FembError(f"{shard}: listed in {layout.MANIFEST} but missing; rerun `femb convert`")
        found = shard.stat().st_size
        if found != entry.get("bytes"):
            raise FembError(
                f"{shard}: {found:,} bytes, but {layout.MANIFEST} lists {entry.get('bytes')!r}: the shard "
                "changed after `femb convert`; rerun it"
            )
        metadata = _parquet_metadata(shard)
        _check_columns(shard, metadata.schema.to_arrow_schema(), layout.SHARD_SCHEMA)
        if metadata.num_rows != entry.get("rows"):
            raise FembError(
                f"{shard}: {metadata.num_rows:,} rows, but {layout.MANIFEST} lists {entry.get('rows')!r}"
            )
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if rows:
                batches.append(_Batch(shard, group, start, rows))
                start += rows
        shards.append(shard)
        listed.append([shard.name, found, entry.get("sha256")])
    if start != manifest.get("num_images"):
        raise FembError(
            f"{path}: num_images is {manifest.get('num_images')!r}, but the shards hold {start:,}"
        )
    if not start:
        raise FembError(f"{directory}: the shards hold no images")
    digests, counts, pair_sets = {}, {}, {}
    recorded = manifest.get("pairs") if isinstance(manifest.get("pairs"), dict) else {}
    for pair_file in layout.pair_set_files(directory):
        metadata = _parquet_metadata(pair_file)
        _check_columns(pair_file, metadata.schema.to_arrow_schema(), layout.PAIR_SCHEMA)
        if not metadata.num_rows:
            raise FembError(f"{pair_file}: the pair set holds no pairs (a .bin needs at least one)")
        name, entry = pair_file.stem, recorded.get(pair_file.stem)
        known = isinstance(entry, dict) and entry.get("file") == pair_file.name
        if known and entry.get("bytes") == pair_file.stat().st_size and isinstance(entry.get("sha256"), str):
            digests[name] = entry["sha256"]
        else:  # a pair set added after convert (`femb pairs`): small, hashed here
            digests[name] = file_sha256(pair_file)
        pair_sets[name], counts[name] = pair_file, metadata.num_rows
    identity = {
        "fingerprint": manifest["fingerprint"],
        "shards": listed,
        "num_classes": num_classes,
        "image_size": size,
    }
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return _Source(
        directory, fingerprint, num_classes, (size[0], size[1]), shards, batches, pair_sets, digests, counts
    )


def _parquet_metadata(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (OSError, pa.ArrowException) as err:
        raise FembError(f"{path}: not a readable Parquet file ({short_text(str(err), 300)})") from None


def _check_columns(path: Path, schema: pa.Schema, expected: pa.Schema) -> None:
    """Every column of `expected` present with a compatible type (binary of any offset width)."""
    for field in expected:
        index = schema.get_field_index(field.name)
        kind = schema.field(index).type if index >= 0 else None
        binary = pa.types.is_binary(field.type)
        if kind is None or not (
            kind == field.type or (binary and (pa.types.is_large_binary(kind) or kind == pa.binary_view()))
        ):
            wanted = ", ".join(f"{f.name} {f.type}" for f in expected)
            raise FembError(
                f"{path}: column '{field.name}' is {'missing' if kind is None else kind}; expected {wanted}"
            )


def _read_labels(source: _Source) -> np.ndarray:
    """Every image's label in shard order, checked: in [0, num_classes) and every class present."""
    parts, starts = [], []
    for shard in source.shards:
        try:
            column = pq.read_table(shard, columns=["label"]).column("label")
        except (OSError, pa.ArrowException) as err:
            raise FembError(
                f"{shard}: the label column cannot be read ({short_text(str(err), 300)})"
            ) from None
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise FembError(f"{shard}: row {row} has no label")
        starts.append(sum(p.size for p in parts))
        parts.append(column.to_numpy().astype(np.int64, copy=False))
    labels = np.concatenate(parts)
    bad = np.flatnonzero((labels < 0) | (labels >= source.num_classes))
    if bad.size:
        at = int(bad[0])
        shard = int(np.searchsorted(starts, at, side="right")) - 1
        raise FembError(
            f"{source.shards[shard]}: row {at - starts[shard]} has label {labels[at]}, outside "
            f"[0, {source.num_classes}) ({layout.MANIFEST} num_classes); {bad.size:,} such row(s)"
        )
    empty = np.flatnonzero(np.bincount(labels, minlength=source.num_classes) == 0)
    if empty.size:
        raise FembError(
            f"{source.directory}: label {int(empty[0])} has no images ({empty.size:,} of "
            f"{source.num_classes:,} labels are empty); InsightFace's identity records and property "
            "need labels 0..num_classes-1 without gaps, and femb pack does not renumber identities"
        )
    return labels


def _read_images(batch: _Batch) -> Iterator[tuple[int, pa.Array]]:
    """The image column of one row group, `_PIECE_ROWS` rows at a time: (first row in the group, binary array).

    Decoded piece by piece (`iter_batches`), so that each piece is still in cache when it is framed.
    """
    done = 0
    try:
        with pq.ParquetFile(batch.path, memory_map=True) as parquet:
            for part in parquet.iter_batches(
                _PIECE_ROWS, row_groups=[batch.row_group], columns=["image"], use_threads=False
            ):
                images = part.column(0)
                if images.type != pa.binary():
                    images = images.cast(pa.binary())
                if images.null_count:
                    row = done + int(np.flatnonzero(images.is_null().to_numpy(zero_copy_only=False))[0])
                    raise FembError(f"{batch.path}: row {row} of row group {batch.row_group} has no image")
                yield done, images
                done += len(images)
    except (OSError, pa.ArrowException) as err:
        raise FembError(
            f"{batch.path}: row group {batch.row_group} cannot be read ({short_text(str(err), 300)})"
        ) from None
    if done != batch.rows:
        raise FembError(f"{batch.path}: row group {batch.row_group} holds {done} rows, not {batch.rows}")


# ---------------------------------------------------------------- framing, many records at once


def _image_lengths(images: pa.Array) -> np.ndarray:
    offsets = np.frombuffer(
        images.buffers()[1], dtype=np.int32, count=len(images) + 1, offset=4 * images.offset
    )
    return np.diff(offsets).astype(np.int64)


def frame_many(prefix: np.ndarray, images: pa.Array | None = None) -> tuple[pa.Buffer | bytes, np.ndarray]:
    """dmlc framing of n records at once: record i's payload is the uint32 words `prefix[i]` then `images[i]`.

    Byte for byte what `recordio.frame_record` gives each payload (the records back to back), and their
    framed sizes. A payload that holds the magic at an aligned offset is found by one scan of the framed
    words and reframed by `frame_record` (cflag 1/2/3 parts).
    """
    n, words = prefix.shape
    lengths = np.zeros(n, dtype=np.int64) if images is None else _image_lengths(images)
    payload = 4 * words + lengths
    pads = -lengths & 3
    head = np.empty((n, 2 + words), dtype="<u4")
    head[:, 0] = MAGIC
    head[:, 1] = payload
    head[:, 2:] = prefix
    if images is None:
        framed: pa.Buffer | bytes = head.tobytes()
    else:
        heads = pa.Array.from_buffers(
            pa.binary(),
            n,
            [
                None,
                pa.py_buffer(np.arange(n + 1, dtype=np.int32) * (4 * (2 + words))),
                pa.py_buffer(head.ravel()),
            ],
        )
        pad_offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(pads, out=pad_offsets[1:])
        padding = pa.Array.from_buffers(
            pa.binary(), n, [None, pa.py_buffer(pad_offsets), pa.py_buffer(bytes(int(pad_offsets[-1])))]
        )
        framed = pc.binary_join_element_wise(heads, images, padding, _NO_SEPARATOR).buffers()[2]
    sizes = 8 + payload + pads
    scanned = np.frombuffer(framed, dtype="<u4")
    if np.count_nonzero(scanned == MAGIC) > n:  # each record starts with one; more lie inside payloads
        return _reframe(framed, sizes, scanned, prefix, images)
    return framed, sizes


def _reframe(
    framed: pa.Buffer | bytes,
    sizes: np.ndarray,
    scanned: np.ndarray,
    prefix: np.ndarray,
    images: pa.Array | None,
) -> tuple[bytes, np.ndarray]:
    """Reframe the records whose payload holds the magic at an aligned offset with `frame_record`."""
    ends = np.cumsum(sizes)
    begins = ends - sizes
    inner = np.setdiff1d(np.flatnonzero(scanned == MAGIC), begins // 4, assume_unique=True)
    rows = np.unique(np.searchsorted(begins // 4, inner, side="right") - 1)
    view = memoryview(framed).cast("B")
    sizes = sizes.copy()
    pieces: list[bytes | memoryview] = []
    at = 0
    for row in rows.tolist():
        payload = prefix[row].astype("<u4").tobytes() + (images[row].as_py() if images is not None else b"")
        piece = frame_record(payload)
        pieces += [view[at : begins[row]], piece]
        sizes[row] = len(piece)
        at = int(ends[row])
    pieces.append(view[at:])
    return b"".join(pieces), sizes


def _image_prefix(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """IRHeader(0, float(label), id, 0) of each image as uint32 words, as `recordio.pack` writes it."""
    prefix = np.zeros((labels.size, _IMAGE_WORDS), dtype="<u4")
    prefix[:, 1] = labels.astype("<f4").view("<u4")
    prefix[:, 2] = ids & 0xFFFFFFFF
    prefix[:, 3] = ids >> 32
    return prefix


def _identity_prefix(keys: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """IRHeader(2, [start, end), key, 0) of each identity record as uint32 words (label field 0.0)."""
    prefix = np.zeros((keys.size, _IMAGE_WORDS + 2), dtype="<u4")
    prefix[:, 0] = 2
    prefix[:, 2] = keys & 0xFFFFFFFF
    prefix[:, 3] = keys >> 32
    prefix[:, 6] = bounds[:-1].astype("<f4").view("<u4")
    prefix[:, 7] = bounds[1:].astype("<f4").view("<u4")
    return prefix


def _in_order(tasks: Sequence[Any], fn: Callable[[Any], T]) -> Iterator[T]:
    """`fn(task)` on `_THREADS` threads, results in task order, at most `_WINDOW` tasks ahead."""
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        queued = iter(tasks)
        pending = deque(pool.submit(fn, task) for task in islice(queued, _WINDOW))
        try:
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(fn, task) for task in islice(queued, 1))
                yield result
        finally:
            for future in pending:
                future.cancel()


# ---------------------------------------------------------------- writing


@dataclass
class _Order:
    """Where each image goes: `rows[j]` is the shard row of output image j (None: shard order)."""

    rows: np.ndarray | None
    keys: np.ndarray  # the key of output image j
    row_keys: np.ndarray  # the key of each shard row
    row_ids: np.ndarray  # the IRHeader id of each shard row


def _plan_order(labels: np.ndarray, shuffle: bool, seed: int) -> _Order:
    """Plain: keys 1..N in a stable sort by label. Shuffled: keys 0..N-1, image j the plain key `perm[j] + 1`."""
    n = labels.size
    plain_keys = np.arange(1, n + 1, dtype=np.int64)
    plain = None
    if n > 1 and (np.diff(labels) < 0).any():
        plain = np.argsort(labels, kind="stable")
        plain_keys[plain] = np.arange(1, n + 1)
    if not shuffle:
        return _Order(plain, np.arange(1, n + 1, dtype=np.int64), plain_keys, plain_keys)
    perm = np.random.default_rng(seed).permutation(n)
    order = perm if plain is None else plain[perm]
    row_keys = np.empty(n, dtype=np.int64)
    row_keys[order] = np.arange(n)
    return _Order(order, np.arange(n, dtype=np.int64), row_keys, plain_keys)


def _write_images(
    writer: RecordWriter, tmp: Path, source: _Source, labels: np.ndarray, order: _Order, bar: Any
) -> None:
    """The image records, in output order: streamed in shard order, or through a scratch file when reordered."""

    def frame(batch: _Batch) -> list[tuple[slice, pa.Buffer | bytes, np.ndarray]]:
        pieces = []
        for done, images in _read_images(batch):
            lengths = _image_lengths(images)
            if lengths.size and lengths.max() > _MAX_IMAGE:
                row = int(np.argmax(lengths))
                raise FembError(
                    f"{batch.path}: row {done + row} of row group {batch.row_group} holds a "
                    f"{lengths[row]:,}-byte image; a RecordIO record holds at most {_MAX_IMAGE:,}"
                )
            rows = slice(batch.start + done, batch.start + done + len(images))
            prefix = _image_prefix(labels[rows], order.row_ids[rows])
            pieces.append((rows, *frame_many(prefix, images)))
        return pieces

    if order.rows is None:
        for pieces in _in_order(source.batches, frame):
            for rows, framed, sizes in pieces:
                writer.write_framed(order.row_keys[rows], sizes, framed)
                bar.update(sizes.size)
        return
    spill = tmp / _SPILL
    offsets = np.zeros(labels.size, dtype=np.int64)
    row_sizes = np.zeros(labels.size, dtype=np.int64)
    with open(spill, "wb") as f:
        at = 0
        for pieces in _in_order(source.batches, frame):
            for rows, framed, sizes in pieces:
                offsets[rows] = at + np.cumsum(sizes) - sizes
                row_sizes[rows] = sizes
                f.write(framed)
                at += int(sizes.sum())
                bar.update(sizes.size)
    _gather(writer, spill, offsets[order.rows], row_sizes[order.rows], order.keys, bar)
    spill.unlink()


def _gather(
    writer: RecordWriter, spill: Path, offsets: np.ndarray, sizes: np.ndarray, keys: np.ndarray, bar: Any
) -> None:
    """Copy framed records from the scratch file into `writer`, record j from `offsets[j]`: writev from its map."""
    with open(spill, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view, parts = memoryview(mapped), []
        try:
            for j0 in range(0, sizes.size, _GATHER_ROWS):
                j1 = min(sizes.size, j0 + _GATHER_ROWS)
                starts, ends = offsets[j0:j1].tolist(), (offsets[j0:j1] + sizes[j0:j1]).tolist()
                parts[:] = [view[a:b] for a, b in zip(starts, ends)]
                writer.write_framed(keys[j0:j1], sizes[j0:j1], parts)
                bar.update(j1 - j0)
        finally:
            parts.clear()  # the slices go before the map closes, even when a traceback holds the list
            view.release()


def _write_pair_set(path: Path, out: Path) -> None:
    """One pair set (left, right, is_same) as an InsightFace .bin: images 2i and 2i+1 are pair i."""
    try:
        table = pq.read_table(path, columns=list(layout.PAIR_COLUMNS))
    except (OSError, pa.ArrowException) as err:
        raise FembError(f"{path}: cannot be read ({short_text(str(err), 300)})") from None
    for name in layout.PAIR_COLUMNS:
        if table.column(name).null_count:
            raise FembError(f"{path}: column '{name}' has empty rows")
    left, right = table.column("left").to_pylist(), table.column("right").to_pylist()
    bins = [image for pair in zip(left, right) for image in pair]
    write_bin(out, bins, table.column("is_same").to_pylist())


# ---------------------------------------------------------------- the output directory


def _inspect_out(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The record of an earlier pack of the same shards in OUT (None: OUT empty or absent); refuse the rest."""
    if out.exists() and not out.is_dir():
        raise FembError(f"{out}: exists and is not a directory")
    if not out.exists():
        return None
    record_path, record = out / RECORD, None
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise FembError(
                f"{record_path}: not a readable femb pack record ({short_text(str(err), 300)}); remove {out}"
            ) from None
        if not isinstance(record, dict) or record.get("format") != PACK_FORMAT:
            raise FembError(f"{record_path}: not a femb pack record; remove {out} or choose another output")
        if record.get("source") != fingerprint:
            raise FembError(
                f"{out}: holds the pack of other shards ({record.get('shards')}); remove it or choose "
                "another output directory"
            )
    ours = {RECORD, *(record.get("files", {}) if record else {})}
    for entry in sorted(out.iterdir()):
        if entry.name not in ours or not entry.is_file():
            raise FembError(
                f"{entry}: not written by femb pack; the output directory {out} must be empty or hold an "
                "earlier pack of the same shards"
            )
    return record


def _is_current(out: Path, record: dict[str, Any] | None, plan: dict[str, Any]) -> bool:
    """Whether OUT already holds this plan's pack, every file at its recorded size."""
    if record is None or record.get("plan") != plan or not isinstance(record.get("files"), dict):
        return False
    return all((out / n).is_file() and (out / n).stat().st_size == b for n, b in record["files"].items())


def _summary(out: Path, record: dict[str, Any], started: float, reused: bool) -> dict[str, Any]:
    plan = record["plan"]
    return {
        "out": str(out),
        "layout": plan["layout"],
        "num_images": record["num_images"],
        "num_classes": record["num_classes"],
        "image_size": record["image_size"],
        "pair_sets": sorted(plan["pair_sets"]),
        "shuffled": plan["layout"] == "flat",
        "seed": plan["seed"],
        "seconds": round(time.perf_counter() - started, 3),
        "reused": reused,
    }


# ---------------------------------------------------------------- pack


def pack(
    shards: Path, out: Path, shuffle: bool = False, seed: int = 0, progress: bool | None = None
) -> dict[str, Any]:
    """Write the shard directory `shards` as InsightFace `train.rec/.idx/property` and `<name>.bin` in `out`.

    Plain: the header layout, identities contiguous; `shuffle`: the flat, seeded-shuffled layout of
    arcface_torch's `shuffle_rec.py` that DALI reads (module doc). `progress` shows a bar (None: on a
    terminal). Returns out, layout, num_images, num_classes, image_size, pair_sets, shuffled, seed,
    seconds and reused (True when OUT already held this pack and nothing was written).
    """
    started = time.perf_counter()
    given = Path(out)
    shards, out = Path(shards), given.resolve()  # `x/..` or `.` name the directory they mean
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise FembError(f"seed must be a non-negative integer, got {seed!r}")
    source = _read_source(shards)
    plan = {
        "layout": "flat" if shuffle else "header",
        "seed": seed if shuffle else None,
        "pair_sets": source.pair_digests,
    }
    record = _inspect_out(out, source.fingerprint)
    if _is_current(out, record, plan):
        return _summary(given, record, started, reused=True)  # type: ignore[arg-type]
    labels = _read_labels(source)
    order = _plan_order(labels, shuffle, seed)
    n, classes = labels.size, source.num_classes
    height, width = source.image_size
    passes = 1 if order.rows is None else 2
    total = passes * n + 2 * sum(source.pair_counts.values())
    remove_temps(out.parent, [out.name])  # temporaries of an interrupted earlier pack
    with atomic_dir(out) as tmp, progress_bar(total, "pack", progress) as bar:
        with RecordWriter(tmp / "train.rec", tmp / "train.idx") as writer:
            if not shuffle:
                writer.write(0, recordio.pack(IRHeader(2, [n + 1, n + 1 + classes], 0, 0), b""))
            _write_images(writer, tmp, source, labels, order, bar)
            if not shuffle:
                bounds = 1 + np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=classes))])
                keys = np.arange(n + 1, n + 1 + classes, dtype=np.int64)
                framed, sizes = frame_many(_identity_prefix(keys, bounds))
                writer.write_framed(keys, sizes, framed)
        (tmp / "property").write_text(f"{classes},{height},{width}")  # inside atomic_dir: one rename for all
        for name, path in source.pair_sets.items():
            _write_pair_set(path, tmp / f"{name}.bin")
            bar.update(2 * source.pair_counts[name])
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        record = {
            "format": PACK_FORMAT,
            "source": source.fingerprint,
            "plan": plan,
            "shards": str(shards),
            "num_images": n,
            "num_classes": classes,
            "image_size": [height, width],
            "files": files,
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return _summary(given, record, started, reused=False)
