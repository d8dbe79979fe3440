"""femb convert: RecordIO + .bin -> Parquet shards, pair files and manifest (docs/architecture.md "Parquet shards")."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from femb.data import parquet
from femb.data.binfile import read_bin, write_bin
from femb.data.convert import convert, source_fingerprint
from femb.data.recordio import InsightFaceRecords, IRHeader, RecordWriter, pack, write_insightface
from femb.errors import FembError
from femb.io import temp_path

REPO = Path(__file__).resolve().parent.parent
MXNET_FIXTURES = Path(__file__).parent / "fixtures" / "mxnet"


def jpeg(rng: np.random.Generator, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=60
    )
    return buf.getvalue()


def make_source(
    directory: Path, classes: int = 4, per_class: int = 5, seed: int = 0, pairs: dict[str, int] | None = None
) -> dict[int, tuple[int, bytes]]:
    """An InsightFace-layout dataset of tiny JPEGs (header record 0, identity records) and .bin pair sets."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    images = {1 + i: (i // per_class, jpeg(rng)) for i in range(classes * per_class)}
    write_insightface(directory, [label for label, _ in images.values()], [i for _, i in images.values()], 16)
    for name, count in (pairs if pairs is not None else {"lfw": 3}).items():
        write_bin(
            directory / f"{name}.bin",
            [jpeg(rng) for _ in range(2 * count)],
            [i % 2 == 0 for i in range(count)],
        )
    return images


def read_shards(out: Path) -> tuple[list[int], list[int], list[bytes]]:
    keys, labels, images = [], [], []
    for entry in json.loads((out / "manifest.json").read_text())["shards"]:
        table = pq.read_table(out / entry["file"])
        keys += table["key"].to_pylist()
        labels += table["label"].to_pylist()
        images += table["image"].to_pylist()
    return keys, labels, images


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    """Each file's mtime and content hash."""
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(directory.iterdir())
    }


SMALL = {"shard_size_mb": 0.0015, "row_group_rows": 4, "workers": 1, "progress": False}


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[int, tuple[int, bytes]]]:
    src = tmp_path / "src"
    return src, make_source(src)


@pytest.fixture
def converted(tmp_path: Path, source: tuple[Path, dict]) -> tuple[Path, Path, dict, dict]:
    src, images = source
    out = tmp_path / "out"
    manifest = convert(src, out, **SMALL)
    return src, out, images, manifest


# ---------------------------------------------------------------- what a conversion writes


def test_convert_copies_image_bytes_and_labels_unchanged(converted: tuple) -> None:
    _, out, images, manifest = converted
    keys, labels, data = read_shards(out)
    assert keys == sorted(images)
    assert labels == [images[k][0] for k in keys]
    assert data == [images[k][1] for k in keys]
    assert len(manifest["shards"]) >= 3  # the tiny shard size splits the set


def test_shards_are_named_in_order_and_cover_contiguous_key_ranges(converted: tuple) -> None:
    _, out, _, manifest = converted
    count = len(manifest["shards"])
    assert [s["file"] for s in manifest["shards"]] == [
        f"train-{i:05d}-of-{count:05d}.parquet" for i in range(count)
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s["file"] for s in manifest["shards"]] + ["lfw.parquet", "manifest.json"]
    )


def test_shard_schema_stores_image_plain_uncompressed_without_dictionary(converted: tuple) -> None:
    _, out, _, manifest = converted
    for entry in manifest["shards"]:
        path = out / entry["file"]
        schema = pq.read_schema(path)
        assert [(f.name, str(f.type)) for f in schema] == [
            ("key", "int64"),
            ("label", "int64"),
            ("image", "binary"),
        ]
        metadata = pq.read_metadata(path)
        assert metadata.num_rows == entry["rows"]
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            assert group.num_rows <= 4
            image = group.column(2)
            assert image.path_in_schema == "image"
            assert image.compression == "UNCOMPRESSED"
            assert not image.has_dictionary_page
            assert not any("DICTIONARY" in e for e in image.encodings)
            assert not image.is_stats_set
            assert group.column(1).is_stats_set  # the loader reads the label range from statistics
        assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)][:-1] == [4] * (
            metadata.num_row_groups - 1
        )


def test_manifest_lists_counts_and_the_sha256_of_every_file(converted: tuple) -> None:
    src, out, images, manifest = converted
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["num_classes"] == 4
    assert manifest["num_images"] == len(images) == sum(s["rows"] for s in manifest["shards"])
    assert manifest["image_size"] == [16, 16]
    assert manifest["layout"] == "header"
    assert manifest["fingerprint"] == source_fingerprint(src, [src / "lfw.bin"])
    for entry in [*manifest["shards"], *manifest["pairs"].values()]:
        data = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
    assert manifest["pairs"]["lfw"]["file"] == "lfw.parquet"
    assert manifest["pairs"]["lfw"]["pairs"] == 3


