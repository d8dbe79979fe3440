"""Loose demo photos: an aligned face placed in a larger photo, the way a face detector's loose crop holds it.

A loose photo is what a detector's crop holds before alignment (LFW's 250 x 250 images, the IJB
releases' `loose_crop`): the face shifted, rolled and scaled, with context around it. `random_placement`
draws the similarity that carries the 112 x 112 ArcFace-aligned frame into the photo: roll within
+-20 degrees, inter-ocular distance 0.6-1.4 times the frame's 35.2 px, centre shifted up to 12% of the
side, the frame always inside the photo. `place_face` warps an aligned render through it
(`cv2.warpAffine`, bilinear) onto an out-of-focus scene with neck and shoulders below the frame (a
`Setting`). The renders are `femb.data.capture.photograph`s of `femb.data.face.render_face` at
`RENDER_SIZE` = 160 >= 1.4 x 112 px, so the largest face is warped down, never up.

`Placement.landmarks` are the frame's template points (`femb.data.align.ARCFACE_TEMPLATE`) mapped into
the photo, exact to rounding: `norm_crop(photo, landmarks)` gives the aligned frame back. The face in
that frame keeps the roll, scale and shift that `photograph` leaves after alignment, as crops aligned
from a real detector's points do. `write_loose_set` writes LFW's layout: `<name>/<name>_%04d.jpg`
(`person_0003/person_0003_0001.jpg`), `landmarks.txt` (`name x1 y1 ... x5 y5 score`) and `pairs.txt`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from femb.data.align import ARCFACE_TEMPLATE
from femb.data.capture import NORMAL, Variation, encode_jpeg, photograph
from femb.data.face import face_identity, render_face, upsampler

LOOSE_SIZE = 250  # LFW's photo side
RENDER_SIZE = 160  # side of the aligned renders: >= SCALE_RANGE[1] x 112, so faces are only warped down
MAX_ROLL_DEG = 20.0
SCALE_RANGE = (0.6, 1.4)  # inter-ocular distance relative to the aligned frame's
MAX_SHIFT = 0.12  # of the photo's side
JPEG_QUALITY = 95
PAIR_FOLDS = 10  # LFW's pairs.txt: 10 folds, each `per_fold` same and `per_fold` different pairs

FRAME = 112  # the aligned frame, in its own pixel coordinates (centres 0..111, as norm_crop's output)
_CENTRE = (FRAME - 1) / 2
_FEATHER = 7.0  # frame pixels over which the render fades into the scene at the frame's edges
_CONTEXT = 28.0  # frame pixels beyond the frame over which its own backdrop gives way to the scene
_MIN_WARP = 0.6  # below this warp scale, the render is first shrunk with INTER_AREA (no aliasing)
_PAD = 30  # > _CONTEXT: frame pixels around the frame in the precomputed weights
_SCENE_CELLS = 64  # side at which the out-of-focus scene is drawn
_SHIFT = 4  # fractional bits of OpenCV drawing coordinates


@dataclass(frozen=True)
class Placement:
    """Where the aligned frame lies in a `size` x `size` photo: rolled, scaled about its centre, centred there."""

    size: int
    roll_deg: float
    scale: float  # photo pixels per frame pixel: the inter-ocular distance relative to the frame's
    centre: tuple[float, float]  # photo coordinates of the frame's centre

    @property
    def matrix(self) -> np.ndarray:
        """The (2, 3) similarity from aligned-frame pixels to photo pixels."""
        angle = math.radians(self.roll_deg)
        linear = self.scale * np.array(
            [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        )
        return np.c_[linear, np.asarray(self.centre) - linear @ np.full(2, _CENTRE)]

    def landmarks(self) -> np.ndarray:
        """The frame's five template points in photo pixels, (5, 2) float64: where the face's points lie."""
        matrix = self.matrix
        return ARCFACE_TEMPLATE.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]

    def moved(
        self, rng: np.random.Generator, roll_deg: float = 1.5, scale: float = 0.03, shift: float = 2.0
    ) -> Placement:
        """This placement nudged by a small random roll, relative scale and shift (px): a video's next frame."""
        new_roll = self.roll_deg + rng.uniform(-roll_deg, roll_deg)
        new_scale = min(self.scale * math.exp(rng.uniform(-scale, scale)), self.size / 2 / _reach(new_roll))
        moved = np.asarray(self.centre) + rng.uniform(-shift, shift, 2)
        room = max(0.0, self.size / 2 - new_scale * _reach(new_roll))
        middle = self.size / 2 - 0.5
        centre = np.clip(moved, middle - room, middle + room)
        return Placement(self.size, new_roll, new_scale, (float(centre[0]), float(centre[1])))


