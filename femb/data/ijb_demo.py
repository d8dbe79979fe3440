"""A small demo set in the IJB-C release layout (`femb synth` writes it as DIR/IJBC), read by `read_ijb` unchanged.

The layout is InsightFace's IJB-C distribution (docs/architecture.md "IJB"): `loose_crop/<n>.jpg` and
`meta/ijbc_face_tid_mid.txt` (`image template media`), `ijbc_name_5pts_score.txt` (`image x1 y1 ... x5
y5 faceness`), `ijbc_template_pair_label.txt` (`t1 t2 label`) and the 1:N lists `ijbc_1N_gallery_G1.csv`,
`_G2.csv` and `ijbc_1N_probe_mixed.csv`, one row per image under the header `TEMPLATE_ID,SUBJECT_ID,
FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT,FRAME_NUM` (the leading columns of IJB-C's
own csvs; FILENAME is `img/<n>.jpg` for a still and `frames/<n>.jpg` for a video frame, `<n>.jpg` being
its loose crop; SIGHTING_ID is the media id; the face box is the head's in the crop; FRAME_NUM is empty
for stills).

Each subject (a held-out person, subject id = index + 1) has three templates: a gallery template of 2-4
still photos, each its own media, and two probe templates of 1-2 stills and, with probability 0.6, a
"video": 3-5 frames of one harder capture (`HARD`) moving a little (`Placement.moved`) in front of one
scene, sharing one media id. Gallery templates of odd subject ids go to G1, of even ones to G2, so G1
and G2 are disjoint and every probe subject has exactly one gallery template (`ijb_1n.py`'s rule, with
G1 + G2 as the gallery). The 1:1 pairs are every pair of a subject's templates (genuine) and four times
as many distinct template pairs of different subjects (impostor), sorted by template ids as IJB-C's file
is. Each loose crop is `femb.data.loose`'s photo, 160-300 px square; its landmarks are exact and its
faceness (0.6-1.0) is lower for rolled, small and video faces.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from femb.data.capture import HARD, NORMAL, encode_jpeg
from femb.data.loose import (
    JPEG_QUALITY,
    Placement,
    aligned_photos,
    detector_score,
    draw_setting,
    landmark_line,
    place_face,
    random_placement,
    render_person,
)

NAME = "ijbc"
GALLERY_STILLS = (2, 4)
PROBE_TEMPLATES = 2
PROBE_STILLS = (1, 2)
VIDEO_P = 0.6
VIDEO_FRAMES = (3, 5)
VIDEO_JPEG = (70, 90)  # video frames are compressed harder than the stills' JPEG_QUALITY
CROP_SIZES = (160, 300)
IMPOSTORS_PER_GENUINE = 4
CSV_HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT,FRAME_NUM"
_HEAD_BOX = np.array([[14.0, 8.0], [98.0, 8.0], [98.0, 116.0], [14.0, 116.0]])  # the head, in frame pixels


def _face_box(placement: Placement) -> str:
    """`x,y,width,height` of the head's axis-aligned box in the crop, in whole pixels, clipped to the crop."""
    matrix = placement.matrix
    corners = _HEAD_BOX @ matrix[:, :2].T + matrix[:, 2]
    low = np.clip(np.floor(corners.min(0)), 0, placement.size - 1).astype(int)
    high = np.clip(np.ceil(corners.max(0)), 0, placement.size - 1).astype(int)
    return f"{low[0]},{low[1]},{high[0] - low[0]},{high[1] - low[1]}"


class _Writer:
    """Numbers images, medias and templates in the order they are written, and collects the meta rows."""

    def __init__(self, crops: Path) -> None:
        self.crops = crops
        self.images = 0
        self.medias = 0
        self.templates = 0
        self.tid_mid: list[str] = []
        self.five_points: list[str] = []
        self.csv_rows: dict[int, list[str]] = {}  # template -> its csv rows (without template and subject)

    def template(self) -> int:
        self.templates += 1
        self.csv_rows[self.templates] = []
        return self.templates

    def media(self) -> int:
        self.medias += 1
        return self.medias

    def image(
        self,
        template: int,
        media: int,
        photo: np.ndarray,
        placement: Placement,
        score: float,
        frame: int | None,
        quality: int,
    ) -> None:
        self.images += 1
        name = f"{self.images}.jpg"
        (self.crops / name).write_bytes(encode_jpeg(photo, quality))
        self.tid_mid.append(f"{name} {template} {media}")
        self.five_points.append(landmark_line(name, placement.landmarks(), score))
        source = f"img/{name}" if frame is None else f"frames/{name}"
        self.csv_rows[template].append(
            f"{source},{media},{_face_box(placement)},{'' if frame is None else frame}"
        )


def _still(writer: _Writer, template: int, aligned: np.ndarray, rng: np.random.Generator) -> None:
    """One still photo: its own media, its own crop size and scene."""
    placement = random_placement(rng, int(rng.integers(CROP_SIZES[0], CROP_SIZES[1] + 1)))
    photo = place_face(aligned, placement, draw_setting(rng, aligned), rng)
    writer.image(
        template, writer.media(), photo, placement, detector_score(placement, rng), None, JPEG_QUALITY
    )