def test_pair_file_keeps_the_bin_order(converted: tuple) -> None:
    src, out, _, _ = converted
    bins, same = read_bin(src / "lfw.bin")
    table = pq.read_table(out / "lfw.parquet")
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("left", "binary"),
        ("right", "binary"),
        ("is_same", "bool"),
    ]
    assert table["left"].to_pylist() == bins[0::2]
    assert table["right"].to_pylist() == bins[1::2]
    assert table["is_same"].to_pylist() == same
    column = pq.read_metadata(out / "lfw.parquet").row_group(0).column(0)
    assert column.compression == "UNCOMPRESSED" and not column.has_dictionary_page


def test_multipart_records_written_by_mxnet_convert_unchanged(tmp_path: Path) -> None:
    expected = json.loads((MXNET_FIXTURES / "expected.json").read_text())["multipart"]
    manifest = convert(MXNET_FIXTURES / "multipart", tmp_path / "out", workers=1, progress=False)
    keys, labels, data = read_shards(tmp_path / "out")
    assert keys == expected["image_keys"]
    assert labels == [expected["classes"][str(k)] for k in keys]
    by_key = {r["key"]: r["image_sha256"] for r in expected["records"]}
    assert [hashlib.sha256(d).hexdigest() for d in data] == [by_key[k] for k in keys]
    assert manifest["pairs"] == {}


def test_gathered_image_column_gives_the_same_files_as_views(
    converted: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _, _, manifest = converted
    monkeypatch.setattr(parquet, "_VIEWS", False)  # the path taken on pyarrow builds that cannot write views
    gathered = convert(src, tmp_path / "gathered", **SMALL)
    assert gathered["shards"] == manifest["shards"]


@pytest.mark.parametrize("span_limit", [None, 64], ids=["views-into-mmap", "gathered"])
def test_tiny_and_scattered_images_convert_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, span_limit: int | None
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    images = {key: rng.bytes(1 + key % 20) for key in range(40)}  # <= 12 bytes: stored inside Arrow views
    order = rng.permutation(40)  # file order differs from key order: a row group's bytes are scattered
    with RecordWriter(src / "train.rec", src / "train.idx") as writer:
        for key in order.tolist():
            writer.write(key, pack(IRHeader(0, [float(key % 2), 0.0], 0, 0), images[key]))
    (src / "property").write_text("2,16,16")
    if span_limit is not None:
        monkeypatch.setattr(parquet, "_VIEW_SPAN_LIMIT", span_limit)  # gather a row group's scattered bytes
    manifest = convert(src, tmp_path / "out", **SMALL)
    keys, labels, data = read_shards(tmp_path / "out")
    assert manifest["layout"] == "flat"
    assert keys == order.tolist()
    assert data == [images[k] for k in keys]
    assert labels == [k % 2 for k in keys]


def test_parallel_workers_write_the_same_files(converted: tuple, tmp_path: Path) -> None:
    src, _, _, manifest = converted
    parallel = convert(src, tmp_path / "parallel", **{**SMALL, "workers": 2})
    assert parallel["shards"] == manifest["shards"]
    assert parallel["pairs"] == manifest["pairs"]


def test_synth_dataset_converts(tmp_path: Path) -> None:
    synth = pytest.importorskip("femb.data.synth")
    summary = synth.synthesize(
        tmp_path / "synth",
        identities=3,
        images_per_identity=2,
        pairs=2,
        seed=1,
        loose_identities=0,
        ijb_subjects=0,
        progress=False,
    )
    manifest = convert(tmp_path / "synth", tmp_path / "out", workers=1, progress=False)
    records = InsightFaceRecords(tmp_path / "synth")
    assert manifest["num_images"] == len(records) == 6
    keys, labels, data = read_shards(tmp_path / "out")
    assert data == [records.image(k) for k in keys] and labels == [records.label(k) for k in keys]
    assert set(manifest["pairs"]) == {p.stem for p in (tmp_path / "synth").glob("*.bin")}
    assert summary  # synthesize reports what it wrote
    records.close()


# ---------------------------------------------------------------- reruns and resume


def test_rerun_over_finished_output_touches_nothing(converted: tuple) -> None:
    src, out, _, manifest = converted
    before = snapshot(out)
    assert convert(src, out, **SMALL) == manifest
    assert snapshot(out) == before


def test_resume_after_interruption_keeps_finished_shards_and_writes_the_rest(converted: tuple) -> None:
    src, out, _, manifest = converted
    before = snapshot(out)
    lost = manifest["shards"][1]["file"]
    (out / lost).unlink()
    (out / "manifest.json").unlink()
    temp_path(out / lost).write_bytes(b"PAR1 half a shard")
    resumed = convert(src, out, **SMALL)
    after = snapshot(out)
    assert resumed == manifest
    assert sorted(after) == sorted(before)  # the stray temporary is gone
    for name, (mtime, digest) in before.items():
        assert after[name][1] == digest
        if name not in (lost, "manifest.json"):
            assert after[name][0] == mtime  # reused, not rewritten


def test_new_shard_size_rewrites_and_removes_the_old_shards(converted: tuple) -> None:
    src, out, images, manifest = converted
    bigger = convert(src, out, **{**SMALL, "shard_size_mb": 1.0})
    assert len(bigger["shards"]) == 1 < len(manifest["shards"])
    assert sorted(p.name for p in out.iterdir()) == [
        "lfw.parquet",
        "manifest.json",
        "train-00000-of-00001.parquet",
    ]
    assert read_shards(out)[0] == sorted(images)


def test_verify_on_finished_output_only_marks_the_manifest(converted: tuple) -> None:
    src, out, _, manifest = converted
    shard_times = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in manifest["shards"]}
    verified = convert(src, out, **SMALL, verify=True)
    assert verified == {**manifest, "verified": True}
    assert {f: (out / f).stat().st_mtime_ns for f in shard_times} == shard_times