def _reach(roll_deg: float) -> float:
    """Half the extent, along x and y, of the frame (edges at -0.5 and 111.5) rolled by roll_deg at scale 1."""
    angle = math.radians(roll_deg)
    return FRAME / 2 * (abs(math.cos(angle)) + abs(math.sin(angle)))


def random_placement(
    rng: np.random.Generator,
    size: int = LOOSE_SIZE,
    max_roll_deg: float = MAX_ROLL_DEG,
    scale_range: tuple[float, float] = SCALE_RANGE,
    max_shift: float = MAX_SHIFT,
) -> Placement:
    """A detector-like placement of the aligned frame in a size x size photo; the frame stays inside it."""
    roll = float(rng.uniform(-max_roll_deg, max_roll_deg))
    fit = size / 2 / _reach(roll)  # the largest scale at which the rolled frame fits the photo
    scale = min(float(rng.uniform(*scale_range)), fit)
    room = min(max_shift * size, max(0.0, size / 2 - scale * _reach(roll)))
    centre = size / 2 - 0.5 + rng.uniform(-1.0, 1.0, 2) * room
    return Placement(size, roll, scale, (float(centre[0]), float(centre[1])))


@dataclass(frozen=True)
class Setting:
    """What surrounds the face in a photo: an out-of-focus scene, the neck and the shoulders' clothing."""

    scene: np.ndarray  # _SCENE_CELLS x _SCENE_CELLS x 3 float32, 0-255: scaled up to the photo
    neck: np.ndarray  # RGB, 0-255
    neck_half_width: float  # frame pixels
    shoulders: tuple[float, float, float]  # centre y, x radius, y radius (frame pixels; centred in x)
    clothing: np.ndarray  # RGB, 0-255
    noise: float  # sensor noise of the scene, 8-bit levels