def _video(
    writer: _Writer, template: int, aligned: np.ndarray, frames: int, rng: np.random.Generator
) -> None:
    """A video media: `frames` crops of one capture in one scene, the face drifting a little from frame to frame."""
    media = writer.media()
    placement = random_placement(rng, int(rng.integers(CROP_SIZES[0], CROP_SIZES[1] + 1)))
    setting = draw_setting(rng, aligned)
    quality = int(rng.integers(VIDEO_JPEG[0], VIDEO_JPEG[1] + 1))
    first = int(rng.integers(1, 3000))
    for number in range(frames):
        photo = place_face(aligned, placement, setting, rng)
        score = detector_score(placement, rng, hard=True)
        writer.image(template, media, photo, placement, score, first + 3 * number, quality)
        placement = placement.moved(rng)


def _pairs(subject_of: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """All genuine template pairs and IMPOSTORS_PER_GENUINE times as many distinct impostor pairs, sorted.

    `subject_of[t - 1]` is template t's subject; a pair is (t1, t2, label) with t1 < t2.
    """
    count = len(subject_of)
    by_subject: dict[int, list[int]] = {}
    for template, subject in enumerate(subject_of.tolist(), start=1):
        by_subject.setdefault(subject, []).append(template)
    genuine = [(a, b, 1) for group in by_subject.values() for a, b in itertools.combinations(group, 2)]
    _, per_subject = np.unique(subject_of, return_counts=True)
    available = count * (count - 1) // 2 - int(np.sum(per_subject * (per_subject - 1) // 2))
    wanted = min(IMPOSTORS_PER_GENUINE * len(genuine), available)
    impostor: set[tuple[int, int]] = set()
    while len(impostor) < wanted:
        a, b = (int(v) for v in rng.integers(0, count, 2))
        if subject_of[a] != subject_of[b]:
            impostor.add((min(a, b) + 1, max(a, b) + 1))
    return sorted(genuine + [(a, b, 0) for a, b in impostor])


def write_ijb_demo(
    root: Path,
    subjects: int,
    person_rng: Callable[[int], np.random.Generator],
    plan_rng: np.random.Generator,
    done: Callable[[int], object] = lambda n: None,
) -> tuple[dict, dict[str, int]]:
    """Write the IJB-C-layout set of `subjects` people under `root` (`loose_crop/`, `meta/`).

    Subject `i` (id i + 1) is drawn from `person_rng(i)`, the impostor pairs from `plan_rng`; `done(n)`
    is called as images are written. Returns a summary and each subject id's stream index.
    """
    root = Path(root)
    crops, meta = root / "loose_crop", root / "meta"
    crops.mkdir(parents=True)
    meta.mkdir()
    writer = _Writer(crops)
    galleries: dict[str, list[int]] = {"G1": [], "G2": []}
    probes: list[int] = []
    subject_of: list[int] = []
    videos = 0
    for index in range(subjects):
        rng = person_rng(index)
        subject = index + 1
        canon = render_person(rng)
        gallery_stills = int(rng.integers(GALLERY_STILLS[0], GALLERY_STILLS[1] + 1))
        plan = [
            (int(rng.integers(PROBE_STILLS[0], PROBE_STILLS[1] + 1)), rng.random() < VIDEO_P)
            for _ in range(PROBE_TEMPLATES)
        ]
        stills = aligned_photos(canon, rng, gallery_stills + sum(n for n, _ in plan), NORMAL)
        clips = sum(video for _, video in plan)
        captures = aligned_photos(canon, rng, clips, HARD) if clips else []
        before = writer.images

        template = writer.template()
        subject_of.append(subject)
        galleries["G1" if subject % 2 else "G2"].append(template)
        for _ in range(gallery_stills):
            _still(writer, template, stills.pop(), rng)
        for still_count, video in plan:
            template = writer.template()
            subject_of.append(subject)
            probes.append(template)
            for _ in range(still_count):
                _still(writer, template, stills.pop(), rng)
            if video:
                frames = int(rng.integers(VIDEO_FRAMES[0], VIDEO_FRAMES[1] + 1))
                _video(writer, template, captures.pop(), frames, rng)
                videos += 1
        done(writer.images - before)

    subjects_array = np.asarray(subject_of)
    pairs = _pairs(subjects_array, plan_rng)
    (meta / f"{NAME}_face_tid_mid.txt").write_text("\n".join(writer.tid_mid) + "\n", encoding="utf-8")
    (meta / f"{NAME}_name_5pts_score.txt").write_text("\n".join(writer.five_points) + "\n", encoding="utf-8")
    (meta / f"{NAME}_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {label}\n" for a, b, label in pairs), encoding="utf-8"
    )

    def subject_csv(templates: list[int]) -> str:
        rows = [f"{t},{subjects_array[t - 1]},{row}" for t in templates for row in writer.csv_rows[t]]
        return "\n".join([CSV_HEADER, *rows]) + "\n"

    for gallery, templates in galleries.items():
        (meta / f"{NAME}_1N_gallery_{gallery}.csv").write_text(subject_csv(templates), encoding="utf-8")
    (meta / f"{NAME}_1N_probe_mixed.csv").write_text(subject_csv(probes), encoding="utf-8")
    summary = {
        "subjects": subjects,
        "templates": writer.templates,
        "gallery_templates": {name: len(t) for name, t in galleries.items()},
        "probe_templates": len(probes),
        "medias": writer.medias,
        "videos": videos,
        "images": writer.images,
        "pairs": len(pairs),
        "genuine": sum(label for _, _, label in pairs),
    }
    return summary, {str(index + 1): index for index in range(subjects)}
