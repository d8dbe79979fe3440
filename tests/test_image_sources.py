"""femb convert from image folders, image lists and landmarks (docs/architecture.md "Image sources")."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from femb.cli import main
from femb.data import image_shards, layout
from femb.data.align import ARCFACE_TEMPLATE
from femb.data.convert import convert, detect_source_kind
from femb.data.images import ImageOptions, prepare_image
from femb.data.loader import read_num_classes
from femb.errors import FembError


def crop(rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """A smooth random RGB image (JPEG keeps it close, so decoded comparisons are meaningful)."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def jpeg(pixels: np.ndarray, quality: int = 90, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, **save)
    return buf.getvalue()


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def rows(out: Path) -> list[dict]:
    """Every stored row (key, label, image) of a shard directory, in key order."""
    found = []
    for path in layout.shard_files(out):
        found += pq.read_table(path).to_pylist()
    return sorted(found, key=lambda r: r["key"])


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """bob/ (2 JPEGs, one in a sub-folder), alice/ (a PNG and an upper-case .JPG), empty/ and a stray file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    files = {
        "bob/b1.jpg": jpeg(crop(rng)),
        "bob/day2/b2.jpeg": jpeg(crop(rng)),
        "alice/a1.png": png(crop(rng)),
        "alice/A2.JPG": jpeg(crop(rng)),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "empty").mkdir()
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "README").write_text("top-level files are not identities")
    return root, files


def test_folder_labels_follow_sorted_identity_names(folder: tuple, tmp_path: Path, caplog) -> None:
    root, files = folder
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        manifest = convert(root, out, progress=False, workers=1)
    assert "empty: an identity folder with no images, left out" in caplog.text
    assert detect_source_kind(root) == "folder"
    assert manifest["source_kind"] == "folder"
    assert manifest["identities"] == ["alice", "bob"]  # sorted, as ImageFolder.class_to_idx; empty/ left out
    assert manifest["num_classes"] == 2 and manifest["num_images"] == 4
    assert (out / "identities.csv").read_text() == "label,identity\n0,alice\n1,bob\n"
    stored = rows(out)
    assert [r["label"] for r in stored] == [0, 0, 1, 1]
    assert [r["key"] for r in stored] == [1, 2, 3, 4]
    # sorted within a folder, recursively: alice/A2.JPG < alice/a1.png; bob/b1.jpg < bob/day2/b2.jpeg
    assert stored[0]["image"] == files["alice/A2.JPG"]  # an aligned JPEG keeps its bytes
    assert stored[2]["image"] == files["bob/b1.jpg"] and stored[3]["image"] == files["bob/day2/b2.jpeg"]
    reencoded = stored[1]["image"]
    assert reencoded[:2] == b"\xff\xd8"  # the PNG became a JPEG (default) ...
    assert (
        np.abs(decode(reencoded).astype(int) - decode(files["alice/a1.png"])).mean() < 3
    )  # ... at quality 95
    assert read_num_classes(out) == 2


def test_lossless_stores_png_pixels_exactly(folder: tuple, tmp_path: Path) -> None:
    root, files = folder
    convert(root, tmp_path / "out", progress=False, workers=1, lossless=True)
    stored = rows(tmp_path / "out")[1]["image"]
    assert stored[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(decode(stored), decode(files["alice/a1.png"]))


def test_rerun_is_noop_and_parallel_equals_serial(folder: tuple, tmp_path: Path, monkeypatch) -> None:
    root, _ = folder
    one = convert(root, tmp_path / "one", progress=False, workers=1, shard_size_mb=0.01)
    assert len(one["shards"]) > 1
    monkeypatch.setattr(image_shards, "_INLINE_SECONDS", 0.0)  # even cheap photos go to the workers
    two = convert(root, tmp_path / "two", progress=False, workers=2, shard_size_mb=0.01)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    manifest = layout.manifest_path(tmp_path / "one")
    os.utime(manifest, (1, 1))
    assert convert(root, tmp_path / "one", progress=False, workers=2, shard_size_mb=0.01) == one
    assert manifest.stat().st_mtime == 1  # nothing rewritten


def test_resume_rewrites_only_missing_shards(folder: tuple, tmp_path: Path) -> None:
    root, _ = folder
    out = tmp_path / "out"
    first = convert(root, out, progress=False, workers=1, shard_size_mb=0.01)
    names = [s["file"] for s in first["shards"]]
    for name in names:
        os.utime(out / name, (1, 1))
    (out / names[-1]).unlink()  # as if interrupted before the last shard and the manifest
    layout.manifest_path(out).unlink()
    again = convert(root, out, progress=False, workers=1, shard_size_mb=0.01)
    assert again["shards"] == first["shards"]
    assert [(out / n).stat().st_mtime == 1 for n in names] == [True] * (len(names) - 1) + [False]
    other = convert(root, out, progress=False, workers=1, shard_size_mb=0.01, jpeg_quality=80)
    assert other["jpeg_quality"] == 80 and other["shards"] != first["shards"]  # another setting: rewritten


def test_image_list_with_root_and_skip_bad(folder: tuple, tmp_path: Path, capsys) -> None:
    root, files = folder
    listing = tmp_path / "train.lst"
    listing.write_text(
        "# path label\n"
        "bob/b1.jpg\t1\n"
        "alice/A2.JPG 0\n"
        "bob/day2/b2.jpeg 1\n"
        "alice/a1.png x\n"
        "bob/b1.jpg 1\n"
        "missing.jpg 0\n"
    )
    args = ["convert", str(listing), str(tmp_path / "out"), "--root", str(root), "--workers", "1"]
    assert main(args) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"femb convert: {listing}:5: the label 'x' is not an integer"
    ]
    assert not (tmp_path / "out").exists()
    assert main([*args, "--skip-bad"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source_kind"] == "list" and manifest["num_images"] == 3
    assert [s["reason"] for s in manifest["skipped"]] == [
        f"{listing}:5: the label 'x' is not an integer",
        f"{listing}:6: bob/b1.jpg is listed a second time",
        f"{listing}:7: cannot read {root / 'missing.jpg'} (No such file or directory)",
    ]
    assert manifest["identities"] == ["0", "1"]  # bob's images lie in two folders: labels named by number
    stored = rows(tmp_path / "out")
    assert [r["image"] for r in stored] == [
        files["alice/A2.JPG"],
        files["bob/b1.jpg"],
        files["bob/day2/b2.jpeg"],
    ]
    assert [r["label"] for r in stored] == [0, 1, 1]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a.jpg -1", "the label -1 is out of range [0, 16777216)"),
        ("a.jpg 16777216", "the label 16777216 is out of range [0, 16777216)"),
        ("a.jpg", "expected `relative/path label`, got 'a.jpg'"),
    ],
)
def test_image_list_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg(crop(np.random.default_rng(1))))
    listing = tmp_path / "list.txt"
    listing.write_text(f"a.jpg 0\n{line}\n")
    with pytest.raises(FembError) as raised:
        convert(listing, tmp_path / "out", progress=False, workers=1)
    assert str(raised.value) == f"{listing}:2: {message}"


def photo_of(
    face: np.ndarray, angle: float, scale: float, shift: tuple[float, float], size: int = 250
) -> tuple:
    """A loose photo: the 112 crop rotated, scaled and moved into a larger canvas; its five landmarks there."""
    centre = (56.0, 56.0)
    matrix = cv2.getRotationMatrix2D(centre, angle, scale)
    matrix[:, 2] += np.array(shift) + (size - 112) / 2
    photo = cv2.warpAffine(face, matrix, (size, size), flags=cv2.INTER_CUBIC, borderValue=(90, 120, 90))
    points = np.c_[ARCFACE_TEMPLATE.astype(np.float64), np.ones(5)] @ matrix.T
    return photo, points


def test_landmarks_align_loose_photos(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(2)
    faces = {f"p{i}": crop(rng) for i in range(3)}
    root = tmp_path / "loose"
    lines, csv_lines = [], ["name,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5,score"]
    for i, (name, face) in enumerate(faces.items()):
        photo, points = photo_of(face, angle=10.0 * (i + 1), scale=1.2 + 0.1 * i, shift=(7.0 * i, -5.0))
        (root / name).mkdir(parents=True)
        (root / name / f"{name}_0001.jpg").write_bytes(jpeg(photo, quality=95))
        coords = " ".join(f"{v:.3f}" for v in points.ravel())
        lines.append(f"{name}/{name}_0001.jpg {coords} 0.99")
        csv_lines.append(f"{name}_0001.jpg,{coords.replace(' ', ',')},0.99")  # bare file names, as IJB lists
    (tmp_path / "five.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "five.csv").write_text("\n".join(csv_lines) + "\n")
    assert main(["convert", str(root), str(tmp_path / "plain"), "--workers", "1"]) == 1
    assert capsys.readouterr().err == (
        f"femb convert: {root / 'p0/p0_0001.jpg'}: is 250x250, not an aligned 112x112 crop; give its five "
        "points with --landmarks to align it\n"
    )
    for marks in ("five.txt", "five.csv"):
        manifest = convert(
            root, tmp_path / f"out-{marks}", landmarks=tmp_path / marks, progress=False, workers=1
        )
        assert manifest["aligned"] is True
        for row, face in zip(rows(tmp_path / f"out-{marks}"), faces.values()):
            aligned = decode(row["image"]).astype(int)
            assert aligned.shape == (112, 112, 3)
            inner = (slice(20, 92), slice(20, 92))  # the corners of the crop may fall outside the photo
            assert np.abs(aligned[inner] - face[inner]).mean() < 4  # the crop comes back to the face


def test_missing_landmark_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    root = tmp_path / "faces"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "1.jpg").write_bytes(jpeg(crop(rng, 160)))
    marks = tmp_path / "marks.txt"
    marks.write_text("a/1.jpg " + " ".join(f"{v + 24:.1f}" for v in ARCFACE_TEMPLATE.ravel()) + "\n")
    with pytest.raises(FembError, match=rf"b/1.jpg: no row for b/1.jpg in the landmarks file {marks}"):
        convert(root, tmp_path / "out", landmarks=marks, progress=False, workers=1)
    manifest = convert(root, tmp_path / "out", landmarks=marks, skip_bad=True, progress=False, workers=1)
    assert manifest["num_images"] == 1 and [s["file"] for s in manifest["skipped"]] == ["b/1.jpg"]


def test_pixel_handling_exif_gray_palette_cmyk() -> None:
    rng = np.random.default_rng(4)
    options = ImageOptions()
    face = crop(rng)
    wide = cv2.resize(face, (112, 112))
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(wide, k=1)))  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with "rotate 90 clockwise to view"
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", quality=95, exif=exif)
    upright = decode(prepare_image(buf.getvalue(), options, where="exif.jpg"))
    assert np.abs(upright.astype(int) - wide).mean() < 4
    gray = jpeg(face[:, :, 0])
    assert Image.open(io.BytesIO(prepare_image(gray, options))).mode == "RGB"
    palette = io.BytesIO()
    Image.fromarray(face).convert("P").save(palette, format="PNG")
    assert Image.open(io.BytesIO(prepare_image(palette.getvalue(), options))).mode == "RGB"
    cmyk = io.BytesIO()
    Image.fromarray(face).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    out = prepare_image(cmyk.getvalue(), options)
    assert Image.open(io.BytesIO(out)).mode == "RGB" and np.abs(decode(out).astype(int) - face).mean() < 6


def test_corrupt_images_stop_or_are_skipped(folder: tuple, tmp_path: Path, capsys) -> None:
    root, files = folder
    (root / "bob" / "broken.jpg").write_bytes(b"this is no image")
    good = files["bob/b1.jpg"]
    (root / "bob" / "truncated.jpg").write_bytes(good[: len(good) // 2])  # header intact, body cut
    out = tmp_path / "out"
    assert main(["convert", str(root), str(out), "--workers", "1"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"femb convert: {root / 'bob/broken.jpg'}: not an image file (no known format)"
    )
    assert not layout.manifest_path(out).exists() and not layout.shard_files(out)
    manifest = convert(root, out, skip_bad=True, progress=False, workers=1)
    assert [s["file"] for s in manifest["skipped"]] == [
        "bob/broken.jpg"
    ]  # a kept JPEG's body is not read ...
    verified = convert(root, tmp_path / "verified", skip_bad=True, verify=True, progress=False, workers=1)
    assert [s["file"] for s in verified["skipped"]] == [
        "bob/broken.jpg",
        "bob/truncated.jpg",
    ]  # ... unless --verify
    assert verified["num_images"] == 4 and verified["verified"] is True


def test_pair_lists_may_not_share_a_name(folder: tuple, tmp_path: Path) -> None:
    root, _ = folder
    lists = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        lists.append(tmp_path / sub / "pairs.csv")
        lists[-1].write_text("left,right,is_same\nbob/b1.jpg,alice/A2.JPG,0\n")
    with pytest.raises(
        FembError, match=r"pairs.csv: its pair set would be named 'pairs', as .*pairs.csv's is"
    ):
        convert(root, tmp_path / "out", pairs=lists, root=root, progress=False, workers=1)
    assert not (tmp_path / "out").exists()


def test_a_16_bit_grayscale_png_keeps_its_high_byte_not_white(tmp_path: Path) -> None:
    gray = (np.arange(112 * 112, dtype=np.uint32).reshape(112, 112) * 5 % 65536).astype(np.uint16)
    ok, png = cv2.imencode(".png", gray)
    assert ok
    stored = prepare_image(png.tobytes(), ImageOptions(lossless=True))
    pixels = cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(pixels[..., 0], (gray >> 8).astype(np.uint8))
    assert np.array_equal(pixels, cv2.imdecode(png, cv2.IMREAD_COLOR))  # as OpenCV decodes the file


def test_aligned_colour_jpegs_keep_their_bytes_with_or_without_an_upright_exif_block() -> None:
    face = Image.fromarray(crop(np.random.default_rng(8)))
    exif = Image.Exif()
    exif[0x0112] = 1  # upright
    for extra in ({}, {"progressive": True}, {"exif": exif}, {"exif": exif, "progressive": True}):
        buf = io.BytesIO()
        face.save(buf, format="JPEG", quality=90, **extra)
        assert prepare_image(buf.getvalue(), ImageOptions()) == buf.getvalue(), extra
    small = io.BytesIO()
    face.resize((100, 100)).save(small, format="JPEG")
    with pytest.raises(FembError, match=r"small\.jpg: is 100x100, not an aligned 112x112 crop"):
        prepare_image(small.getvalue(), ImageOptions(), where="small.jpg")
