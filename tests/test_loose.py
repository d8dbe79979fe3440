"""`femb synth`'s loose demo photos (LFW layout, DIR/loose) and IJB-C-layout set (DIR/IJBC).

A loose photo is an aligned render placed by a known similarity into a 250 x 250 photo: its landmarks
must align it back onto the ArcFace template and the crop must be that person's face; the IJB set must
read with `femb.evaluation.ijb.read_ijb` and follow the 1:N rule (one gallery template per probe subject).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import simplejpeg

from femb.cli import main
from femb.data.align import ARCFACE_TEMPLATE, arcface_template, estimate_norm, norm_crop
from femb.data.capture import NORMAL
from femb.data.landmarks import read_landmarks
from femb.data.loose import (
    LOOSE_SIZE,
    MAX_ROLL_DEG,
    SCALE_RANGE,
    Placement,
    aligned_photos,
    draw_setting,
    place_face,
    random_placement,
    render_person,
)
from femb.data.pairs import read_pair_list
from femb.data.synth import synthesize
from femb.evaluation.ijb import evaluate_ijb, read_ijb

SMALL = {"identities": 2, "images_per_identity": 2, "pairs": 4, "seed": 5}
LOOSE = {"loose_identities": 3, "loose_images_per_identity": 3, "ijb_subjects": 4}
IOD = float(np.hypot(*(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0])))  # the template's eye distance, 35.2 px


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loose") / "demo"
    synthesize(out, **SMALL, **LOOSE, progress=False)
    return out


def gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64).ravel()


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(gray(a), gray(b))[0, 1])


def alignment_error(points: np.ndarray) -> float:
    """Mean distance (px) between the landmarks carried by their own alignment and the 112 template."""
    matrix = estimate_norm(points)
    moved = points @ matrix[:, :2].T + matrix[:, 2]
    return float(np.linalg.norm(moved - arcface_template(112), axis=1).mean())


def test_loose_files_follow_lfw_naming_and_read_as_landmarks_and_pairs(demo: Path) -> None:
    loose = demo / "loose"
    photos = sorted(p.relative_to(loose).as_posix() for p in loose.rglob("*.jpg"))
    assert photos == [f"person_{i:04d}/person_{i:04d}_{n:04d}.jpg" for i in range(3) for n in (1, 2, 3)]
    marks = read_landmarks(loose / "landmarks.txt")
    assert sorted(marks.points) == photos
    assert all(0.6 <= score <= 1.0 for score in marks.scores.values())
    pairs = read_pair_list(loose / "pairs.txt")
    assert (loose / "pairs.txt").read_text().splitlines()[0] == "10\t1"  # 10 folds of 1 same + 1 different
    assert [same for _, _, same in pairs] == [True, False] * 10
    for left, right, same in pairs:
        assert left in marks.points and right in marks.points
        assert (left.split("/")[0] == right.split("/")[0]) == same and left != right


def test_loose_photos_are_larger_than_112_and_placed_differently(demo: Path) -> None:
    marks = read_landmarks(demo / "loose" / "landmarks.txt")
    rolls, scales = [], []
    for name, points in marks.points.items():
        photo = simplejpeg.decode_jpeg((demo / "loose" / name).read_bytes())
        assert photo.shape == (LOOSE_SIZE, LOOSE_SIZE, 3)
        eyes = points[1] - points[0]
        rolls.append(np.degrees(np.arctan2(eyes[1], eyes[0])))
        scales.append(np.hypot(*eyes) / IOD)
        assert ((points > 0) & (points < LOOSE_SIZE - 1)).all()
        corners = np.concatenate([photo[:20, :20], photo[:20, -20:]]).reshape(-1, 3)
        assert corners.mean() > 10 and corners.std() > 0.5  # a scene around the face, not black
    roll_template = np.degrees(np.arctan2(*(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0])[::-1]))
    assert all(abs(r - roll_template) <= MAX_ROLL_DEG + 0.01 for r in rolls)
    assert all(SCALE_RANGE[0] - 1e-3 <= s <= SCALE_RANGE[1] + 1e-3 for s in scales)
    assert np.std(rolls) > 3 and np.std(scales) > 0.05  # every photo has its own placement
    assert len({tuple(np.round(p.ravel(), 1)) for p in marks.points.values()}) == len(marks)


def test_aligning_loose_and_ijb_photos_lands_their_landmarks_on_the_template(demo: Path) -> None:
    marks = read_landmarks(demo / "loose" / "landmarks.txt")
    errors = [alignment_error(points) for points in marks.points.values()]
    ijb = read_ijb(demo / "IJBC")
    errors += [alignment_error(points.astype(np.float64)) for points in ijb.landmarks]
    assert np.mean(errors) < 1.0 and max(errors) < 0.01  # exact points, written to 3 decimals


@pytest.mark.parametrize(("roll", "scale"), [(-20.0, 0.6), (20.0, 1.4), (7.0, 1.0)])
def test_the_aligned_crop_is_the_persons_own_render(roll: float, scale: float) -> None:
    people = []
    for person in range(3):
        rng = np.random.default_rng([11, person])
        people.append((aligned_photos(render_person(rng), rng, 1, NORMAL)[0], rng))
    renders = [cv2.resize(aligned, (112, 112), interpolation=cv2.INTER_AREA) for aligned, _ in people]
    for person, (aligned, rng) in enumerate(people):
        placement = Placement(LOOSE_SIZE, roll, scale, (136.0, 115.0))
        photo = place_face(aligned, placement, draw_setting(rng, aligned), rng)
        crop = norm_crop(photo, placement.landmarks())
        own = pearson(crop, renders[person])
        others = [pearson(crop, render) for other, render in enumerate(renders) if other != person]
        assert own > 0.9 and max(others) < own - 0.15, (own, others)


def test_random_placements_keep_the_whole_frame_inside_the_photo() -> None:
    rng = np.random.default_rng(3)
    corners = np.array([[-0.5, -0.5], [111.5, -0.5], [111.5, 111.5], [-0.5, 111.5]])
    for size in (160, 250, 300):
        for _ in range(200):
            placement = random_placement(rng, size)
            for p in (placement, placement.moved(rng)):
                inside = corners @ p.matrix[:, :2].T + p.matrix[:, 2]
                assert (inside >= -0.5 - 1e-9).all() and (inside <= size - 0.5 + 1e-9).all()


def test_ijb_set_reads_as_a_release_with_the_1n_rule(demo: Path) -> None:
    root = demo / "IJBC"
    data = read_ijb(root)
    assert data.name == "IJBC" and data.has_1vn
    assert data.images == tuple(f"{n}.jpg" for n in range(1, len(data.images) + 1))
    assert sorted(p.name for p in (root / "loose_crop").iterdir()) == sorted(data.images)
    assert all(
        simplejpeg.decode_jpeg((root / "loose_crop" / n).read_bytes()).shape[0] > 112 for n in data.images
    )
    meta = root / "meta"
    g1 = np.loadtxt(meta / "ijbc_1N_gallery_G1.csv", dtype=str, skiprows=1, delimiter=",")  # as ijb_1n.py
    g2 = np.loadtxt(meta / "ijbc_1N_gallery_G2.csv", dtype=str, skiprows=1, delimiter=",")
    probe = np.loadtxt(meta / "ijbc_1N_probe_mixed.csv", dtype=str, skiprows=1, delimiter=",")
    header = (meta / "ijbc_1N_probe_mixed.csv").read_text().splitlines()[0]
    assert header.startswith("TEMPLATE_ID,SUBJECT_ID,FILENAME,")
    gallery = {int(t): int(s) for t, s in np.concatenate([g1, g2])[:, :2]}
    g1_subjects, g2_subjects = ({int(s) for s in g[:, 1]} for g in (g1, g2))
    assert g1_subjects and g2_subjects and not g1_subjects & g2_subjects
    probe_subjects = {int(s) for s in probe[:, 1]}
    assert probe_subjects == g1_subjects | g2_subjects == set(range(1, LOOSE["ijb_subjects"] + 1))
    assert all(list(gallery.values()).count(s) == 1 for s in probe_subjects)  # one gallery template each
    # Medias: stills are one image each; videos several frames of one media; frames score lower.
    per_media = np.bincount(data.medias)
    assert per_media.max() > 1
    video = per_media[data.medias] > 1
    assert data.faceness.min() >= 0.6 and data.faceness.max() <= 1.0
    assert data.faceness[video].mean() < data.faceness[~video].mean()
    # Pairs: every pair of one subject's templates is genuine; four times as many impostors, none repeated.
    subject_of = {int(t): int(s) for t, s in np.concatenate([g1, g2, probe])[:, :2]}
    labels = [int(subject_of[a] == subject_of[b]) for a, b in zip(data.pair_t1, data.pair_t2)]
    assert labels == data.pair_labels.tolist()
    genuine = int(data.pair_labels.sum())
    assert genuine == LOOSE["ijb_subjects"] * 3  # three templates per subject
    assert len(data.pair_labels) - genuine == min(4 * genuine, 66 - genuine)  # 12 templates: 66 pairs
    assert len({(a, b) for a, b in zip(data.pair_t1, data.pair_t2)}) == len(data.pair_t1)
    features = np.random.default_rng(0).standard_normal((len(data.images), 8))
    result = evaluate_ijb(data, features)
    assert result["1vn"]["probes"] == 2 * LOOSE["ijb_subjects"] and result["1v1"]["genuine"] == genuine


def test_ijb_video_frames_drift_a_little_and_share_their_media(demo: Path) -> None:
    data = read_ijb(demo / "IJBC")
    media = int(np.argmax(np.bincount(data.medias)))
    rows = np.flatnonzero(data.medias == media)
    assert len(rows) >= 3 and len(set(data.templates[rows])) == 1
    steps = np.linalg.norm(np.diff(data.landmarks[rows], axis=0), axis=2).mean(axis=1)
    assert (steps > 0).all() and (steps < 8).all()


def test_loose_and_ijb_people_are_held_out_from_training_and_pair_sets(demo: Path) -> None:
    record = json.loads((demo / "synth.json").read_text())
    assert record["loose_identities"] == ["loose:0", "loose:1", "loose:2"]
    assert record["ijb_identities"] == {str(i + 1): f"ijb:{i}" for i in range(LOOSE["ijb_subjects"])}
    pair_people = {p for pairs in record["pair_identities"].values() for pair in pairs for p in pair}
    held_out = {*record["loose_identities"], *record["ijb_identities"].values()}
    assert not held_out & pair_people
    assert all(re.fullmatch(r"(loose|ijb):\d+", p) for p in held_out)  # never train:<label>
    assert record["summary"]["loose"]["photos"] == 9 and record["summary"]["ijb"]["subjects"] == 4


def test_femb_convert_aligns_the_loose_folder_and_femb_pairs_reads_its_list(
    demo: Path, tmp_path: Path
) -> None:
    loose = demo / "loose"
    out = tmp_path / "shards"
    args = ["--landmarks", str(loose / "landmarks.txt"), "--workers", "1"]
    assert main(["convert", str(loose), str(out), *args]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["aligned"] is True and manifest["num_images"] == 9 and manifest["num_classes"] == 3
    table = pq.read_table(next(out.glob("train-*.parquet")))
    for data in table.column("image").to_pylist():
        assert simplejpeg.decode_jpeg(data).shape == (112, 112, 3)
    pair_set = tmp_path / "loose_pairs.parquet"
    assert main(["pairs", str(loose / "pairs.txt"), str(pair_set), "--root", str(loose), *args]) == 0
    pairs = pq.read_table(pair_set)
    assert pairs.num_rows == 20 and sum(pairs.column("is_same").to_pylist()) == 10
