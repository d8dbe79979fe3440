"""femb.data.recordio against files mxnet wrote (tests/fixtures/make_mxnet_fixtures.py) and every error case."""

from __future__ import annotations

import errno
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from femb.data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    InsightFaceRecords,
    IRHeader,
    RecordReader,
    RecordWriter,
    frame_record,
    open_insightface,
    pack,
    unpack,
    write_insightface,
)
from femb.errors import FembError

FIXTURES = Path(__file__).parent / "fixtures" / "mxnet"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
READBACK = json.loads((FIXTURES / "femb_readback.json").read_text())


def sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def write_dataset(
    directory: Path, records: list[tuple[int, IRHeader, bytes]], prop: str = "3,112,112"
) -> InsightFaceRecords:
    directory.mkdir(parents=True, exist_ok=True)
    with RecordWriter(directory / "train.rec", directory / "train.idx") as writer:
        for key, header, image in records:
            writer.write(key, pack(header, image))
    (directory / "property").write_text(prop)
    return InsightFaceRecords(directory)


def header_dataset(directory: Path, labels: list[int], prop: str = "3,112,112") -> InsightFaceRecords:
    n = len(labels)
    records = [(0, IRHeader(0, [n + 1.0, n + 1.0], 0, 0), b"")]
    records += [(k + 1, IRHeader(0, float(c), k + 1, 0), b"\xff\xd8img%d" % k) for k, c in enumerate(labels)]
    return write_dataset(directory, records, prop)


# ---------------------------------------------------------------- mxnet compatibility


@pytest.mark.parametrize("case", EXPECTED["pack"], ids=lambda c: str(c["label"]))
def test_pack_is_byte_identical_to_mxnet_pack(case: dict) -> None:
    header = IRHeader(case["flag"], case["label"], case["id"], case["id2"])
    assert pack(header, bytes.fromhex(case["payload_hex"])).hex() == case["packed_hex"]


@pytest.mark.parametrize("case", EXPECTED["pack"], ids=lambda c: str(c["label"]))
def test_unpack_recovers_header_and_payload_of_mxnet_pack(case: dict) -> None:
    header, payload = unpack(bytes.fromhex(case["packed_hex"]))
    assert bytes(payload) == bytes.fromhex(case["payload_hex"])
    assert (header.id, header.id2) == (case["id"], case["id2"])
    if isinstance(case["label"], list):
        assert header.flag == len(case["label"])
        assert header.label.dtype == np.float32
        assert header.label.tolist() == case["label"]
    else:
        assert header.flag == 0
        assert header.label == case["label"]


def test_reader_reads_every_mxnet_record_by_key() -> None:
    payloads = {int(k): bytes.fromhex(v) for k, v in EXPECTED["raw"]["payloads_hex"].items()}
    with RecordReader(FIXTURES / "raw.rec", FIXTURES / "raw.idx") as reader:
        assert reader.keys == sorted(payloads)
        for key, payload in payloads.items():
            assert reader.read(key) == payload


def test_writer_framing_is_byte_identical_to_mxnet(tmp_path: Path) -> None:
    payloads = {int(k): bytes.fromhex(v) for k, v in EXPECTED["raw"]["payloads_hex"].items()}
    with RecordWriter(tmp_path / "raw.rec", tmp_path / "raw.idx") as writer:
        for key, payload in payloads.items():
            writer.write(key, payload)
    assert (tmp_path / "raw.rec").read_bytes() == (FIXTURES / "raw.rec").read_bytes()
    assert (tmp_path / "raw.idx").read_bytes() == (FIXTURES / "raw.idx").read_bytes()


def test_scan_without_idx_yields_every_record_at_its_idx_offset() -> None:
    payloads = [bytes.fromhex(v) for v in EXPECTED["raw"]["payloads_hex"].values()]
    with RecordReader(FIXTURES / "raw.rec", FIXTURES / "raw.idx") as indexed:
        offsets = indexed.index[1].tolist()
    with RecordReader(FIXTURES / "raw.rec") as reader:
        scanned = list(reader.scan())
    assert [offset for offset, _ in scanned] == offsets
    assert [payload for _, payload in scanned] == payloads


