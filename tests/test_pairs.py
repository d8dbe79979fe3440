"""Verification pair lists (LFW pairs.txt, CSV) -> pair .parquet sets (docs/architecture.md "Pair lists")."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tqdm import tqdm

import femb.data.pairs as pairs_module
from femb.cli import main
from femb.data import image_shards, layout
from femb.data.align import ARCFACE_TEMPLATE
from femb.data.convert import convert
from femb.data.images import ImageOptions
from femb.data.pairs import convert_pairs, plan_pair_list, read_pair_list, write_pair_list
from femb.data.parquet import read_footer
from femb.errors import FembError
from femb.evaluation.pairsets import load_pair_set

PEOPLE = {"Ann_Lee": 3, "Bo_Chen": 2, "Cy_Diaz": 2, "Di_Evans": 1}
# 2 folds x 3 pairs: per fold 3 same-person lines, then 3 different-person lines; tabs and spaces mixed.
LFW_PAIRS = """2\t3
Ann_Lee\t1\t2
Ann_Lee 1 3
Bo_Chen\t1\t2
Ann_Lee\t1\tBo_Chen\t1
Cy_Diaz 1 Di_Evans 1
Bo_Chen\t2\tDi_Evans\t1
Cy_Diaz\t1\t2
Ann_Lee\t2\t3
Bo_Chen\t2\t1
Ann_Lee\t3\tCy_Diaz\t2
Di_Evans\t1\tBo_Chen\t1
Cy_Diaz\t2\tAnn_Lee\t1
"""
LFW_SAME = [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3


def lfw_name(person: str, index: int) -> str:
    return f"{person}/{person}_{index:04d}.jpg"


def crop(seed: int, size: int = 112) -> np.ndarray:
    """A smooth random RGB image: JPEG and resampling keep it close, so decoded comparisons mean something."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)


