"""`femb synth` writes a deterministic demo dataset in the exact InsightFace layout, hard for raw pixels."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from femb.data.binfile import read_bin
from femb.data.recordio import RecordReader, open_insightface, unpack
from femb.data.synth import synthesize
from femb.errors import FembError
from femb.io import temp_path

SMALL = {"identities": 5, "images_per_identity": 3, "pairs": 8, "seed": 7}
DATA_FILES = ("train.rec", "train.idx", "property", "demo.bin", "demo_hard.bin")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "demo"
    synthesize(out, **SMALL, progress=False)
    return out


def test_same_seed_writes_identical_bytes(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synthesize(again, **SMALL, progress=False)
    for name in DATA_FILES:
        assert (again / name).read_bytes() == (small / name).read_bytes(), name


def test_other_seed_writes_other_images(small: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    synthesize(other, **{**SMALL, "seed": 8}, progress=False)
    for name in ("train.rec", "demo.bin", "demo_hard.bin"):
        assert (other / name).read_bytes() != (small / name).read_bytes(), name
    assert (other / "property").read_bytes() == (small / "property").read_bytes()


def test_record_layout_matches_insightface(small: Path) -> None:
    n, people = SMALL["identities"] * SMALL["images_per_identity"], SMALL["identities"]
    per = SMALL["images_per_identity"]
    assert (small / "property").read_text().strip() == f"{people},112,112"
    with RecordReader(small / "train.rec", small / "train.idx") as reader:
        assert list(reader.keys) == list(range(n + 1 + people))
        header, rest = unpack(reader.read(0))
        assert header.flag == 2
        assert np.asarray(header.label).tolist() == [n + 1, n + 1 + people]
        assert len(rest) == 0
        for key in range(1, n + 1):
            header, image = unpack(reader.read(key))
            assert (header.flag, header.label, header.id) == (0, (key - 1) // per, key)
            assert bytes(image[:2]) == b"\xff\xd8"
        for person in range(people):
            key = n + 1 + person
            header, rest = unpack(reader.read(key))
            assert header.flag == 2
            assert np.asarray(header.label).tolist() == [1 + person * per, 1 + (person + 1) * per]
            assert header.id == key
            assert len(rest) == 0


def test_insightface_reader_sees_every_image_with_its_class(small: Path) -> None:
    with open_insightface(small) as records:
        spans = records.spans()
        assert records.layout == "header"
        assert records.num_classes == SMALL["identities"]
        assert spans.keys.tolist() == list(range(1, len(spans.keys) + 1))
        assert spans.labels.tolist() == [k // SMALL["images_per_identity"] for k in range(len(spans.keys))]


def test_every_image_decodes_to_112x112_rgb_jpeg(small: Path) -> None:
    images = []
    with open_insightface(small) as records:
        images += [records.image(int(key)) for key in records.image_keys]
    for name in ("demo.bin", "demo_hard.bin"):
        images += read_bin(small / name)[0]
    for data in images:
        assert simplejpeg.decode_jpeg(data).shape == (112, 112, 3)
        with Image.open(io.BytesIO(data)) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (112, 112))


def test_pair_sets_are_half_positive_with_people_unseen_in_training(small: Path) -> None:
    record = json.loads((small / "synth.json").read_text())
    train_people = {f"train:{label}" for label in range(SMALL["identities"])}
    seen: set[str] = set()
    for name in ("demo", "demo_hard"):
        bins, issame = read_bin(small / f"{name}.bin")
        people = record["pair_identities"][name]
        assert len(bins) == 2 * SMALL["pairs"] and len(issame) == len(people) == SMALL["pairs"]
        assert sum(issame) == SMALL["pairs"] // 2
        assert issame == [a == b for a, b in people]
        names = {person for pair in people for person in pair}
        assert all(person.startswith(f"{name}:") for person in names)
        assert not names & train_people
        assert not names & seen
        seen |= names
        assert bins[0] != bins[1]  # even a positive pair shows two different images


def test_pair_kinds_are_interleaved_for_the_10_fold_protocol(small: Path) -> None:
    issame = read_bin(small / "demo.bin")[1]
    # InsightFace's 10-fold protocol splits the file in order: both kinds must be spread over the file.
    assert issame != sorted(issame, reverse=True) and issame != sorted(issame)


def test_rerun_with_same_parameters_is_a_no_op(small: Path) -> None:
    before = {name: (small / name).stat().st_mtime_ns for name in (*DATA_FILES, "synth.json")}
    summary = synthesize(small, **SMALL, progress=False)
    assert summary["reused"] is True
    assert summary["num_images"] == SMALL["identities"] * SMALL["images_per_identity"]
    assert {name: (small / name).stat().st_mtime_ns for name in before} == before


def test_rerun_with_other_parameters_replaces_the_dataset(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    synthesize(out, **SMALL, progress=False)
    temp_path(out / "train.rec").write_bytes(b"left by a killed run")
    summary = synthesize(out, **{**SMALL, "identities": 3}, progress=False)
    assert summary["reused"] is False and summary["num_classes"] == 3
    assert (out / "property").read_text().strip() == "3,112,112"
    assert sorted(p.name for p in out.iterdir()) == sorted([*DATA_FILES, "synth.json"])


def test_directory_with_unrelated_files_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(FembError, match=r"mine: holds files femb synth did not write \(thesis.tex\)"):
        synthesize(out, **SMALL, progress=False)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"identities": 1}, "identities must be an integer in [2, "),
        ({"images_per_identity": 0}, "images_per_identity must be an integer in [1, "),
        ({"pairs": 1}, "pairs must be an integer in [2, "),
        ({"seed": -1}, "seed must be an integer in [0, "),
        ({"image_size": 8}, "image_size must be an integer in [32, "),
    ],
)
def test_bad_parameter_is_a_user_error_naming_it(tmp_path: Path, params: dict, message: str) -> None:
    with pytest.raises(FembError) as err:
        synthesize(tmp_path / "out", **{**SMALL, **params}, progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_image_size_scales_the_faces(tmp_path: Path) -> None:
    synthesize(tmp_path, identities=2, images_per_identity=2, pairs=2, image_size=64, progress=False)
    assert (tmp_path / "property").read_text().strip() == "2,64,64"
    bins, _ = read_bin(tmp_path / "demo.bin")
    assert simplejpeg.decode_jpeg(bins[0]).shape == (64, 64, 3)


def test_cli_synth_passes_its_flags_and_matches_the_library_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "femb", "synth", str(out), "--identities", "4"]
    command += ["--images-per-identity", "2", "--pairs", "6", "--seed", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["num_classes"], summary["num_images"]) == (4, 8)
    assert summary["pair_sets"]["demo"]["pairs"] == 6
    assert json.loads((out / "synth.json").read_text())["params"] == {
        "identities": 4,
        "images_per_identity": 2,
        "pairs": 6,
        "seed": 3,
        "image_size": 112,
    }
    assert len(read_bin(out / "demo_hard.bin")[1]) == 6
    same = tmp_path / "in-process"
    synthesize(same, identities=4, images_per_identity=2, pairs=6, seed=3, progress=False)
    for name in DATA_FILES:
        assert (same / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.slow
def test_raw_pixels_do_not_solve_verification(tmp_path: Path) -> None:
    synthesize(tmp_path, identities=2, images_per_identity=1, pairs=600, progress=False)
    for name, ceiling in (("demo", 0.8), ("demo_hard", 0.75)):
        bins, issame = read_bin(tmp_path / f"{name}.bin")
        x = np.stack([simplejpeg.decode_jpeg(b) for b in bins]).reshape(len(bins), -1).astype(np.float64)
        x -= x.mean(0)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        score = (x[0::2] * x[1::2]).sum(1)
        same = np.array(issame)[np.argsort(-score)]
        # Best accuracy over every threshold: accept the top-t scores as "same".
        correct = np.cumsum(same) + (~same).sum() - np.cumsum(~same)
        best = max(correct.max(), (~same).sum()) / len(same)
        assert 0.5 < best < ceiling, (name, best)