# ---------------------------------------------------------------- refusals: nothing written, nothing touched


def test_out_holding_foreign_files_is_refused_untouched(source: tuple, tmp_path: Path) -> None:
    src, _ = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data.parquet").write_bytes(b"not parquet")
    before = snapshot(out)
    with pytest.raises(FembError) as excinfo:
        convert(src, out, **SMALL)
    message = str(excinfo.value)
    assert (
        "\n" not in message
        and str(out / "data.parquet") in message
        and "not written by femb convert" in message
    )
    assert snapshot(out) == before


def test_out_of_another_source_is_refused_untouched(converted: tuple, tmp_path: Path) -> None:
    _, out, _, _ = converted
    other = tmp_path / "other"
    make_source(other, seed=1)
    before = snapshot(out)
    with pytest.raises(FembError, match=r"manifest.json: describes the conversion of another source"):
        convert(other, out, **SMALL)
    (out / "manifest.json").unlink()
    with pytest.raises(FembError, match=r"belongs to the conversion of another source"):
        convert(other, out, **SMALL)
    del before["manifest.json"]
    assert snapshot(out) == before


def corrupt_record(src: Path, key: int, how: str) -> int:
    """Damage record `key` of src/train.rec; its offset."""
    with InsightFaceRecords(src) as records:
        offset = records.reader.offset(key)
    rec = src / "train.rec"
    data = bytearray(rec.read_bytes())
    if how == "magic":
        data[offset : offset + 4] = b"XXXX"
    elif how == "truncate":
        data = data[: offset + 40]
    rec.write_bytes(bytes(data))
    return offset


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing idx", r"src/train.idx: missing"),
        ("missing property", r"src/property: missing"),
        ("bad magic", r"src/train.rec: record 7 at offset {offset:,} has bad magic"),
        (
            "truncated",
            r"src/train.rec: record 20 at offset {offset:,} is truncated \(file ends [\d,]+ bytes early\)",
        ),
        ("offset past end", r"src/train.idx: key 99 points at offset 10,000,000, past the end"),
        (
            "label out of range",
            r"src/train.rec: record 16 at offset [\d,]+ has label 3, not a class in \[0, 3\) as property says; 5 such",
        ),
        ("bad bin", r"src/lfw.bin: not a .bin verification set"),
        ("empty", r"src/train.idx: the dataset holds no images"),
    ],
)
def test_bad_source_is_refused_before_anything_is_written(tmp_path: Path, damage: str, expected: str) -> None:
    src = tmp_path / "src"
    make_source(src)
    offset = 0
    if damage == "missing idx":
        (src / "train.idx").unlink()
    elif damage == "missing property":
        (src / "property").unlink()
    elif damage == "bad magic":
        offset = corrupt_record(src, 7, "magic")
    elif damage == "truncated":  # cut into the last image record, after dropping the identity records
        (src / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in _idx(src) if k <= 20))
        offset = corrupt_record(src, 20, "truncate")
    elif damage == "offset past end":
        (src / "train.idx").write_text((src / "train.idx").read_text() + "99\t10000000\n")
    elif damage == "label out of range":
        (src / "property").write_text("3,16,16")
    elif damage == "bad bin":
        (src / "lfw.bin").write_bytes(b"\x80\x04garbage")
    elif damage == "empty":
        (src / "train.idx").write_text("")
    out = tmp_path / "out"
    with pytest.raises(FembError) as excinfo:
        convert(src, out, **SMALL)
    message = str(excinfo.value)
    assert "\n" not in message
    assert _search(expected.format(offset=offset), message)
    assert not out.exists()


