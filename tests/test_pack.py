"""femb pack: shards -> InsightFace train.rec/.idx/property and .bin (docs/architecture.md "Packing")."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from femb.cli import main
from femb.data import pack as pack_module
from femb.data.binfile import read_bin, write_bin
from femb.data.convert import convert
from femb.data.pack import frame_many, pack
from femb.data.recordio import (
    MAGIC_BYTES,
    InsightFaceRecords,
    IRHeader,
    RecordReader,
    RecordWriter,
    frame_record,
    unpack,
    write_insightface,
)
from femb.data.recordio import pack as pack_record
from femb.errors import FembError

MXNET_FIXTURES = Path(__file__).parent / "fixtures" / "mxnet"
FAST = {"shard_size_mb": 0.004, "row_group_rows": 4, "workers": 1, "progress": False}  # several shards


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jpeg(rng: np.random.Generator, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=60
    )
    return buf.getvalue()


def with_magic(image: bytes, at: int) -> bytes:
    """`image` with the RecordIO magic spliced in `at` bytes from its start (inside the JPEG's leading bytes)."""
    return image[:at] + MAGIC_BYTES + image[at:]


def dataset(directory: Path, labels: list[int], images: list[bytes], bins: dict | None = None) -> Path:
    """An InsightFace-layout source written by femb (header record, identity records) and its .bin sets."""
    write_insightface(directory, labels, images, 16)
    for name, (pair_images, same) in (bins or {}).items():
        write_bin(directory / f"{name}.bin", pair_images, same)
    return directory


def shards_of(tmp: Path, labels: list[int], images: list[bytes], bins: dict | None = None) -> Path:
    src = dataset(tmp / "src", labels, images, bins)
    convert(src, tmp / "shards", **FAST)
    return tmp / "shards"


def read_pack(out: Path) -> list[tuple[int, int, bytes]]:
    """(key, class, image bytes) of every image, as femb reads a RecordIO dataset."""
    with InsightFaceRecords(out) as records:
        return [(k, records.label(k), records.image(k)) for k in records.image_keys.tolist()]


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, sha(p.read_bytes())) for p in sorted(directory.iterdir())}


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, list[int], list[bytes]]:
    """Shards of 24 tiny JPEGs of 5 identities, one pair set; some images hold the magic, aligned or not."""
    rng = np.random.default_rng(0)
    labels = [c for c, size in enumerate((3, 4, 5, 6, 6)) for _ in range(size)]
    images = [jpeg(rng) for _ in labels]
    for i, at in enumerate((2, 3, 4, 5, 8, 9)):  # aligned (payload offset 24 + at) and not
        images[3 * i] = with_magic(images[3 * i], at)
    images[1] = images[1][:1]  # 1-, 2- and 3-byte images: every padding length
    images[2] = images[2][:2]
    images[4] = images[4][:3]
    bins = {"lfw": ([jpeg(rng) for _ in range(6)], [True, False, True])}
    return shards_of(tmp_path, labels, images, bins), labels, images


# ---------------------------------------------------------------- the header layout


def test_pack_writes_header_record_images_by_identity_and_identity_records(
    small: tuple, tmp_path: Path
) -> None:
    shards, labels, images = small
    summary = pack(shards, tmp_path / "out", progress=False)
    n, c = len(labels), 5
    assert {
        k: summary[k] for k in ("layout", "num_images", "num_classes", "pair_sets", "shuffled", "reused")
    } == {
        "layout": "header",
        "num_images": n,
        "num_classes": c,
        "pair_sets": ["lfw"],
        "shuffled": False,
        "reused": False,
    }
    with RecordReader(tmp_path / "out" / "train.rec", tmp_path / "out" / "train.idx") as reader:
        assert reader.keys == list(range(n + c + 1))  # header, images, identities, in file order
        _, offsets = reader.index
        assert (np.diff(offsets) > 0).all()
        header, rest = unpack(reader.read(0))
        assert header.flag == 2 and header.label.tolist() == [n + 1, n + 1 + c] and len(rest) == 0
        for key in range(1, n + 1):
            header, image = unpack(reader.read(key))
            assert (header.flag, header.label, header.id, header.id2) == (0, labels[key - 1], key, 0)
            assert bytes(image) == images[key - 1]
        starts = [1 + labels.index(k) for k in range(c)] + [n + 1]
        for k in range(c):
            header, rest = unpack(reader.read(n + 1 + k))
            assert header.label.tolist() == [starts[k], starts[k + 1]] and len(rest) == 0
        rec = (tmp_path / "out" / "train.rec").read_bytes()
        cflag = {key: struct.unpack_from("<I", rec, reader.offset(key) + 4)[0] >> 29 for key in (4, 7)}
        assert cflag == {
            4: 0,
            7: 1,
        }  # image 6's magic sits at payload offset 28: split there; image 3's at 27
        assert reader.read(7).count(MAGIC_BYTES) == 1  # and restored on read
    assert (tmp_path / "out" / "property").read_text() == f"{c},16,16"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "femb-pack.json",
        "lfw.bin",
        "property",
        "train.idx",
        "train.rec",
    ]