def draw_setting(rng: np.random.Generator, aligned: np.ndarray) -> Setting:
    """A random out-of-focus scene for the render `aligned`, its tone near the render's own backdrop."""
    corner = max(2, aligned.shape[0] // 8)
    tone = np.concatenate([aligned[:corner, :corner], aligned[:corner, -corner:]]).reshape(-1, 3).mean(0)
    base = (0.6 * tone + 0.4 * rng.uniform(30, 225, 3)).astype(np.float32)
    low = _SCENE_CELLS  # the scene is out of focus: drawn at low resolution, then scaled up
    up = upsampler(4, low)
    field = up @ rng.normal(0.0, 25.0, (3, 4, 4)).astype(np.float32) @ up.T  # 3 x low x low
    scene = np.ascontiguousarray(np.moveaxis(field, 0, -1)) + base
    for _ in range(int(rng.integers(1, 5))):  # door frames, windows, shelves
        (x0, y0), (w, h) = rng.uniform(-0.2, 1.0, 2) * low, rng.uniform(0.1, 0.6, 2) * low
        colour, alpha = rng.uniform(20, 235, 3).astype(np.float32), np.float32(rng.uniform(0.4, 0.9))
        rows = slice(max(0, int(y0)), max(0, min(low, int(y0 + h))))
        cols = slice(max(0, int(x0)), max(0, min(low, int(x0 + w))))
        scene[rows, cols] = scene[rows, cols] * (1 - alpha) + colour * alpha
    scene = cv2.GaussianBlur(scene, (0, 0), float(rng.uniform(0.5, 1.5)))
    s = aligned.shape[0]
    neck = aligned[-1, 2 * s // 5 : 3 * s // 5].reshape(-1, 3).mean(0) * 0.85
    return Setting(
        scene=scene,
        neck=neck.astype(np.float32),
        neck_half_width=float(rng.uniform(15, 22)),
        shoulders=(float(rng.uniform(150, 165)), float(rng.uniform(62, 82)), float(rng.uniform(38, 50))),
        clothing=rng.uniform(15, 200, 3).astype(np.float32),
        noise=float(rng.uniform(1.0, 4.0)),
    )


def _frame_weights() -> tuple[np.ndarray, np.ndarray]:
    """Per frame pixel, how much the render shows (1 inside, fading over _FEATHER at the edges), and per
    pixel of the frame padded by _PAD, how far the scene has taken over from the frame's own backdrop."""
    grid = np.arange(-_PAD, FRAME + _PAD, dtype=np.float32)
    to_edge = np.minimum(grid + 0.5, FRAME - 0.5 - grid)
    inside = np.minimum(to_edge[None, :], to_edge[:, None])
    shows = np.clip(inside / _FEATHER, 0, 1)[_PAD:-_PAD, _PAD:-_PAD]
    away = np.clip(-inside / _CONTEXT, 0, 1)
    return np.ascontiguousarray(shows), away * away * (3 - 2 * away)  # smoothstep


_SHOWS, _AWAY = _frame_weights()


def _render_warp(matrix: np.ndarray, k: float) -> np.ndarray:
    """The photo's warp of a render of k pixels per frame pixel (pixel i shows frame point (i + 0.5) / k - 0.5,
    `femb.data.face`'s grid) for the frame-to-photo `matrix`."""
    return np.c_[matrix[:, :2] / k, matrix[:, 2] + matrix[:, :2] @ np.full(2, 0.5 / k - 0.5)]


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The (2, 3) affine map `outer` after `inner`."""
    return outer[:, :2] @ inner + np.c_[np.zeros((2, 2)), outer[:, 2]]


def _paint(photo: np.ndarray, colour: np.ndarray, cover: np.ndarray) -> None:
    """Blend `colour` over `photo` in place with the uint8 coverage `cover`, within the box it covers."""
    x, y, w, h = cv2.boundingRect(cover)
    if w and h:
        part = photo[y : y + h, x : x + w]
        part += (colour - part) * (cover[y : y + h, x : x + w, None].astype(np.float32) * np.float32(1 / 255))


def _subpixel(points: np.ndarray) -> np.ndarray:
    """Photo points as OpenCV drawing coordinates with _SHIFT fractional bits."""
    return np.round(np.asarray(points) * (1 << _SHIFT)).astype(np.int32)


def place_face(
    aligned: np.ndarray, placement: Placement, setting: Setting, rng: np.random.Generator
) -> np.ndarray:
    """The loose photo (size x size x 3 uint8, channels as `aligned`'s) of an aligned render (S x S x 3 uint8)."""
    size = placement.size
    matrix = placement.matrix
    source = aligned
    k = source.shape[0] / FRAME
    if placement.scale / k < _MIN_WARP:
        side = max(16, round(source.shape[0] * placement.scale / k / 0.8))
        source = cv2.resize(source, (side, side), interpolation=cv2.INTER_AREA)  # the same pixel-centre grid
        k = side / FRAME
    linear = cv2.INTER_LINEAR
    # The frame's own backdrop continued out of focus past its edges, the scene taking over with distance
    # (so no edge shows where the frame ends): smooth, so made at the scene's low resolution.
    low = setting.scene.shape[0]
    to_low = np.c_[matrix[:, :2], matrix[:, 2] + 0.5] * (low / size)  # photo pixel p -> (p + 0.5) r - 0.5
    to_low[:, 2] -= 0.5
    small = cv2.GaussianBlur(cv2.resize(aligned, (28, 28), interpolation=cv2.INTER_AREA), (0, 0), 2.0)
    context = cv2.warpAffine(
        small.astype(np.float32),
        _render_warp(to_low, 28 / FRAME),
        (low, low),
        flags=linear,
        borderMode=cv2.BORDER_REPLICATE,
    )
    padded = np.c_[to_low[:, :2], to_low[:, 2] - to_low[:, :2] @ np.full(2, float(_PAD))]
    away = cv2.warpAffine(_AWAY, padded, (low, low), flags=linear, borderValue=1.0)[..., None]
    backdrop = context + (setting.scene - context) * away
    photo = cv2.resize(backdrop, (size, size), interpolation=linear)

    # Neck and shoulders below the frame, drawn antialiased in photo pixels.
    cy, rx, ry = setting.shoulders
    w = setting.neck_half_width
    neck_corners = np.array([[_CENTRE - w, 90.0], [_CENTRE + w, 90.0], [_CENTRE + w, cy], [_CENTRE - w, cy]])
    neck = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(
        neck, _subpixel(neck_corners @ matrix[:, :2].T + matrix[:, 2]), 255, cv2.LINE_AA, _SHIFT
    )
    body = np.zeros((size, size), np.uint8)
    centre = matrix[:, :2] @ np.array([_CENTRE, cy]) + matrix[:, 2]
    axes = np.array([rx, ry]) * placement.scale
    cv2.ellipse(
        body,
        tuple(_subpixel(centre)),
        tuple(_subpixel(axes)),
        placement.roll_deg,
        0,
        360,
        255,
        -1,
        cv2.LINE_AA,
        _SHIFT,
    )
    _paint(photo, setting.neck, neck)
    _paint(photo, setting.clothing, body)
    photo += rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(setting.noise)

    # The face: the render warped into the frame's box, fading out over the frame's last _FEATHER pixels.
    corners = np.array([[-0.5, -0.5], [FRAME - 0.5, -0.5], [FRAME - 0.5, FRAME - 0.5], [-0.5, FRAME - 0.5]])
    photo_corners = corners @ matrix[:, :2].T + matrix[:, 2]
    x0, y0 = np.clip(np.floor(photo_corners.min(0)).astype(int), 0, size)
    x1, y1 = np.clip(np.ceil(photo_corners.max(0)).astype(int) + 1, 0, size)
    box = np.c_[np.eye(2), [-x0, -y0]]  # photo -> box pixels
    in_box = (int(x1 - x0), int(y1 - y0))
    face = cv2.warpAffine(
        source, _compose(box, _render_warp(matrix, k)), in_box, flags=linear, borderMode=cv2.BORDER_REPLICATE
    )
    shows = cv2.warpAffine(_SHOWS, _compose(box, matrix), in_box, flags=linear, borderValue=0.0)
    part = photo[y0:y1, x0:x1]
    part += (face - part) * shows[..., None]  # the render carries its own sensor noise
    return np.clip(photo + 0.5, 0, 255).astype(np.uint8)


def render_person(rng: np.random.Generator, size: int = RENDER_SIZE) -> np.ndarray:
    """A new random person's canonical renders (`render_face`) at `size`, drawn from `rng`."""
    return render_face(face_identity(rng), size)


def aligned_photos(
    canon: np.ndarray, rng: np.random.Generator, count: int, variation: Variation
) -> list[np.ndarray]:
    """`count` aligned RGB photos (S x S x 3 uint8) of the person `canon`, varied by `variation`.

    `photograph` encodes at JPEG quality 100 here (the same draws from `rng`): the loose photo is the one
    lossy encoding that counts.
    """
    jpegs = photograph(canon, rng, count, replace(variation, jpeg=(100, 100)))
    return [simplejpeg.decode_jpeg(data, colorspace="RGB") for data in jpegs]


def detector_score(placement: Placement, rng: np.random.Generator, hard: bool = False) -> float:
    """A plausible detector (faceness) score in [0.6, 0.999]: lower for rolled, small or hard (video) faces."""
    small = max(0.0, 1.0 - placement.scale) / (1.0 - SCALE_RANGE[0])
    score = 0.99 - 0.1 * abs(placement.roll_deg) / MAX_ROLL_DEG - 0.15 * small - (0.12 if hard else 0.0)
    return float(np.clip(score + rng.normal(0.0, 0.015), 0.6, 0.999))


def landmark_line(name: str, points: np.ndarray, score: float) -> str:
    """`name x1 y1 ... x5 y5 score`: one line of a five-point file (`femb.data.landmarks`, IJB's 5pts_score)."""
    return " ".join([name, *(f"{v:.3f}" for v in np.asarray(points).ravel()), f"{score:.4f}"])


def person_name(index: int) -> str:
    """The folder name of loose person `index` (LFW-style, one folder per person)."""
    return f"person_{index:04d}"


def lfw_pairs(rng: np.random.Generator, people: int, per_person: int, folds: int = PAIR_FOLDS) -> list[str]:
    """LFW pairs.txt lines over the loose people: `folds per_fold`, then per fold same and different pairs.

    `per_fold` is the number of photos / folds, from 1 to LFW's 300; image numbers count from 1.
    """
    per_fold = int(np.clip(people * per_person // folds, 1, 300))
    lines = [f"{folds}\t{per_fold}"]
    for _ in range(folds):
        for _ in range(per_fold):
            person = person_name(int(rng.integers(people)))
            i, j = sorted(int(v) + 1 for v in rng.choice(per_person, 2, replace=False))
            lines.append(f"{person}\t{i}\t{j}")
        for _ in range(per_fold):
            a = int(rng.integers(people))
            b = (a + int(rng.integers(1, people))) % people
            i, j = (int(v) + 1 for v in rng.integers(0, per_person, 2))
            lines.append(f"{person_name(a)}\t{i}\t{person_name(b)}\t{j}")
    return lines


def write_loose_set(
    out: Path,
    people: int,
    per_person: int,
    person_rng: Callable[[int], np.random.Generator],
    pair_rng: np.random.Generator,
    done: Callable[[int], object] = lambda n: None,
) -> dict:
    """Write `people` x `per_person` loose photos, `landmarks.txt` and `pairs.txt` under `out` (LFW layout).

    Person `i` is drawn from `person_rng(i)`; `done(n)` is called as photos are written. Returns a summary.
    """
    out = Path(out)
    lines = []
    for person in range(people):
        rng = person_rng(person)
        name = person_name(person)
        (out / name).mkdir(parents=True)
        for number, aligned in enumerate(
            aligned_photos(render_person(rng), rng, per_person, NORMAL), start=1
        ):
            placement = random_placement(rng)
            photo = place_face(aligned, placement, draw_setting(rng, aligned), rng)
            relative = f"{name}/{name}_{number:04d}.jpg"
            (out / relative).write_bytes(encode_jpeg(photo, JPEG_QUALITY))
            lines.append(landmark_line(relative, placement.landmarks(), detector_score(placement, rng)))
        done(per_person)
    (out / "landmarks.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pairs = lfw_pairs(pair_rng, people, per_person)
    (out / "pairs.txt").write_text("\n".join(pairs) + "\n", encoding="utf-8")
    return {
        "people": people,
        "photos": people * per_person,
        "photo_size": LOOSE_SIZE,
        "pairs": len(pairs) - 1,
        "folds": PAIR_FOLDS,
    }