def _idx(src: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split("\t"))) for line in (src / "train.idx").read_text().splitlines()]  # type: ignore[misc]


def _search(pattern: str, message: str) -> bool:
    import re

    if re.search(pattern, message) is None:
        pytest.fail(f"{pattern!r} not in {message!r}")
    return True


@pytest.mark.parametrize("workers", [1, 2])
def test_verify_names_the_keys_of_images_that_do_not_decode(tmp_path: Path, workers: int) -> None:
    src = tmp_path / "src"
    images = make_source(src)
    broken = [image[: len(image) // 2] if key in (3, 9) else image for key, (_, image) in images.items()]
    write_insightface(src, [label for label, _ in images.values()], broken, 16)  # keys 3 and 9 corrupt
    convert(src, tmp_path / "unverified", **SMALL)  # without verify the bytes are copied as they are
    with pytest.raises(FembError) as excinfo:
        convert(src, tmp_path / "out", **{**SMALL, "workers": workers}, verify=True)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{src / 'train.rec'}: 2 image(s) do not decode, keys 3, 9 (key 3: ")
    assert not (tmp_path / "out").exists()


def test_verify_refuses_an_image_of_another_size_than_property_says(tmp_path: Path) -> None:
    src = tmp_path / "src"
    images = make_source(src)
    resized = [
        jpeg(np.random.default_rng(key), 20) if key == 5 else image for key, (_, image) in images.items()
    ]
    write_insightface(src, [label for label, _ in images.values()], resized, 16)
    with pytest.raises(FembError) as excinfo:
        convert(src, tmp_path / "out", **SMALL, verify=True)
    assert str(excinfo.value).endswith("keys 5 (key 5: image is 20x20, expected 16x16)")


def test_verify_accepts_good_images_and_records_it(source: tuple, tmp_path: Path) -> None:
    src, _ = source
    assert convert(src, tmp_path / "out", **SMALL, verify=True)["verified"] is True


def test_bad_arguments_are_refused(source: tuple, tmp_path: Path) -> None:
    src, _ = source
    with pytest.raises(FembError, match="^shard_size_mb must be positive"):
        convert(src, tmp_path / "out", shard_size_mb=0)
    with pytest.raises(FembError, match="^workers must be 0"):
        convert(src, tmp_path / "out", workers=-1)
    with pytest.raises(FembError, match="no such directory"):
        convert(tmp_path / "nowhere", tmp_path / "out")


# ---------------------------------------------------------------- the command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "femb", "convert", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_cli_missing_property_exits_1_with_one_line(source: tuple, tmp_path: Path) -> None:
    src, _ = source
    (src / "property").unlink()
    result = run_cli(str(src), str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"femb convert: {src / 'property'}: missing (an InsightFace dataset needs train.rec, train.idx and property)"
    ]


def test_cli_bad_bin_exits_1_with_one_line(source: tuple, tmp_path: Path) -> None:
    src, _ = source
    (src / "lfw.bin").write_bytes(b"not a pickle")
    result = run_cli(str(src), str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"femb convert: {src / 'lfw.bin'}: ")
    assert not (tmp_path / "out").exists()


def test_cli_converts_and_reports_counts(source: tuple, tmp_path: Path) -> None:
    src, images = source
    result = run_cli(str(src), str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert f"{len(images)} images of 4 identities in 1 shard(s), 1 pair set(s)" in result.stdout


def test_cli_names_its_own_flag_in_an_argument_error(source: tuple, tmp_path: Path) -> None:
    src, _ = source
    result = run_cli(str(src), str(tmp_path / "out"), "--shard-size-mb", "0")
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["femb convert: --shard-size-mb must be positive, got 0.0"]
    assert not (tmp_path / "out").exists()


def test_pair_set_named_like_a_train_shard_is_refused_before_writing(source: tuple, tmp_path: Path) -> None:
    src, _ = source
    (src / "lfw.bin").rename(src / "train-hard.bin")
    with pytest.raises(FembError, match="train-hard.bin: a pair set named train-"):
        convert(src, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()