@pytest.mark.parametrize("piece_rows", [256, 3], ids=["whole-row-groups", "row-groups-in-pieces"])
def test_pack_of_a_femb_written_dataset_gives_back_its_files_byte_for_byte(
    small: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece_rows: int
) -> None:
    shards, _, _ = small
    src = shards.parent / "src"
    assert len(json.loads((shards / "manifest.json").read_text())["shards"]) >= 3  # and row groups of 4
    monkeypatch.setattr(pack_module, "_PIECE_ROWS", piece_rows)  # frame a row group in pieces of 3 rows
    pack(shards, tmp_path / "out", progress=False)
    for name in ("train.rec", "train.idx", "property", "lfw.bin"):
        assert sha((tmp_path / "out" / name).read_bytes()) == sha((src / name).read_bytes()), name


def test_synth_demo_round_trips_to_its_own_files(
    demo_source: Path, demo_shards: Path, tmp_path: Path
) -> None:
    pack(demo_shards, tmp_path / "out", progress=False)
    for name in ("train.rec", "train.idx", "property", "demo.bin", "demo_hard.bin"):
        assert sha((tmp_path / "out" / name).read_bytes()) == sha((demo_source / name).read_bytes()), name
    with open(tmp_path / "out" / "demo.bin", "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")  # InsightFace verification.load_bin; our own file
    assert (bins, issame) == read_bin(demo_source / "demo.bin")


def test_shards_out_of_label_order_are_packed_by_identity_keeping_shard_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 30).tolist()  # a flat .rec in this order: the shards are not sorted by label
    labels[:4] = [0, 1, 2, 3]
    images = [with_magic(jpeg(rng), 4) if i % 7 == 0 else jpeg(rng) for i in range(30)]
    (tmp_path / "flat").mkdir()
    with RecordWriter(tmp_path / "flat" / "train.rec", tmp_path / "flat" / "train.idx") as writer:
        for key, (label, image) in enumerate(zip(labels, images)):
            writer.write(key, pack_record(IRHeader(0, [float(label), 0.5], 0, 0), image))
    (tmp_path / "flat" / "property").write_text("4,16,16")
    convert(tmp_path / "flat", tmp_path / "shards", **FAST)
    summary = pack(tmp_path / "shards", tmp_path / "out", progress=False)
    order = np.argsort(labels, kind="stable")
    write_insightface(tmp_path / "expected", [labels[i] for i in order], [images[i] for i in order], 16)
    assert summary["layout"] == "header" and summary["num_images"] == 30
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "expected" / name).read_bytes(), name
    assert not list((tmp_path / "out").glob("*.spill"))


# ---------------------------------------------------------------- --shuffle


def shuffle_rec(plain: Path, out: Path, perm: np.ndarray) -> None:
    """arcface_torch scripts/shuffle_rec.py, with femb's reader and writer and a given permutation of 1..N."""
    out.mkdir()
    reader = RecordReader(plain / "train.rec", plain / "train.idx")
    with reader, RecordWriter(out / "train.rec", out / "train.idx") as writer:
        for count, idx in enumerate((perm + 1).tolist()):
            header, jpeg_bytes = unpack(reader.read(idx))
            label = header.label if header.flag == 0 else float(header.label[0])
            writer.write(count, pack_record(IRHeader(header.flag, label, header.id, header.id2), jpeg_bytes))