@pytest.fixture
def lfw(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """`lfw/<name>/<name>_000i.jpg` aligned 112x112 JPEGs and `lfw/pairs.txt` (2 folds x 3 pairs); the file bytes."""
    root = tmp_path / "lfw"
    files = {}
    for number, (person, count) in enumerate(PEOPLE.items()):
        for i in range(1, count + 1):
            name = lfw_name(person, i)
            files[name] = jpeg(crop(10 * number + i))
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(files[name])
    (root / "pairs.txt").write_text(LFW_PAIRS)
    return root, files


def expected_lfw_pairs() -> list[tuple[str, str, bool]]:
    found = []
    for line in LFW_PAIRS.splitlines()[1:]:
        fields = line.split()
        if len(fields) == 3:
            found.append((lfw_name(fields[0], int(fields[1])), lfw_name(fields[0], int(fields[2])), True))
        else:
            found.append((lfw_name(fields[0], int(fields[1])), lfw_name(fields[2], int(fields[3])), False))
    return found


# ---------------------------------------------------------------- reading


def test_lfw_pairs_are_read_in_file_order_with_lfw_image_names(lfw: tuple) -> None:
    root, _ = lfw
    pairs = read_pair_list(root / "pairs.txt")
    assert pairs == expected_lfw_pairs()
    assert pairs[0] == ("Ann_Lee/Ann_Lee_0001.jpg", "Ann_Lee/Ann_Lee_0002.jpg", True)
    assert pairs[3] == ("Ann_Lee/Ann_Lee_0001.jpg", "Bo_Chen/Bo_Chen_0001.jpg", False)
    assert [same for *_, same in pairs] == LFW_SAME


def test_a_single_number_header_is_one_fold(tmp_path: Path) -> None:
    path = tmp_path / "pairsDevTrain.txt"
    path.write_text("2\nA 1 2\nB 3 4\nA 1 B 2\nC 10 D 1\n")
    assert read_pair_list(path) == [
        ("A/A_0001.jpg", "A/A_0002.jpg", True),
        ("B/B_0003.jpg", "B/B_0004.jpg", True),
        ("A/A_0001.jpg", "B/B_0002.jpg", False),
        ("C/C_0010.jpg", "D/D_0001.jpg", False),
    ]


def test_csv_pairs_take_any_case_of_the_truth_values(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(
        "Left,Right,Is_Same\n"
        "a/1.jpg,a/2.jpg,1\n"
        "a/1.jpg,b/1.jpg,0\n"
        "\n"
        "b/1.jpg,b/2.jpg,TRUE\n"
        "b\\2.jpg,c/1 x.jpg,False\n"
        "c/1.jpg,c/2.jpg,Yes\n"
        "c/2.jpg,a/1.jpg,no\n"
    )
    assert read_pair_list(path) == [
        ("a/1.jpg", "a/2.jpg", True),
        ("a/1.jpg", "b/1.jpg", False),
        ("b/1.jpg", "b/2.jpg", True),
        ("b/2.jpg", "c/1 x.jpg", False),
        ("c/1.jpg", "c/2.jpg", True),
        ("c/2.jpg", "a/1.jpg", False),
    ]


LFW_BODY = LFW_PAIRS.splitlines()


def _lfw_with(line: int, text: str | None) -> str:
    """LFW_PAIRS with line `line` (1-based) replaced by `text`, or removed when None."""
    lines = list(LFW_BODY)
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("name", "content", "line", "words"),
    [
        ("pairs.txt", _lfw_with(1, "2\t4"), 5, "fold 1, pair 4 of 4"),  # header counts more than the file
        ("pairs.txt", _lfw_with(1, "3\t3"), 13, "ends after 12 pair lines"),
        (
            "pairs.txt",
            _lfw_with(1, "2\t2"),
            4,
            "different-person",
        ),  # fewer: a same line where a different one goes
        ("pairs.txt", _lfw_with(1, "1\t3"), 8, "one line too many"),
        ("pairs.txt", _lfw_with(1, "2\t3\t1"), 1, "3 numbers"),
        ("pairs.txt", _lfw_with(1, "0\t3"), 1, "at least 1"),
        ("pairs.txt", _lfw_with(3, "Ann_Lee 1"), 3, "got 2 fields"),
        ("pairs.txt", _lfw_with(6, "Cy_Diaz 1 Di_Evans 1 extra"), 6, "got 5 fields"),
        ("pairs.txt", _lfw_with(3, "Ann_Lee 1 three"), 3, "'three' of Ann_Lee is not a whole number"),
        ("pairs.txt", _lfw_with(6, "Cy_Diaz 1.0 Di_Evans 1"), 6, "not a whole number"),
        ("pairs.txt", _lfw_with(2, "Ann_Lee 0 2"), 2, "not at least 1"),
        ("pairs.txt", "pairs of lfw\nA 1 2\n", 1, "not a pair list"),
        ("pairs.csv", "left,right,is_same\na.jpg,b.jpg,1\na.jpg,c.jpg,maybe\n", 3, "is_same 'maybe'"),
        ("pairs.csv", "left,right,is_same\na.jpg,b.jpg,1\na.jpg,c.jpg\n", 3, "expected 3 fields"),
        ("pairs.csv", "left,right,same\na.jpg,b.jpg,1\n", 1, "lacks the column(s) is_same"),
        ("pairs.csv", "left,right,is_same\n,b.jpg,1\n", 2, "empty left"),
    ],
)
def test_a_malformed_pair_list_is_one_line_naming_file_and_line(
    tmp_path: Path, name: str, content: str, line: int, words: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(FembError) as err:
        read_pair_list(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message
    assert "\n" not in message


def test_an_empty_pair_list_is_refused(tmp_path: Path) -> None:
    for content in ("", "\n\n", "left,right,is_same\n"):
        path = tmp_path / "pairs.csv"
        path.write_text(content)
        with pytest.raises(FembError, match=str(path)):
            read_pair_list(path)


# ---------------------------------------------------------------- converting


def test_convert_pairs_keeps_aligned_jpegs_in_list_order(lfw: tuple, tmp_path: Path) -> None:
    root, files = lfw
    out = tmp_path / "sets" / "lfw.parquet"
    summary = convert_pairs(root / "pairs.txt", out, workers=1, progress=False)
    table = pq.read_table(out)
    assert table.schema.remove_metadata().equals(layout.PAIR_SCHEMA)
    expected = expected_lfw_pairs()
    assert table.column("is_same").to_pylist() == [same for *_, same in expected]
    assert table.column("left").to_pylist() == [files[left] for left, _, _ in expected]  # bytes kept
    assert table.column("right").to_pylist() == [files[right] for _, right, _ in expected]
    assert summary["pairs"] == 12 and summary["same"] == 6 and summary["folds"] == 2
    assert summary["images"] == len({name for pair in expected for name in pair[:2]})
    footer = read_footer(out)
    assert footer["format"] == layout.FORMAT and footer["fingerprint"] == summary["fingerprint"]
    assert footer["source"] == "pairs.txt" and footer["pairs"] == 12 and footer["file"] == "lfw.parquet"
    assert [p.name for p in out.parent.iterdir()] == ["lfw.parquet"]  # no temporary left behind


def test_convert_pairs_on_processes_matches_one_worker(
    lfw: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = lfw
    monkeypatch.setattr(pairs_module, "CHUNK_IMAGES", 3)  # 8 images -> 3 chunks: the pool is used
    monkeypatch.setattr(image_shards, "_INLINE_SECONDS", 0.0)  # even for photos this cheap
    one = convert_pairs(root / "pairs.txt", tmp_path / "one.parquet", workers=1, progress=False)
    two = convert_pairs(root / "pairs.txt", tmp_path / "two.parquet", workers=2, progress=False)
    assert pq.read_table(tmp_path / "one.parquet").equals(pq.read_table(tmp_path / "two.parquet"))
    assert one["fingerprint"] == two["fingerprint"]


def _similarity(scale: float, degrees: float, center: tuple[float, float]) -> np.ndarray:
    """The 2x3 similarity that scales and rotates a 112 crop about its centre and puts that at `center`."""
    matrix = cv2.getRotationMatrix2D((56.0, 56.0), degrees, scale)
    matrix[:, 2] += np.array(center) - np.array([56.0, 56.0])
    return matrix


def test_landmarks_align_larger_photos_back_to_their_crop(tmp_path: Path) -> None:
    """A 200x200 photo made by warping a known crop with a similarity, landmarks moved the same way: the
    stored image is that crop again (it would not be if the landmarks were ignored or misapplied)."""
    root = tmp_path / "photos"
    crops, rows = {}, []
    for i, (scale, degrees, center) in enumerate([(1.5, 10.0, (100, 100)), (1.3, -15.0, (96, 104))]):
        for person in ("Ann_Lee", "Bo_Chen"):
            name = lfw_name(person, i + 1)
            crops[name] = crop(100 + len(crops))
            matrix = _similarity(scale, degrees, center)
            photo = cv2.warpAffine(crops[name], matrix, (200, 200), flags=cv2.INTER_CUBIC)
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo).save(root / name, format="PNG")
            points = ARCFACE_TEMPLATE.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
            rows.append(" ".join([name, *(f"{v:.4f}" for v in points.ravel())]))
    (root / "landmarks.txt").write_text("\n".join(rows) + "\n")
    (root / "pairs.txt").write_text("1\t1\nAnn_Lee\t1\t2\nAnn_Lee\t2\tBo_Chen\t1\n")
    out = tmp_path / "aligned.parquet"
    summary = convert_pairs(
        root / "pairs.txt", out, landmarks=root / "landmarks.txt", workers=1, progress=False
    )
    assert summary["aligned"]
    table = pq.read_table(out).to_pylist()
    stored = {
        "Ann_Lee/Ann_Lee_0001.jpg": table[0]["left"],
        "Ann_Lee/Ann_Lee_0002.jpg": table[0]["right"],
        "Bo_Chen/Bo_Chen_0001.jpg": table[1]["right"],
    }
    assert table[1]["left"] == stored["Ann_Lee/Ann_Lee_0002.jpg"]  # one image, prepared once
    for name, data in stored.items():
        pixels = decode(data)
        assert pixels.shape == (112, 112, 3)
        inner = (slice(8, -8), slice(8, -8))  # the border sees the photo's black corners after rounding
        error = np.abs(pixels[inner] - crops[name][inner]).mean()
        assert error < 4.0, (name, error)
        other = next(c for n, c in crops.items() if n != name)
        assert np.abs(pixels[inner] - other[inner]).mean() > 20.0  # a different face is far away


def test_an_image_without_a_landmark_row_is_named_before_anything_is_written(
    lfw: tuple, tmp_path: Path
) -> None:
    root, _ = lfw
    marks = tmp_path / "marks.txt"
    marks.write_text("Ann_Lee/Ann_Lee_0001.jpg " + " ".join(map(str, ARCFACE_TEMPLATE.ravel())) + "\n")
    out = tmp_path / "out" / "lfw.parquet"
    with pytest.raises(FembError) as err:
        convert_pairs(root / "pairs.txt", out, landmarks=marks, workers=1, progress=False)
    assert "Ann_Lee/Ann_Lee_0002.jpg" in str(err.value) and str(marks) in str(err.value)
    assert str(err.value).startswith(f"{root / 'pairs.txt'}:2: ")
    assert not out.parent.exists()


def test_pair_set_names_and_outputs_that_would_be_misread_are_refused(lfw: tuple, tmp_path: Path) -> None:
    root, _ = lfw
    with pytest.raises(FembError, match=r"must be a \.parquet file"):
        convert_pairs(root / "pairs.txt", tmp_path / "lfw.bin", progress=False)
    with pytest.raises(FembError, match="would read as a train shard"):
        convert_pairs(root / "pairs.txt", tmp_path / "train-lfw.parquet", progress=False)
    shard_like = root / "train-pairs.txt"
    shard_like.write_text(LFW_PAIRS)
    with pytest.raises(FembError, match="would read as a train shard"):
        plan_pair_list(shard_like, tmp_path / "out", "f" * 64, root, None, ImageOptions())


def test_plan_and_write_pair_list_give_the_manifest_entry(lfw: tuple, tmp_path: Path) -> None:
    """What `femb convert --pairs` calls: OUT/<stem>.parquet, and what write_parquet returns plus pairs."""
    root, _ = lfw
    marks = None
    task = plan_pair_list(root / "pairs.txt", tmp_path / "shards", "ab" * 32, root, marks, ImageOptions())
    assert task.file == "pairs.parquet"
    assert task.meta["fingerprint"] == "ab" * 32 and task.meta["pairs"] == 12
    json.dumps(task.meta)  # the footer entry: JSON, compared with what a finished file holds
    with tqdm(total=len(task.images), file=io.StringIO()) as bar:  # a bar that counts, unseen
        entry = write_pair_list(task, 1, bar)
        assert bar.n == len(task.images)
    assert set(entry) == {"file", "bytes", "sha256", "pairs"}
    assert entry["file"] == "pairs.parquet" and entry["pairs"] == 12
    assert entry["bytes"] == (tmp_path / "shards" / "pairs.parquet").stat().st_size
    assert read_footer(tmp_path / "shards" / "pairs.parquet") == task.meta


def test_femb_convert_adds_a_pair_list_as_a_pair_set(lfw: tuple, tmp_path: Path) -> None:
    root, files = lfw  # an image folder (one folder per person) with pairs.txt beside the folders
    out = tmp_path / "shards"
    manifest = convert(root, out, pairs=[root / "pairs.txt"], workers=1, progress=False)
    assert manifest["pairs"]["pairs"]["pairs"] == 12
    table = pq.read_table(out / "pairs.parquet")
    assert table.column("left").to_pylist()[0] == files["Ann_Lee/Ann_Lee_0001.jpg"]
    assert convert(root, out, pairs=[root / "pairs.txt"], workers=1, progress=False) == manifest


# ---------------------------------------------------------------- the command, and evaluate


def test_femb_pairs_writes_a_set_femb_evaluate_reads(lfw: tuple, tmp_path: Path, capsys) -> None:
    root, files = lfw
    out = tmp_path / "data" / "lfw.parquet"
    assert main(["pairs", str(root / "pairs.txt"), str(out), "--root", str(root), "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(out) and summary["pairs"] == 12
    pair_set = load_pair_set(out, cache=False, progress=False)
    assert pair_set.name == "lfw" and pair_set.num_pairs == 12
    assert pair_set.is_same.tolist() == LFW_SAME
    assert tuple(pair_set.images.shape) == (24, 3, 112, 112)
    first = pair_set.images[0].permute(1, 2, 0).numpy().astype(np.float64)
    assert np.abs(first - decode(files["Ann_Lee/Ann_Lee_0001.jpg"])).mean() < 1.0


def test_femb_pairs_names_a_missing_image_in_one_line(lfw: tuple, tmp_path: Path, capsys) -> None:
    root, _ = lfw
    missing = root / "Bo_Chen" / "Bo_Chen_0002.jpg"
    missing.unlink()
    out = tmp_path / "lfw.parquet"
    assert main(["pairs", str(root / "pairs.txt"), str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"femb pairs: {root / 'pairs.txt'}:4: ")
    assert str(missing) in err and "no such image" in err
    assert not out.exists()


def test_femb_pairs_names_its_flags_in_errors(lfw: tuple, tmp_path: Path, capsys) -> None:
    root, _ = lfw
    out = str(tmp_path / "lfw.parquet")
    assert main(["pairs", str(root / "pairs.txt"), out, "--root", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.startswith("femb pairs: --root ")
    assert main(["pairs", str(root / "pairs.txt"), out, "--jpeg-quality", "0"]) == 1
    assert capsys.readouterr().err.startswith("femb pairs: --jpeg-quality ")