def test_reader_joins_multipart_record_written_by_mxnet() -> None:
    expected = {r["key"]: r for r in EXPECTED["multipart"]["records"]}
    with RecordReader(FIXTURES / "multipart" / "train.rec", FIXTURES / "multipart" / "train.idx") as reader:
        for key, record in expected.items():
            payload = reader.read(key)
            assert sha(payload) == record["payload_sha256"]
        assert reader.read(1).count(MAGIC_BYTES) == 3  # the embedded magics are restored


def test_mxnet_reads_back_exactly_what_femb_writes(tmp_path: Path) -> None:
    assert READBACK["mxnet_sequential_matches"] is True
    assert all(READBACK["mxnet_read_idx_matches"].values())
    assert len(READBACK["mxnet_read_idx_matches"]) == len(READBACK["payloads_hex"])
    assert all(h["image_matches"] for h in READBACK["mxnet_unpack_of_femb_pack"])
    assert [h["label"] for h in READBACK["mxnet_unpack_of_femb_pack"]] == [4.0, [2.0, 0.5], [7.0, 9.0]]
    # Today's writer must still produce the files mxnet checked, byte for byte.
    with RecordWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as writer:
        for i, payload in enumerate(READBACK["payloads_hex"]):
            writer.write(READBACK["first_key"] + i, bytes.fromhex(payload))
    assert sha((tmp_path / "ours.rec").read_bytes()) == READBACK["rec_sha256"]
    assert sha((tmp_path / "ours.idx").read_bytes()) == READBACK["idx_sha256"]


@pytest.mark.parametrize("name", ["insightface", "flat", "multipart"])
def test_insightface_view_of_mxnet_dataset_gives_keys_labels_and_image_bytes(name: str) -> None:
    expected = EXPECTED[name]
    by_key = {r["key"]: r for r in expected["records"]}
    with open_insightface(FIXTURES / name) as dataset:
        assert dataset.layout == ("header" if name == "insightface" else "flat")
        assert dataset.image_keys.tolist() == expected["image_keys"]
        assert dataset.num_classes == int(expected["property"].split(",")[0])
        assert dataset.image_size == (8, 8)
        spans = dataset.spans()
        data = (FIXTURES / name / "train.rec").read_bytes()
        for i, key in enumerate(spans.keys.tolist()):
            assert spans.labels[i] == expected["classes"][str(key)] == dataset.label(key)
            assert sha(dataset.image(key)) == by_key[key]["image_sha256"]
            if spans.starts[i] >= 0:
                assert (
                    sha(data[spans.starts[i] : spans.starts[i] + spans.lengths[i]])
                    == by_key[key]["image_sha256"]
                )
            assert spans.lengths[i] == by_key[key]["image_len"]


def test_spans_mark_only_multipart_records_as_not_contiguous() -> None:
    with InsightFaceRecords(FIXTURES / "multipart") as dataset:
        assert (dataset.spans().starts < 0).tolist() == [False, True, True, False]


# ---------------------------------------------------------------- writer


def test_frame_record_splits_only_at_aligned_magic() -> None:
    framed = frame_record(b"ab" + MAGIC_BYTES + b"cd")  # magic at offset 2: not aligned, one part
    assert struct.unpack_from("<II", framed) == (MAGIC, 8)
    framed = frame_record(b"abcd" + MAGIC_BYTES + b"e")
    first, second = struct.unpack_from("<II", framed), struct.unpack_from("<II", framed, 12)
    assert first == (MAGIC, (1 << 29) | 4)
    assert second == (MAGIC, (3 << 29) | 1)
    assert len(framed) == 24


def test_writer_leaves_nothing_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
        writer.write(0, b"partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_uses_temporary_names_until_close(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx")
    writer.write(5, b"x" * 10)
    assert not (tmp_path / "a.rec").exists() and not (tmp_path / "a.idx").exists()
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "a.rec"]
    assert (tmp_path / "a.idx").read_text() == "5\t0\n"


