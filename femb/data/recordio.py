"""dmlc RecordIO (the .rec/.idx files of mxnet and InsightFace; docs/architecture.md "RecordIO"), without mxnet.

Framing (dmlc-core `recordio.h`): each part is `uint32 magic 0xced7230a`, `uint32 lrecord`
(`cflag = lrecord >> 29`, `length = lrecord & (2**29 - 1)`), `length` payload bytes, zero padding
to 4 bytes. A payload holding the magic at a 4-byte-aligned position is split there: cflag 1/2/3
mark the first/middle/last part, the magic itself is dropped and restored by the reader. The .idx
holds one `key\\toffset` line per record. A payload starts with mxnet's `IRHeader` (`<IfQQ`: flag,
label, id, id2); `flag > 0` means `flag` float32 labels follow and form the label.
"""

from __future__ import annotations

import mmap
import numbers
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np

from femb.errors import FembError, short_repr
from femb.io import atomic_path, named_os_error, write_text, write_to

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
IR_FORMAT = struct.Struct("<IfQQ")
IR_SIZE = IR_FORMAT.size  # 24
_FRAME = struct.Struct("<II")
_IOV_MAX = 1024  # buffers one os.writev takes (Linux IOV_MAX)
MAX_CLASSES = 1 << 24  # IRHeader labels are float32: every class id below this is exact


class IRHeader(NamedTuple):
    """mxnet's image-record header: `label` is a float, or the float32 array of `flag` labels."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Prefix `payload` with its IRHeader exactly as `mxnet.recordio.pack` does (array label => flag=size)."""
    flag, label, ident, ident2 = header
    if isinstance(label, numbers.Number):
        return IR_FORMAT.pack(0, float(label), ident, ident2) + bytes(payload)
    labels = np.asarray(label, dtype="<f4")
    return IR_FORMAT.pack(labels.size, 0.0, ident, ident2) + labels.tobytes() + bytes(payload)


def unpack(record: bytes | memoryview) -> tuple[IRHeader, bytes | memoryview]:
    """Split a record payload into its IRHeader and the bytes after it, as `mxnet.recordio.unpack` does."""
    if len(record) < IR_SIZE:
        raise FembError(f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, ident, ident2 = IR_FORMAT.unpack_from(record, 0)
    if flag == 0:
        return IRHeader(flag, label, ident, ident2), record[IR_SIZE:]
    end = IR_SIZE + 4 * flag
    if end > len(record):
        raise FembError(
            f"record of {len(record)} bytes is too short for the {flag} labels its IRHeader announces"
        )
    labels = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_SIZE)
    return IRHeader(flag, labels, ident, ident2), record[end:]


def frame_record(payload: bytes | memoryview) -> bytes:
    """Frame one payload as dmlc's `RecordIOWriter::WriteRecord` does: split around aligned magics, pad to 4."""
    data = memoryview(payload).cast("B")
    size = len(data)
    if size >= 1 << 29:
        raise FembError(f"a RecordIO record holds at most {1 << 29:,} bytes, got {size:,}")
    aligned = size & ~3
    cuts = np.flatnonzero(np.frombuffer(data[:aligned], dtype="<u4") == MAGIC) * 4 if aligned else []
    pieces: list[bytes | memoryview] = []
    start = 0
    for cut in cuts:
        cut = int(cut)
        pieces += [_FRAME.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (cut - start)), data[start:cut]]
        start = cut + 4
    pieces += [_FRAME.pack(MAGIC, ((3 if start else 0) << 29) | (size - start)), data[start:]]
    pieces.append(b"\0" * (-size & 3))
    return b"".join(pieces)


