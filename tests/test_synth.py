"""`femb synth` writes a deterministic demo dataset in the exact InsightFace layout, hard for raw pixels."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from femb.cli import main
from femb.data.binfile import read_bin
from femb.data.recordio import RecordReader, open_insightface, unpack
from femb.data.synth import synthesize
from femb.errors import FembError
from femb.io import temp_path

SMALL = {"identities": 5, "images_per_identity": 3, "pairs": 8, "seed": 7}
HELD_OUT = {"loose_identities": 2, "loose_images_per_identity": 2, "ijb_subjects": 2}  # small loose/, IJBC/
DATA_FILES = ("train.rec", "train.idx", "property", "demo.bin", "demo_hard.bin")
NO_HELD_OUT = {"loose_identities": 0, "ijb_subjects": 0}
DIRS = ("loose", "IJBC")
# sha256 of SMALL's files as femb synth wrote them before loose/ and IJBC/ existed (same numpy, torch and
# libjpeg-turbo builds): adding the held-out sets must leave every earlier byte as it was.
BEFORE_HELD_OUT = {
    "train.rec": "7026f050ce086d844388e9ea721939d2d460855fc95938608999747ca0bacf55",
    "train.idx": "3542b747d662f4d48efbdf5098972c70dc94f179e27fc7afd92ab179f34826eb",
    "demo.bin": "086348c940710f235e46b5f006fd4cb7ee5cedfc9c0c2e882816220eca29720a",
    "demo_hard.bin": "c32fd7e42a6a27fbe31ee14058eed447b8b45144ad8868e056cf8c07dd005bc6",
}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "demo"
    synthesize(out, **SMALL, **HELD_OUT, progress=False)
    return out


def test_same_seed_writes_identical_bytes(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synthesize(again, **SMALL, **HELD_OUT, progress=False)
    for name in DATA_FILES:
        assert (again / name).read_bytes() == (small / name).read_bytes(), name
    for name in DIRS:
        assert tree(again / name) == tree(small / name), name


def test_held_out_sets_leave_the_training_and_pair_set_bytes_unchanged(small: Path) -> None:
    for name, digest in BEFORE_HELD_OUT.items():
        assert hashlib.sha256((small / name).read_bytes()).hexdigest() == digest, name


def test_zero_turns_the_loose_and_ijb_sets_off(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    summary = synthesize(out, **SMALL, **NO_HELD_OUT, progress=False)
    assert summary["loose"] is None and summary["ijb"] is None
    assert sorted(p.name for p in out.iterdir()) == sorted([*DATA_FILES, "synth.json"])
    for name in DATA_FILES:
        assert (out / name).read_bytes() == (small / name).read_bytes(), name
    only_ijb = synthesize(out, **SMALL, loose_identities=0, ijb_subjects=2, progress=False)
    assert only_ijb["ijb"]["subjects"] == 2 and not (out / "loose").exists()
    assert tree(out / "IJBC") == tree(small / "IJBC")  # its own stream: the same with or without loose/


def test_other_seed_writes_other_images(small: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    synthesize(other, **{**SMALL, "seed": 8}, **HELD_OUT, progress=False)
    for name in ("train.rec", "demo.bin", "demo_hard.bin"):
        assert (other / name).read_bytes() != (small / name).read_bytes(), name
    assert (other / "property").read_bytes() == (small / "property").read_bytes()
    for name in DIRS:
        assert tree(other / name) != tree(small / name), name


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
    held_out = [p.relative_to(small).as_posix() for name in DIRS for p in (small / name).rglob("*")]
    before = {name: (small / name).stat().st_mtime_ns for name in (*DATA_FILES, "synth.json", *held_out)}
    summary = synthesize(small, **SMALL, **HELD_OUT, progress=False)
    assert summary["reused"] is True
    assert summary["num_images"] == SMALL["identities"] * SMALL["images_per_identity"]
    assert {name: (small / name).stat().st_mtime_ns for name in before} == before


def test_rerun_with_other_parameters_replaces_the_dataset(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    synthesize(out, **SMALL, **HELD_OUT, progress=False)
    temp_path(out / "train.rec").write_bytes(b"left by a killed run")
    (temp_path(out / "loose") / "person_0000").mkdir(parents=True)  # a killed run's half-written folder
    summary = synthesize(out, **{**SMALL, "identities": 3}, **{**HELD_OUT, "ijb_subjects": 0}, progress=False)
    assert summary["reused"] is False and summary["num_classes"] == 3
    assert (out / "property").read_text().strip() == "3,112,112"
    assert sorted(p.name for p in out.iterdir()) == sorted([*DATA_FILES, "synth.json", "loose"])
    # A complete run notices a held-out file that changed size, and writes the dataset again.
    (out / "loose" / "landmarks.txt").write_text("edited")
    again = synthesize(out, **{**SMALL, "identities": 3}, **{**HELD_OUT, "ijb_subjects": 0}, progress=False)
    assert again["reused"] is False and (out / "loose" / "landmarks.txt").read_text() != "edited"


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
        ({"loose_identities": 1}, "loose_identities must be 0 (none) or an integer in [2, 1000000], got 1"),
        (
            {"loose_images_per_identity": 1},
            "loose_images_per_identity must be an integer in [2, 10000], got 1",
        ),
        ({"ijb_subjects": -3}, "ijb_subjects must be 0 (none) or an integer in [2, 1000000], got -3"),
    ],
)
def test_bad_parameter_is_a_user_error_naming_it(tmp_path: Path, params: dict, message: str) -> None:
    with pytest.raises(FembError) as err:
        synthesize(tmp_path / "out", **{**SMALL, **params}, progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_image_size_scales_the_faces(tmp_path: Path) -> None:
    synthesize(
        tmp_path, identities=2, images_per_identity=2, pairs=2, image_size=64, **NO_HELD_OUT, progress=False
    )
    assert (tmp_path / "property").read_text().strip() == "2,64,64"
    bins, _ = read_bin(tmp_path / "demo.bin")
    assert simplejpeg.decode_jpeg(bins[0]).shape == (64, 64, 3)


def test_cli_synth_passes_its_flags_and_matches_the_library_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "femb", "synth", str(out), "--identities", "4"]
    command += ["--images-per-identity", "2", "--pairs", "6", "--seed", "3"]
    command += ["--loose-identities", "2", "--loose-images-per-identity", "2", "--ijb-subjects", "2"]
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
        **HELD_OUT,
    }
    assert summary["loose"]["photos"] == 4 and summary["ijb"]["subjects"] == 2
    assert len(read_bin(out / "demo_hard.bin")[1]) == 6
    same = tmp_path / "in-process"
    synthesize(same, identities=4, images_per_identity=2, pairs=6, seed=3, **HELD_OUT, progress=False)
    for name in DATA_FILES:
        assert (same / name).read_bytes() == (out / name).read_bytes(), name
    for name in DIRS:
        assert tree(same / name) == tree(out / name), name


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        (
            "--loose-identities",
            "1",
            "--loose-identities must be 0 (none) or an integer in [2, 1000000], got 1",
        ),
        (
            "--loose-images-per-identity",
            "0",
            "--loose-images-per-identity must be an integer in [2, 10000], got 0",
        ),
        ("--ijb-subjects", "-1", "--ijb-subjects must be 0 (none) or an integer in [2, 1000000], got -1"),
    ],
)
def test_cli_held_out_flag_errors_name_the_flag(
    tmp_path: Path, capsys, flag: str, value: str, message: str
) -> None:
    assert main(["synth", str(tmp_path / "demo"), flag, value]) == 1
    assert capsys.readouterr().err == f"femb synth: {message}\n"
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_raw_pixels_do_not_solve_verification(tmp_path: Path) -> None:
    synthesize(tmp_path, identities=2, images_per_identity=1, pairs=600, **NO_HELD_OUT, progress=False)
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