def test_write_insightface_writes_header_images_identity_ranges_and_property(tmp_path: Path) -> None:
    labels = [0, 0, 0, 1, 3, 3]  # class 2 has no images: an empty key range
    images = [b"\xff\xd8img%d" % i for i in range(len(labels))]
    assert write_insightface(tmp_path, labels, iter(images), (96, 112)) == {"num_images": 6, "num_classes": 4}
    assert (tmp_path / "property").read_text() == "4,96,112"
    with RecordReader(tmp_path / "train.rec", tmp_path / "train.idx") as reader:
        assert reader.keys == list(range(6 + 1 + 4))
        header, rest = unpack(reader.read(0))
        assert (header.flag, header.label.tolist(), len(rest)) == (2, [7.0, 11.0], 0)
        ranges = [unpack(reader.read(7 + c))[0].label.tolist() for c in range(4)]
        assert ranges == [[1.0, 4.0], [4.0, 5.0], [5.0, 5.0], [5.0, 7.0]]
    with InsightFaceRecords(tmp_path) as dataset:
        assert dataset.layout == "header" and dataset.image_size == (96, 112)
        assert dataset.spans().labels.tolist() == labels
        assert [dataset.image(k) for k in range(1, 7)] == images


def test_write_insightface_refuses_unsorted_labels_or_a_wrong_image_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-decreasing"):
        write_insightface(tmp_path, [1, 0], [b"a", b"b"], 112)
    for images in ([b"a"], [b"a", b"b", b"c"]):
        with pytest.raises(ValueError, match="2 labels"):
            write_insightface(tmp_path, [0, 1], images, 112)
    assert list(tmp_path.iterdir()) == []  # the .rec and .idx were under temporary names


def test_spans_fast_path_agrees_with_per_record_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    records = [(0, IRHeader(0, [2.0, 1.5], 0, 0), b"\xff\xd8" + rng.bytes(37))]
    for key in range(1, 40):
        image = b"\xff\xd8" + rng.bytes(int(rng.integers(1, 90)))
        if key % 7 == 0:
            image = image[:2] + b"xx" + MAGIC_BYTES + image  # payload offset 24+4: aligned magic, multi-part
        label = float(key % 3) if key % 2 else [float(key % 3), 9.0, 1.0]
        records.append((key, IRHeader(0, label, key, 0), image))
    dataset = write_dataset(tmp_path / "d", records)
    assert dataset.layout == "flat"
    spans = dataset.spans()
    assert (spans.starts < 0).sum() == 5
    data = (tmp_path / "d" / "train.rec").read_bytes()
    for i, (key, _, image) in enumerate(records):
        assert spans.keys[i] == key
        assert spans.labels[i] == dataset.label(key) == (2 if key == 0 else key % 3)
        assert dataset.image(key) == image
        if spans.starts[i] >= 0:
            assert data[spans.starts[i] : spans.starts[i] + spans.lengths[i]] == image


# ---------------------------------------------------------------- errors


def test_bad_magic_names_file_key_and_offset(tmp_path: Path) -> None:
    dataset = header_dataset(tmp_path / "d", [0, 1, 2])
    offset = dataset.reader.offset(2)
    dataset.close()
    rec = tmp_path / "d" / "train.rec"
    data = bytearray(rec.read_bytes())
    data[offset : offset + 4] = b"JUNK"
    rec.write_bytes(bytes(data))
    with InsightFaceRecords(tmp_path / "d") as dataset, pytest.raises(FembError) as excinfo:
        dataset.spans()
    message = one_line_error(excinfo)
    assert str(rec) in message and f"record 2 at offset {offset:,}" in message and "bad magic" in message
    with (
        RecordReader(rec, tmp_path / "d" / "train.idx") as reader,
        pytest.raises(FembError, match="bad magic"),
    ):
        reader.read(2)