def _parse_idx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys and offsets of a `key\\toffset` .idx file (vectorised; the line loop runs only to name an error)."""
    data = path.read_bytes()
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    raw = np.frombuffer(data, dtype=np.uint8)
    tabs, newlines = np.flatnonzero(raw == 9), np.flatnonzero(raw == 10)
    one_tab_per_line = tabs.size == lines and np.array_equal(
        np.searchsorted(newlines, tabs), np.arange(lines)
    )
    digits_only = bool(np.isin(raw, np.frombuffer(b"0123456789-\t\r\n", dtype=np.uint8)).all())
    if one_tab_per_line and digits_only:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy < 2.3 warns on unparsable text, newer ones raise
                values = np.fromstring(data.replace(b"\t", b" "), dtype=np.int64, sep=" ")
        except ValueError:
            values = np.zeros(0, dtype=np.int64)
        if values.size == 2 * lines:
            return values[0::2].copy(), values[1::2].copy()
    keys: list[int] = []
    offsets: list[int] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(b"\t")
        try:
            key, offset = (int(field) for field in fields)
        except ValueError:
            raise FembError(
                f"{path}: line {number} is malformed: expected 'key<TAB>offset', got {line[:60]!r}"
            ) from None
        keys.append(key)
        offsets.append(offset)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


class RecordReader:
    """Random access to a .rec through its .idx over one mmap (nothing is read until asked), or a scan."""

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        except FileNotFoundError:
            raise FembError(f"{self.path}: no such file") from None
        except OSError as err:
            raise FembError(f"{self.path}: cannot be read ({err.strerror})") from None
        self.size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        self._keys = np.zeros(0, dtype=np.int64)
        self._offsets = np.zeros(0, dtype=np.int64)
        self._sorted_keys = self._sorted_rows = self._keys
        if self.idx_path is not None:
            try:
                self._load_index(self.idx_path)
            except BaseException:
                self.close()
                raise

    def _load_index(self, idx_path: Path) -> None:
        if not idx_path.is_file():
            raise FembError(f"{idx_path}: no such file")
        keys, offsets = _parse_idx(idx_path)
        bad = np.flatnonzero((offsets < 0) | (offsets >= self.size))
        if bad.size:
            i = int(bad[0])
            raise FembError(
                f"{idx_path}: key {keys[i]} points at offset {offsets[i]:,}, past the end of "
                f"{self.path} ({self.size:,} bytes); {bad.size:,} such line(s): is this the .idx of this .rec?"
            )
        unique, first, counts = np.unique(keys, return_index=True, return_counts=True)
        if unique.size != keys.size:
            dup = int(unique[np.argmax(counts > 1)])
            raise FembError(f"{idx_path}: key {dup} appears on more than one line")
        self._keys, self._offsets = keys, offsets
        self._sorted_keys, self._sorted_rows = unique, first

    @property
    def keys(self) -> list[int]:
        """The .idx keys in file order (as `MXIndexedRecordIO.keys`)."""
        return self._keys.tolist()

    @property
    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """The .idx as two int64 arrays (keys, offsets), in file order."""
        return self._keys, self._offsets

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """Offsets of many keys at once; FembError naming the first key missing from the .idx."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.searchsorted(self._sorted_keys, keys)
        found = pos < self._sorted_keys.size
        found[found] = self._sorted_keys[pos[found]] == keys[found]
        if not found.all():
            raise FembError(f"{self.idx_path}: has no key {int(keys[np.argmin(found)])}")
        return self._offsets[self._sorted_rows[pos]]

    def offset(self, key: int) -> int:
        """Byte offset of `key`'s record in the .rec."""
        if self.idx_path is None:
            raise FembError(f"{self.path}: opened without an .idx, so records cannot be read by key")
        return int(self.offsets_of(np.asarray([key]))[0])

    def read(self, key: int) -> bytes:
        """The payload of record `key` (multi-part records joined, embedded magics restored)."""
        return self.read_at(self.offset(key), key=key)[0]

    def read_at(self, offset: int, key: int | None = None) -> tuple[bytes, int]:
        """The payload of the record starting at `offset`, and the offset of the record after it."""
        where = f"record {key} at offset {offset:,}" if key is not None else f"record at offset {offset:,}"
        parts: list[bytes] = []
        pos = offset
        while True:
            if pos + 8 > self.size:
                raise FembError(
                    f"{self.path}: {where} is truncated (file ends {pos + 8 - self.size:,} bytes early)"
                )
            magic, lrecord = _FRAME.unpack_from(self._map, pos)  # type: ignore[arg-type]
            if magic != MAGIC:
                found = f"part at offset {pos:,}" if pos != offset else "it"
                raise FembError(
                    f"{self.path}: {where} has bad magic (0x{magic:08x} in {found}, expected 0x{MAGIC:08x})"
                )
            cflag, length = lrecord >> 29, lrecord & LENGTH_MASK
            end = pos + 8 + length
            if end > self.size:
                raise FembError(
                    f"{self.path}: {where} is truncated (file ends {end - self.size:,} bytes early)"
                )
            expected = (0, 1) if not parts else (2, 3)
            if cflag not in expected:
                raise FembError(
                    f"{self.path}: {where} has continuation flag {cflag} in the part at offset {pos:,}, "
                    f"expected one of {expected} (the .idx may point into the middle of a record)"
                )
            parts.append(self._map[pos + 8 : end])  # type: ignore[index]
            pos = end + (-length & 3)
            if cflag in (0, 3):
                return MAGIC_BYTES.join(parts), pos

    def bytes_at(self, start: int, length: int) -> bytes:
        """`length` raw bytes of the file from `start` (e.g. an image span from `InsightFaceRecords.spans`)."""
        if start < 0 or length < 0 or start + length > self.size:
            raise FembError(
                f"{self.path}: bytes {start:,}..{start + length:,} lie outside the file ({self.size:,} bytes)"
            )
        return self._map[start : start + length] if length else b""  # type: ignore[index]

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """Every record in file order as (offset, payload), without the .idx."""
        pos = 0
        while pos < self.size:
            payload, after = self.read_at(pos)
            yield pos, payload
            pos = after

    def close(self) -> None:
        """Release the mmap and the file."""
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def record_image(reader: RecordReader, offset: int) -> bytes:
    """The bytes after the IRHeader of the record at `offset` (joined: a multi-part image is not contiguous)."""
    payload, _ = reader.read_at(offset)
    return bytes(unpack(payload)[1])