def test_shuffle_writes_what_shuffle_rec_py_makes_of_the_plain_pack(small: tuple, tmp_path: Path) -> None:
    shards, labels, _ = small
    pack(shards, tmp_path / "plain", progress=False)
    summary = pack(shards, tmp_path / "shuffled", shuffle=True, seed=3, progress=False)
    assert (summary["layout"], summary["shuffled"], summary["seed"]) == ("flat", True, 3)
    shuffle_rec(tmp_path / "plain", tmp_path / "official", np.random.default_rng(3).permutation(len(labels)))
    for name in ("train.rec", "train.idx"):
        assert (tmp_path / "shuffled" / name).read_bytes() == (tmp_path / "official" / name).read_bytes()
    assert (tmp_path / "shuffled" / "property").read_text() == "5,16,16"
    with InsightFaceRecords(tmp_path / "shuffled") as records:
        assert records.layout == "flat" and records.image_keys.tolist() == list(range(len(labels)))


def test_shuffle_is_a_seeded_permutation_that_convert_reads_back(small: tuple, tmp_path: Path) -> None:
    shards, labels, images = small
    runs = {name: tmp_path / name for name in ("a", "again", "other")}
    for name, seed in (("a", 3), ("again", 3), ("other", 4)):
        pack(shards, runs[name], shuffle=True, seed=seed, progress=False)
    a, again, other = (read_pack(runs[name]) for name in ("a", "again", "other"))
    assert a == again
    assert [image for _, _, image in a] != [image for _, _, image in other]
    expected = sorted(zip(labels, images))
    assert sorted((label, image) for _, label, image in a) == expected
    assert [image for _, _, image in a] != images  # not the plain order
    convert(runs["a"], tmp_path / "back", **FAST)
    back = [
        (label, image)
        for f in sorted((tmp_path / "back").glob("train-*.parquet"))
        for label, image in zip(*pq.read_table(f, columns=["label", "image"]).to_pydict().values())
    ]
    assert back == [(label, image) for _, label, image in a]


# ---------------------------------------------------------------- other sources


def test_image_folder_round_trip_keeps_bytes_and_labels(demo_source: Path, tmp_path: Path) -> None:
    folder = tmp_path / "faces"
    expected = []
    with InsightFaceRecords(demo_source) as records:
        for key in records.image_keys[:12].tolist():  # 112x112 aligned JPEGs of the first identities
            label, image = records.label(key), records.image(key)
            (folder / f"person{label:02d}").mkdir(parents=True, exist_ok=True)
            (folder / f"person{label:02d}" / f"{key:03d}.jpg").write_bytes(image)
            expected.append((label, image))
    convert(folder, tmp_path / "shards", workers=1, progress=False)
    summary = pack(tmp_path / "shards", tmp_path / "rec", progress=False)
    convert(tmp_path / "rec", tmp_path / "back", workers=1, progress=False)
    back = pq.read_table(tmp_path / "back" / "train-00000-of-00001.parquet").to_pydict()
    assert list(zip(back["label"], back["image"])) == expected
    assert summary["num_classes"] == len({label for label, _ in expected})
    assert (tmp_path / "rec" / "property").read_text() == f"{summary['num_classes']},112,112"


# ---------------------------------------------------------------- mxnet and arcface_torch read the packs