def test_truncated_record_says_how_many_bytes_are_missing(tmp_path: Path) -> None:
    header_dataset(tmp_path / "d", [0, 1, 2]).close()
    rec = tmp_path / "d" / "train.rec"
    data = rec.read_bytes()
    # the last record (key 3) holds 24 + 6 bytes of payload, padded to 32: cut 10 bytes => 8 payload bytes short
    rec.write_bytes(data[:-10])
    with RecordReader(rec, tmp_path / "d" / "train.idx") as reader:
        offset = reader.offset(3)
        with pytest.raises(FembError) as excinfo:
            reader.read(3)
    message = one_line_error(excinfo)
    assert f"{rec}: record 3 at offset {offset:,} is truncated (file ends 8 bytes early)" == message
    with (
        InsightFaceRecords(tmp_path / "d") as dataset,
        pytest.raises(FembError, match="record 3 .* truncated"),
    ):
        dataset.spans()


def test_truncated_frame_header_is_reported(tmp_path: Path) -> None:
    rec = tmp_path / "a.rec"
    rec.write_bytes(frame_record(b"abcd") + MAGIC_BYTES[:3])
    with (
        RecordReader(rec) as reader,
        pytest.raises(FembError, match=r"offset 12 is truncated \(file ends 5 bytes"),
    ):
        list(reader.scan())


def test_scan_without_idx_reports_garbage_after_the_last_record(tmp_path: Path) -> None:
    rec = tmp_path / "a.rec"
    rec.write_bytes(frame_record(b"abcd") + b"garbage!")
    with RecordReader(rec) as reader, pytest.raises(FembError) as excinfo:
        list(reader.scan())
    assert "record at offset 12 has bad magic" in one_line_error(excinfo)


def test_idx_offset_past_end_of_file_is_refused_on_open(tmp_path: Path) -> None:
    header_dataset(tmp_path / "d", [0, 1]).close()
    idx = tmp_path / "d" / "train.idx"
    idx.write_text(idx.read_text() + "9\t999999\n")
    with pytest.raises(FembError) as excinfo:
        RecordReader(tmp_path / "d" / "train.rec", idx)
    message = one_line_error(excinfo)
    assert str(idx) in message and "key 9" in message and "999,999" in message and "past the end" in message


@pytest.mark.parametrize("line", ["3\tabc", "3 48", "3\t48\t1", "x", "3\t4.5", "3\t48x"])
def test_malformed_idx_line_is_named_by_number(tmp_path: Path, line: str) -> None:
    header_dataset(tmp_path / "d", [0, 1]).close()
    idx = tmp_path / "d" / "train.idx"
    idx.write_text(idx.read_text() + line + "\n")
    with pytest.raises(FembError) as excinfo:
        RecordReader(tmp_path / "d" / "train.rec", idx)
    assert f"{idx}: line 4 is malformed" in one_line_error(excinfo)


def test_duplicate_idx_key_is_refused(tmp_path: Path) -> None:
    header_dataset(tmp_path / "d", [0, 1]).close()
    idx = tmp_path / "d" / "train.idx"
    idx.write_text(idx.read_text() + "1\t0\n")
    with pytest.raises(FembError, match="key 1 appears on more than one line"):
        RecordReader(tmp_path / "d" / "train.rec", idx)


def test_idx_with_crlf_and_blank_lines_still_parses(tmp_path: Path) -> None:
    header_dataset(tmp_path / "d", [0, 1]).close()
    idx = tmp_path / "d" / "train.idx"
    idx.write_text(idx.read_text().replace("\n", "\r\n") + "\r\n")
    with RecordReader(tmp_path / "d" / "train.rec", idx) as reader:
        assert reader.keys == [0, 1, 2]


@pytest.mark.parametrize("missing", ["train.rec", "train.idx", "property"])
def test_missing_dataset_file_is_named(tmp_path: Path, missing: str) -> None:
    header_dataset(tmp_path / "d", [0, 1]).close()
    (tmp_path / "d" / missing).unlink()
    with pytest.raises(FembError) as excinfo:
        InsightFaceRecords(tmp_path / "d")
    assert one_line_error(excinfo).startswith(f"{tmp_path / 'd' / missing}: missing")