def _writev_all(fd: int, views: Sequence[bytes | memoryview]) -> None:
    """Write `views` back to back to `fd` with os.writev, `_IOV_MAX` buffers a call."""
    for first in range(0, len(views), _IOV_MAX):
        batch = views[first : first + _IOV_MAX]
        written = os.writev(fd, batch)
        if written < sum(memoryview(v).nbytes for v in batch):  # short (a signal, a full disk): the rest
            rest = memoryview(b"".join(batch))[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]


class _Aborted(Exception):
    """Handed to the writer's atomic paths when it is aborted, so that they drop their temporaries."""


class RecordWriter:
    """Write a .rec/.idx pair mxnet can read (dmlc framing), under `femb.io` temporary names renamed on close."""

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]):
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._outputs = ExitStack()  # the two femb.io atomic paths: renamed on close, removed on abort
        rec_tmp = self._outputs.enter_context(atomic_path(self.rec_path, sync=False))
        idx_tmp = self._outputs.enter_context(atomic_path(self.idx_path, sync=False))
        self._rec = open(rec_tmp, "wb")  # noqa: SIM115 (closed by close()/abort())
        self._idx = open(idx_tmp, "w", encoding="ascii")  # noqa: SIM115
        self._pos = 0

    def write(self, key: int, payload: bytes | memoryview) -> None:
        """Append one record (a full payload, e.g. from `pack`) and its `key\\toffset` line."""
        framed = frame_record(payload)
        write_to(self._idx, f"{int(key)}\t{self._pos}\n", self.idx_path)
        write_to(self._rec, framed, self.rec_path)
        self._pos += len(framed)

    def write_framed(
        self, keys: np.ndarray, lengths: np.ndarray, framed: bytes | memoryview | Sequence[memoryview]
    ) -> None:
        """Append records already framed (`frame_record` outputs back to back, `lengths` bytes each) and their .idx lines.

        `framed` is any buffer (bytes, a memoryview, a pyarrow Buffer), written as it is, or a sequence
        of buffers that together hold the records (e.g. slices of a mapped file), written with writev.
        """
        keys = np.asarray(keys, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        gathered = isinstance(framed, (list, tuple))
        size = sum(memoryview(v).nbytes for v in framed) if gathered else memoryview(framed).nbytes
        if keys.shape != lengths.shape or int(lengths.sum()) != size:
            raise ValueError(f"{keys.size} keys and {int(lengths.sum())} framed bytes for a block of {size}")
        lines = np.empty(2 * keys.size, dtype=np.int64)
        lines[0::2] = keys
        lines[1::2] = self._pos + np.cumsum(lengths) - lengths
        write_to(self._idx, "%d\t%d\n" * keys.size % tuple(lines.tolist()), self.idx_path)
        if gathered:
            try:
                self._rec.flush()  # what `write` buffered goes first
                _writev_all(self._rec.fileno(), framed)
            except OSError as err:
                named = named_os_error(err, self.rec_path)
                if named is err:
                    raise
                raise named from err
        else:
            write_to(self._rec, framed, self.rec_path)
        self._pos += size

    def tell(self) -> int:
        """Offset the next record will start at."""
        return self._pos

    def close(self) -> None:
        """Finish both files and move them to their final names."""
        if self._rec.closed and self._idx.closed:
            return
        for file, path in ((self._rec, self.rec_path), (self._idx, self.idx_path)):
            try:
                file.close()  # flushes the buffer: where a full disk shows
            except OSError as err:
                self.abort()
                named = named_os_error(err, path)
                if named is err:
                    raise
                raise named from err
        self._outputs.close()

    def abort(self) -> None:
        """Drop what was written: remove both temporary files (even when closing them fails, as on a full disk)."""
        try:
            for file in (self._rec, self._idx):
                with suppress(OSError):  # the error being handled already says what went wrong
                    file.close()
        finally:  # the atomic paths see a failure: nothing is renamed
            self._outputs.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ImageSpans(NamedTuple):
    """Where the image bytes of a run of records lie: `starts[i] == -1` marks a multi-part record."""

    keys: np.ndarray  # int64 record keys
    labels: np.ndarray  # int64 class of each image (label[0] of an array label)
    offsets: np.ndarray  # int64 record offsets in the .rec
    starts: np.ndarray  # int64 file offset of the image bytes, -1 when they are not contiguous
    lengths: np.ndarray  # int64 image byte counts


class InsightFaceRecords:
    """An InsightFace training set (`train.rec`, `train.idx`, `property`): its classes, image keys, labels, bytes.

    Layout (arcface_torch `MXFaceDataset`): when record 0 has `flag > 0` and no image bytes, its label
    `[N+1, M]` says images are keys 1..N (keys N+1..M-1 are identity ranges, skipped); otherwise
    every .idx key is an image ("flat" layout) and an array label's first value is the class.
    """

    def __init__(self, src_dir: str | os.PathLike[str]):
        self.src = Path(src_dir)
        self.rec_path, self.idx_path = self.src / "train.rec", self.src / "train.idx"
        self.property_path = self.src / "property"
        for path in (self.rec_path, self.idx_path, self.property_path):
            if not path.is_file():
                raise FembError(
                    f"{path}: missing (an InsightFace dataset needs train.rec, train.idx and property)"
                )
        self.num_classes, height, width = self._read_property(self.property_path)
        self.image_size = (height, width)
        self.reader = RecordReader(self.rec_path, self.idx_path)
        try:
            self.layout, self.image_keys = self._detect_layout()
        except BaseException:
            self.reader.close()
            raise

    @staticmethod
    def _read_property(path: Path) -> tuple[int, int, int]:
        text = path.read_text(encoding="ascii", errors="replace").strip()
        try:
            values = tuple(int(field) for field in text.split(","))
        except ValueError:
            values = ()
        if len(values) != 3 or min(values) <= 0:
            raise FembError(
                f"{path}: expected 'num_classes,height,width' (three positive integers), got {short_repr(text)}"
            )
        if values[0] > MAX_CLASSES:
            raise FembError(
                f"{path}: says {values[0]:,} classes, but RecordIO labels are float32, exact for at most "
                f"{MAX_CLASSES:,} classes (2^24); correct the class count (the largest label + 1)"
            )
        return values  # type: ignore[return-value]

    def _detect_layout(self) -> tuple[str, np.ndarray]:
        keys, _ = self.reader.index
        if not (keys == 0).any():
            return "flat", keys
        offset = self.reader.offset(0)
        header, rest = self._unpack(self.reader.read(0), 0, offset)
        if header.flag == 0 or len(rest):
            return "flat", keys
        labels = np.asarray(header.label, dtype=np.float64)
        first = float(labels[0])
        if not (np.isfinite(first) and first == int(first) and 1 <= first <= keys.size):
            raise FembError(
                f"{self.rec_path}: record 0 at offset {offset:,} is a header with label {labels.tolist()}, "
                f"expected [N+1, M] with 0 <= N < {keys.size} (the records in {self.idx_path.name})"
            )
        image_keys = np.arange(1, int(first), dtype=np.int64)
        self.reader.offsets_of(image_keys)  # every announced image must be in the .idx
        return "header", image_keys

    def __len__(self) -> int:
        return int(self.image_keys.size)

    def spans(self, start: int = 0, stop: int | None = None) -> ImageSpans:
        """Labels and image byte spans of images `start:stop` (by position in `image_keys`), vectorised.

        Every record is checked (magic, truncation, IRHeader, labels in [0, num_classes)); records
        that fail the fast check or are multi-part go through the per-record path, which names the
        key and offset of a bad one.
        """
        keys = self.image_keys[start:stop]
        offsets = self.reader.offsets_of(keys)
        size, n = self.reader.size, keys.size
        starts = np.full(n, -1, dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        labels = np.zeros(n, dtype=np.float64)
        ok = (offsets % 4 == 0) & (offsets + 8 + IR_SIZE <= size)
        if n and self.reader._map is not None:
            words = np.frombuffer(self.reader._map, dtype="<u4", count=size // 4)
            floats = words.view("<f4")
            rows = np.flatnonzero(ok)
            at = offsets[rows] // 4
            lrecord = words[at + 1].astype(np.int64)
            length = lrecord & LENGTH_MASK
            flag = words[at + 2].astype(np.int64)
            good = (
                (words[at] == MAGIC)
                & (lrecord >> 29 == 0)
                & (offsets[rows] + 8 + length <= size)
                & (length >= IR_SIZE + 4 * flag)
            )
            rows, at, length, flag = rows[good], at[good], length[good], flag[good]
            ok[:] = False
            ok[rows] = True
            labels[rows] = floats[np.where(flag > 0, at + 8, at + 3)]
            starts[rows] = offsets[rows] + 8 + IR_SIZE + 4 * flag
            lengths[rows] = length - IR_SIZE - 4 * flag
            del words, floats
        for row in np.flatnonzero(~ok):
            key, offset = int(keys[row]), int(offsets[row])
            payload, _ = self.reader.read_at(offset, key=key)
            header, image = self._unpack(payload, key, offset)
            labels[row] = np.asarray(header.label).flat[0] if header.flag else header.label
            lengths[row] = len(image)
            _, lrecord = _FRAME.unpack_from(self.reader._map, offset)  # type: ignore[arg-type]
            if lrecord >> 29 == 0:  # single-part: the image bytes are contiguous in the file
                starts[row] = offset + 8 + len(payload) - len(image)
        with np.errstate(invalid="ignore"):
            classes = labels.astype(np.int64)
        bad = np.flatnonzero((classes != labels) | (classes < 0) | (classes >= self.num_classes))
        if bad.size:
            row = int(bad[0])
            raise FembError(
                f"{self.rec_path}: record {keys[row]} at offset {offsets[row]:,} has label {labels[row]:g}, "
                f"not a class in [0, {self.num_classes}) as {self.property_path.name} says; "
                f"{bad.size:,} such record(s)"
            )
        empty = np.flatnonzero(lengths == 0)
        if empty.size:
            row = int(empty[0])
            raise FembError(
                f"{self.rec_path}: record {keys[row]} at offset {offsets[row]:,} holds no image bytes; "
                f"{empty.size:,} such record(s)"
            )
        return ImageSpans(keys, classes, offsets, starts, lengths)

    def _unpack(self, payload: bytes, key: int, offset: int) -> tuple[IRHeader, bytes | memoryview]:
        try:
            return unpack(payload)
        except FembError as err:
            raise FembError(f"{self.rec_path}: record {key} at offset {offset:,}: {err}") from None

    def record(self, key: int) -> tuple[IRHeader, bytes]:
        """The IRHeader and the image bytes of record `key`."""
        header, image = self._unpack(self.reader.read(key), key, self.reader.offset(key))
        return header, bytes(image)

    def label(self, key: int) -> int:
        """The class of image `key` (label[0] of an array label)."""
        header = self.record(key)[0]
        return int(np.asarray(header.label).flat[0]) if header.flag else int(header.label)

    def image(self, key: int) -> bytes:
        """The encoded image bytes of record `key`, unchanged."""
        return self.record(key)[1]

    def close(self) -> None:
        """Release the underlying reader."""
        self.reader.close()

    def __enter__(self) -> InsightFaceRecords:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_insightface(src_dir: str | os.PathLike[str]) -> InsightFaceRecords:
    """Open an InsightFace training directory (train.rec, train.idx, property)."""
    return InsightFaceRecords(src_dir)


def write_insightface(
    out_dir: str | os.PathLike[str],
    labels: Sequence[int] | np.ndarray,
    images: Iterable[bytes],
    image_size: int | tuple[int, int],
) -> dict[str, int]:
    """Write `train.rec`, `train.idx` and `property` in InsightFace's layout; the image and class counts.

    `images` (consumed as it is written) are labelled `labels`, which must not decrease, so that each
    class is one run of keys. Record 0 is the header `[N+1, M]`, records 1..N the images, records
    N+1..M-1 one `[start, end)` key range per class (docs/architecture.md "RecordIO"); every file is
    written under a temporary name and renamed when complete.
    """
    out_dir = Path(out_dir)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or (labels.size and (labels[0] < 0 or (np.diff(labels) < 0).any())):
        raise ValueError("labels must be a non-decreasing run of class ids from 0")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    num_images = int(labels.size)
    num_classes = int(labels[-1]) + 1 if num_images else 0
    bounds = 1 + np.searchsorted(labels, np.arange(num_classes + 1))  # class c: keys [bounds[c], bounds[c+1])
    out_dir.mkdir(parents=True, exist_ok=True)
    with RecordWriter(out_dir / "train.rec", out_dir / "train.idx") as writer:
        writer.write(0, pack(IRHeader(2, [num_images + 1, num_images + 1 + num_classes], 0, 0), b""))
        stream, key = iter(images), 0
        for key, (label, image) in enumerate(zip(labels.tolist(), stream), start=1):
            writer.write(key, pack(IRHeader(0, float(label), key, 0), image))
        if key != num_images or next(stream, None) is not None:
            raise ValueError(f"{num_images} labels but another number of images")
        for c in range(num_classes):
            key = num_images + 1 + c
            writer.write(key, pack(IRHeader(2, [int(bounds[c]), int(bounds[c + 1])], key, 0), b""))
    write_text(out_dir / "property", f"{num_classes},{height},{width}")
    return {"num_images": num_images, "num_classes": num_classes}