def test_mxnet_reads_the_packs_as_arcface_torch_and_verification_do(tmp_path: Path) -> None:
    """tests/fixtures/make_mxnet_fixtures.py recorded mxnet 1.9.1's reading; the same input packs the same files."""
    readback = json.loads((MXNET_FIXTURES / "pack_readback.json").read_text())
    expected = json.loads((MXNET_FIXTURES / "expected.json").read_text())
    src = tmp_path / "src-insightface"
    shutil.copytree(MXNET_FIXTURES / "insightface", src)
    with InsightFaceRecords(src) as records:
        bins = [records.image(k) for a, b, _ in readback["pairs"] for k in (a, b)]
    write_bin(src / "pairs.bin", bins, [same for _, _, same in readback["pairs"]])
    shutil.copytree(MXNET_FIXTURES / "multipart", tmp_path / "src-multipart")
    for fixture in ("insightface", "multipart"):
        convert(tmp_path / f"src-{fixture}", tmp_path / f"shards-{fixture}", workers=1, progress=False)
    for name, run in readback["runs"].items():
        shuffle = "--shuffle" in run["options"]
        seed = int(run["options"][-1]) if shuffle else 0
        out = tmp_path / f"pack-{name}"
        summary = pack(tmp_path / f"shards-{run['fixture']}", out, shuffle=shuffle, seed=seed, progress=False)
        assert {k: v for k, v in summary.items() if k not in ("out", "seconds")} == run["summary"]
        files = {p.name: sha(p.read_bytes()) for p in sorted(out.iterdir()) if p.name != "femb-pack.json"}
        assert files == run["files_sha256"], name  # today's pack writes the files mxnet read

        source = {r["key"]: r for r in expected[run["fixture"]]["records"]}
        classes = expected[run["fixture"]]["classes"]
        plain = sorted(
            map(int, classes), key=lambda k: classes[str(k)]
        )  # stable: shard (key) order per class
        view = run["mxnet"]
        n = len(plain)
        images = view["images"]
        assert all(i["shape"] == [8, 8, 3] for i in images)  # mx.image.imdecode decodes every one
        if shuffle:
            assert view["header0_flag"] == 0 and [i["key"] for i in images] == list(range(n))
            assert [i["id"] for i in images] == (np.random.default_rng(seed).permutation(n) + 1).tolist()
            assert all(flag == 0 and size > 0 for flag, size in view["file_order"])  # DALI meets images only
        else:
            num_classes = len(set(classes.values()))
            assert view["header0_label"] == [n + 1, n + 1 + num_classes]
            assert [i["key"] for i in images] == [i["id"] for i in images] == list(range(1, n + 1))
            first = {c: 1 + [classes[str(k)] for k in plain].index(c) for c in range(num_classes)}
            assert view["id2range"] == {
                str(n + 1 + c): [first[c], first.get(c + 1, n + 1)] for c in range(num_classes)
            }
        for image in images:
            original = plain[image["id"] - 1]
            assert image["label"] == classes[str(original)]
            assert image["image_sha256"] == source[original]["image_sha256"]
        if run["fixture"] == "insightface":
            assert view["bins"] == {
                "pairs": {"issame": [True, False], "image_sha256": [sha(b) for b in bins]}
            }


# ---------------------------------------------------------------- reruns, refusals, failures