@pytest.mark.parametrize("text", ["3,112", "three,112,112", "0,112,112", ""])
def test_malformed_property_is_refused(tmp_path: Path, text: str) -> None:
    header_dataset(tmp_path / "d", [0, 1]).close()
    (tmp_path / "d" / "property").write_text(text)
    with pytest.raises(FembError, match="property: expected 'num_classes,height,width'"):
        InsightFaceRecords(tmp_path / "d")


@pytest.mark.parametrize("label", [3, -1])
def test_label_outside_num_classes_names_the_record(tmp_path: Path, label: int) -> None:
    with header_dataset(tmp_path / "d", [0, label, 1]) as dataset, pytest.raises(FembError) as excinfo:
        dataset.spans()
    message = one_line_error(excinfo)
    assert f"record 2 at offset {dataset.reader.offset(2):,} has label {label}" in message
    assert "[0, 3)" in message


def test_fractional_label_is_refused(tmp_path: Path) -> None:
    records = [(0, IRHeader(0, 1.5, 0, 0), b"\xff\xd8x")]
    with write_dataset(tmp_path / "d", records) as dataset, pytest.raises(FembError, match="has label 1.5"):
        dataset.spans()


def test_reader_refuses_a_directory_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(FembError) as excinfo:
        RecordReader(tmp_path)
    assert one_line_error(excinfo).startswith(f"{tmp_path}: cannot be read")


def test_record_shorter_than_irheader_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    with RecordWriter(directory / "train.rec", directory / "train.idx") as writer:
        writer.write(0, pack(IRHeader(0, 1.0, 0, 0), b"\xff\xd8image"))
        writer.write(1, b"\xff\xd8short")
    (directory / "property").write_text("3,112,112")
    with InsightFaceRecords(directory) as dataset, pytest.raises(FembError) as excinfo:
        dataset.spans()
    assert "record 1 at offset 40: record of 7 bytes is shorter than the 24-byte IRHeader" in one_line_error(
        excinfo
    )


@pytest.mark.parametrize("label", [float("nan"), 0.0, 1e30, 2.5])
def test_header_record_with_impossible_image_count_is_refused(tmp_path: Path, label: float) -> None:
    records = [(0, IRHeader(0, [label, 6.0], 0, 0), b""), (1, IRHeader(0, 0.0, 0, 0), b"img")]
    with pytest.raises(FembError) as excinfo:
        write_dataset(tmp_path / "d", records)
    assert "train.rec: record 0 at offset 0 is a header with label" in one_line_error(excinfo)


def test_header_announcing_keys_missing_from_idx_is_refused(tmp_path: Path) -> None:
    records = [(0, IRHeader(0, [3.0, 6.0], 0, 0), b""), (1, IRHeader(0, 0.0, 0, 0), b"img")]
    records.append((4, IRHeader(0, 0.0, 0, 0), b"img"))
    with pytest.raises(FembError, match="train.idx: has no key 2"):
        write_dataset(tmp_path / "d", records)


def test_writev_after_a_short_write_keeps_every_byte_up_to_the_limit_then_raises(tmp_path: Path) -> None:
    """A write cut short by a file-size limit (real EFBIG) keeps every byte before the limit, then raises."""
    script = f"""
import os, resource, signal
from femb.data.recordio import _writev_all
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
views = [bytes([i % 251]) * 100 for i in range(3000)]
fd = os.open({str(tmp_path / "out")!r}, os.O_WRONLY | os.O_CREAT)
try:
    _writev_all(fd, views)
except OSError as err:
    print(err.errno)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(errno.EFBIG)
    expected = b"".join(bytes([i % 251]) * 100 for i in range(3000))[:150_000]
    assert (tmp_path / "out").read_bytes() == expected