def test_rerun_is_a_noop_and_another_plan_replaces_the_pack(small: tuple, tmp_path: Path) -> None:
    shards, _, _ = small
    out = tmp_path / "out"
    pack(shards, out, progress=False)
    before = snapshot(out)
    again = pack(shards, out, progress=False)
    assert again["reused"] is True and snapshot(out) == before
    shuffled = pack(shards, out, shuffle=True, seed=1, progress=False)
    assert shuffled["reused"] is False and shuffled["layout"] == "flat"
    assert sha((out / "train.rec").read_bytes()) != before["train.rec"][1]
    assert pack(shards, out, shuffle=True, seed=1, progress=False)["reused"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left beside OUT


def test_a_pair_set_added_to_the_shards_later_is_packed_too(small: tuple, tmp_path: Path) -> None:
    shards, _, _ = small
    pack(shards, tmp_path / "out", progress=False)
    shutil.copy(shards / "lfw.parquet", shards / "extra.parquet")  # as `femb pairs LIST SHARDS/extra.parquet`
    summary = pack(shards, tmp_path / "out", progress=False)
    assert summary["reused"] is False and summary["pair_sets"] == ["extra", "lfw"]
    assert read_bin(tmp_path / "out" / "extra.bin") == read_bin(shards.parent / "src" / "lfw.bin")
    pq.write_table(pq.read_table(shards / "extra.parquet").slice(0, 0), shards / "extra.parquet")
    with pytest.raises(FembError, match=r"extra.parquet: the pair set holds no pairs"):
        pack(shards, tmp_path / "out", progress=False)


def test_out_holding_anything_else_is_refused_untouched(small: tuple, tmp_path: Path) -> None:
    shards, _, _ = small
    original = shards.parent / "src"  # an InsightFace dataset: packing over it must not clobber it
    before = snapshot(original)
    with pytest.raises(FembError, match="not written by femb pack") as excinfo:
        pack(shards, original, progress=False)
    assert "\n" not in str(excinfo.value) and snapshot(original) == before

    other = shards_of(tmp_path / "other", [0, 1], [b"\xff\xd8a", b"\xff\xd8b"])
    pack(other, tmp_path / "out", progress=False)
    before = snapshot(tmp_path / "out")
    with pytest.raises(FembError, match=r"out: holds the pack of other shards"):
        pack(shards, tmp_path / "out", progress=False)
    assert snapshot(tmp_path / "out") == before


def test_a_failure_mid_write_leaves_no_train_rec_and_an_older_pack_untouched(
    small: tuple, tmp_path: Path
) -> None:
    shards, _, _ = small
    pack(shards, tmp_path / "old", shuffle=True, progress=False)
    before = snapshot(tmp_path / "old")
    last = sorted(shards.glob("train-*.parquet"))[-1]
    metadata = pq.read_metadata(last)
    assert metadata.num_row_groups >= 2
    column = metadata.row_group(1).column(metadata.schema.to_arrow_schema().get_field_index("image"))
    data = bytearray(last.read_bytes())
    data[column.data_page_offset : column.data_page_offset + 16] = (
        b"\xff" * 16
    )  # same size, broken page header
    last.write_bytes(bytes(data))
    for out in (tmp_path / "new", tmp_path / "old"):
        with pytest.raises(FembError, match=rf"{last.name}: row group 1 cannot be read") as excinfo:
            pack(shards, out, progress=False)
        assert "\n" not in str(excinfo.value)
    assert not (tmp_path / "new").exists()
    assert snapshot(tmp_path / "old") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_label_without_images_is_refused_naming_it(tmp_path: Path) -> None:
    shards = shards_of(tmp_path, [0, 0, 2, 3], [b"\xff\xd8a", b"\xff\xd8b", b"\xff\xd8c", b"\xff\xd8d"])
    with pytest.raises(
        FembError, match=r"label 1 has no images \(1 of 4 labels are empty\).*does not renumber"
    ):
        pack(shards, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_shard_directories_are_refused_in_one_line(small: tuple, tmp_path: Path) -> None:
    shards, _, _ = small
    cases = []
    with pytest.raises(FembError, match=r"no such shard directory") as excinfo:
        pack(tmp_path / "missing", tmp_path / "out", progress=False)
    cases.append(excinfo)
    with pytest.raises(FembError, match=r"src: not a femb shard directory \(no manifest.json") as excinfo:
        pack(shards.parent / "src", tmp_path / "out", progress=False)
    cases.append(excinfo)
    first = sorted(shards.glob("train-*.parquet"))[0]
    first.write_bytes(first.read_bytes() + b"x")
    with pytest.raises(FembError, match=rf"{first.name}: .* bytes, but manifest.json lists") as excinfo:
        pack(shards, tmp_path / "out", progress=False)
    cases.append(excinfo)
    first.unlink()
    with pytest.raises(FembError, match=rf"{first.name}: listed in manifest.json but missing") as excinfo:
        pack(shards, tmp_path / "out", progress=False)
    cases.append(excinfo)
    assert all("\n" not in str(case.value) for case in cases)
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_summary_and_names_its_flags(
    small: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards, labels, _ = small
    assert main(["pack", str(shards), str(tmp_path / "out"), "--shuffle", "--seed", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == len(labels) and summary["seed"] == 2 and summary["layout"] == "flat"
    assert main(["pack", str(shards), str(tmp_path / "bad"), "--shuffle", "--seed", "-1"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "femb pack: --seed must be a non-negative integer, got -1"
    ]
    assert main(["pack", str(tmp_path), str(tmp_path / "bad")]) == 1
    assert capsys.readouterr().err.startswith(f"femb pack: {tmp_path}: not a femb shard directory")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- framing many records at once


def test_frame_many_equals_frame_record_for_magics_anywhere() -> None:
    rng = np.random.default_rng(5)
    images = [rng.bytes(int(n)) for n in rng.integers(0, 40, 60)]
    for i in range(0, 60, 3):  # the magic at every offset of short and longer images
        at = i % 9
        images[i] = images[i][:at] + MAGIC_BYTES + images[i][at:]
    images[1] = MAGIC_BYTES * 3
    prefix = rng.integers(0, 2**32, (60, 6), dtype=np.uint64).astype("<u4")
    prefix[7, 2] = 0xCED7230A  # the magic in an IRHeader word
    framed, sizes = frame_many(prefix, pa.array(images, pa.binary()))
    expected = [frame_record(prefix[i].tobytes() + images[i]) for i in range(60)]
    assert bytes(framed) == b"".join(expected)
    assert sizes.tolist() == [len(e) for e in expected]
    framed, sizes = frame_many(prefix)  # no images: the payload is the words alone
    assert bytes(framed) == b"".join(frame_record(prefix[i].tobytes()) for i in range(60))
