"""Demo faces: a generated identity dataset in the exact InsightFace layout, so every command runs anywhere.

Each person is a random parametric face (head shape and depth, skin tone and blotch pattern, hair style
and colour, eye spacing, size and iris colour, brows, nose relief, lips, beard, glasses, moles), rendered
once in the 112x112 ArcFace-aligned frame as albedo, alpha and surface normals, in three expressions.
Every image then varies the way aligned crops vary: roll, scale and shift left over by 5-point alignment,
yaw and pitch as depth parallax, light from a random direction, brightness and white balance, background,
sunglasses-like bars and blobs, gaussian blur, sensor noise and JPEG quality 60-95. `demo.bin` varies like
training, `demo_hard.bin` more (`HARD`); their people come from random streams of their own, so no person of
a pair set is a training identity.

Measured with the defaults (seed 0, one core of a busy 2-core machine): 14,000 images in about 13 s;
best-threshold raw-pixel verification accuracy (cosine of mean-subtracted pixels) 0.64 on demo.bin and
0.57 on demo_hard.bin. A 7-layer CNN with a CosFace head scores 0.51 / 0.50 untrained and 0.95-0.99 /
0.78-0.82 after 5 minutes of AdamW on that shared CPU (25,000-71,000 images seen, by load).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from tqdm import tqdm

from femb.data.binfile import write_bin
from femb.data.recordio import IRHeader, RecordWriter, pack
from femb.errors import FembError
from femb.io import write_text

DEFAULT_IDENTITIES = 400
DEFAULT_IMAGES_PER_IDENTITY = 25
DEFAULT_PAIRS = 1000

DESIGN = 112.0  # every coordinate below is in the 112x112 ArcFace-aligned frame, scaled to `image_size`
# InsightFace's 5-point template (arcface_torch `arcface_dst`): eyes, nose tip, mouth corners.
LEFT_EYE = (38.29, 51.70)
RIGHT_EYE = (73.53, 51.50)
NOSE_TIP = (56.03, 71.74)
MOUTH_Y = 92.3
HEAD_CENTRE = (56.0, 60.0)

_SPLITS = ("train", "demo", "demo_hard")
_FORMAT = "femb-synth-1"  # bump when the renderer changes the bytes a seed produces
_FILES = ("train.rec", "train.idx", "property", "demo.bin", "demo_hard.bin", "synth.json")
_STALE_TEMP = re.compile(r"\.(train\.rec|train\.idx|property|demo\.bin|demo_hard\.bin|synth\.json)\..*\.tmp")
# Channels of an identity's canonical render: albedo RGB (0-2), coverage alpha, surface normal x / y.
_A, _NX, _NY = 3, 4, 5
_EXPRESSION_P = (0.55, 0.3, 0.15)  # neutral, smile, open mouth

_SKIN_LIGHT = np.array([0.93, 0.78, 0.68], np.float32)
_SKIN_DARK = np.array([0.36, 0.23, 0.16], np.float32)
_HAIR = np.array(
    [
        [0.06, 0.05, 0.05],  # black
        [0.22, 0.14, 0.08],  # dark brown
        [0.42, 0.28, 0.15],  # brown
        [0.78, 0.63, 0.38],  # blond
        [0.60, 0.25, 0.10],  # red
        [0.62, 0.62, 0.62],  # grey
    ],
    np.float32,
)
_HAIR_P = np.array([0.32, 0.26, 0.16, 0.11, 0.06, 0.09])
_IRIS = np.array(
    [[0.25, 0.14, 0.07], [0.40, 0.26, 0.12], [0.25, 0.42, 0.62], [0.30, 0.48, 0.30], [0.45, 0.48, 0.50]],
    np.float32,
)
_IRIS_P = np.array([0.45, 0.2, 0.15, 0.1, 0.1])


@dataclass(frozen=True)
class Variation:
    """How much one image of an identity differs from another (pose, light, camera), as in aligned crops."""

    rotate_deg: float  # in-plane roll left after 5-point alignment
    scale: float  # relative size jitter
    shift_px: float  # centre jitter
    yaw: float  # out-of-plane turn (fraction of head depth)
    pitch: float
    ambient: tuple[float, float]  # share of light that is not directional: low = harsh side light
    brightness: tuple[float, float]
    cast: float  # per-channel gain jitter (white balance)
    blur: tuple[float, float]  # gaussian sigma in pixels
    noise: tuple[float, float]  # sensor noise sigma in 8-bit levels
    jpeg: tuple[int, int]  # quality range
    p_sunglasses: float
    p_occluder: float


NORMAL = Variation(
    rotate_deg=5.0,
    scale=0.05,
    shift_px=2.5,
    yaw=0.18,
    pitch=0.10,
    ambient=(0.45, 0.85),
    brightness=(0.65, 1.25),
    cast=0.12,
    blur=(0.0, 1.2),
    noise=(1.0, 6.0),
    jpeg=(60, 95),
    p_sunglasses=0.05,
    p_occluder=0.05,
)
HARD = Variation(
    rotate_deg=10.0,
    scale=0.10,
    shift_px=5.0,
    yaw=0.35,
    pitch=0.18,
    ambient=(0.2, 0.7),
    brightness=(0.4, 1.4),
    cast=0.22,
    blur=(0.5, 2.2),
    noise=(3.0, 12.0),
    jpeg=(40, 85),
    p_sunglasses=0.15,
    p_occluder=0.2,
)


PAIR_SETS = {"demo": NORMAL, "demo_hard": HARD}  # the .bin files written, and how their images vary


class _Canvas:
    """A float32 image with channels albedo RGB, alpha and height, painted with soft-edged shapes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.k = size / DESIGN  # design units -> pixels
        coords = (np.arange(size, dtype=np.float32) + 0.5) / self.k - 0.5
        self.x, self.y = np.meshgrid(coords, coords)
        self.rgb = np.zeros((size, size, 3), np.float32)
        self.alpha = np.zeros((size, size), np.float32)
        self.z = np.zeros((size, size), np.float32)

    def box(self, cx: float, cy: float, rx: float, ry: float) -> tuple[slice, slice]:
        """The pixel rows/columns that a shape of radius (rx, ry) around (cx, cy) can touch."""
        k, n = self.k, self.size
        x0, x1 = max(0, int((cx - rx - 2) * k)), min(n, int((cx + rx + 2) * k) + 2)
        y0, y1 = max(0, int((cy - ry - 2) * k)), min(n, int((cy + ry + 2) * k) + 2)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def ellipse(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        angle: float = 0.0,
        sl: tuple[slice, slice] | None = None,
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        """Soft (about one pixel wide edge) coverage of a rotated ellipse, within its box (or the given one)."""
        if sl is None:
            sl = self.box(cx, cy, max(rx, ry), max(rx, ry))
        dx, dy = self.x[sl] - cx, self.y[sl] - cy
        ca, sa = math.cos(angle), math.sin(angle)
        u, v = (dx * ca + dy * sa) / rx, (-dx * sa + dy * ca) / ry
        dist = (1.0 - np.sqrt(u * u + v * v)) * min(rx, ry) * self.k
        return sl, np.clip(dist + 0.5, 0.0, 1.0)

    def paint(
        self, sl: tuple[slice, slice], cover: np.ndarray, colour: np.ndarray, opaque: bool = True
    ) -> None:
        """Blend `colour` (RGB or per-pixel RGB) over the canvas with coverage `cover`."""
        m = cover[..., None]
        self.rgb[sl] = self.rgb[sl] * (1.0 - m) + colour * m
        if opaque:
            self.alpha[sl] = np.maximum(self.alpha[sl], cover)


def _mix(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return (a * (1.0 - t) + b * t).astype(np.float32)


def _upsampler(cells: int, size: int) -> np.ndarray:
    """The size x cells matrix that upsamples a cells-long signal to size samples by linear interpolation."""
    pos = np.linspace(0, cells - 1, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), cells - 2)
    w = pos - i0
    up = np.zeros((size, cells), np.float32)
    up[np.arange(size), i0] = 1 - w
    up[np.arange(size), i0 + 1] = w
    return up


def _smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int, n: int = 1) -> np.ndarray:
    """Low-frequency noise (n x size x size x channels): a cells x cells gaussian grid upsampled bilinearly."""
    grid = rng.standard_normal((n, channels, cells, cells)).astype(np.float32)
    up = _upsampler(cells, size)
    return np.moveaxis(up @ grid @ up.T, 1, -1)


def _face_identity(rng: np.random.Generator) -> dict:
    """Random parameters of one person: shape, colours, features and marks (design-frame units)."""
    tone = rng.beta(1.6, 1.6)
    skin = _mix(_SKIN_LIGHT, _SKIN_DARK, tone) * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    eye_dx, eye_dy = rng.uniform(-2.5, 2.5), rng.uniform(-2.0, 2.0)
    return {
        "skin": np.clip(skin, 0, 1),
        "hair": np.clip(hair, 0, 1),
        "head_rx": rng.uniform(36, 45),
        "head_ry": rng.uniform(49, 58),
        "head_dy": rng.uniform(-3, 3),
        "jaw": rng.uniform(0.05, 0.4),  # how much the lower face narrows
        "chin_p": rng.uniform(1.2, 2.6),
        "depth": rng.uniform(26, 36),
        "ear_ry": rng.uniform(8, 13),
        "hair_style": rng.choice(5, p=[0.28, 0.22, 0.22, 0.18, 0.10]),  # short, fringe, long, side part, bald
        "hairline": rng.uniform(12, 28),
        "hair_curve": rng.uniform(-6, 10),
        "hair_part": rng.uniform(-18, 18),
        "hair_volume": rng.uniform(2, 9),
        "hair_len": rng.uniform(75, 125),
        "hair_freq": rng.uniform(0.6, 2.2),
        "hair_phase": rng.uniform(0, 2 * math.pi),
        "hair_tilt": rng.uniform(-0.6, 0.6),
        "eyes": [
            (LEFT_EYE[0] - eye_dx + rng.uniform(-0.8, 0.8), LEFT_EYE[1] + eye_dy),
            (RIGHT_EYE[0] + eye_dx + rng.uniform(-0.8, 0.8), RIGHT_EYE[1] + eye_dy),
        ],
        "eye_rx": rng.uniform(5.0, 7.5),
        "eye_ry": rng.uniform(2.0, 3.8),
        "eye_tilt": rng.uniform(-0.2, 0.2),
        "iris": _IRIS[rng.choice(len(_IRIS), p=_IRIS_P)] * rng.uniform(0.8, 1.2),
        "iris_r": rng.uniform(2.2, 3.4),
        "brow_gap": rng.uniform(6, 11),
        "brow_len": rng.uniform(8, 13),
        "brow_th": rng.uniform(1.2, 3.5),
        "brow_arch": rng.uniform(-1, 3.5),
        "brow_tilt": rng.uniform(-0.25, 0.25),
        "brow_dark": rng.uniform(0.4, 1.0),
        "nose_len": rng.uniform(14, 24),
        "nose_w": rng.uniform(5, 10),
        "nose_h": rng.uniform(6, 14),
        "nostril": rng.uniform(0.6, 1.6),
        "mouth_dy": rng.uniform(-3, 3),
        "mouth_w": rng.uniform(10, 17),
        "lip_th": rng.uniform(1.5, 4.5),
        "lip": np.clip(_mix(skin, np.array([0.72, 0.26, 0.28], np.float32), rng.uniform(0.25, 0.7)), 0, 1),
        "blush": rng.uniform(0, 0.12),
        "beard": rng.choice(4, p=[0.65, 0.12, 0.13, 0.10]),  # none, moustache, stubble, full
        "glasses": rng.random() < 0.12,
        "frame": np.clip(rng.uniform(0.0, 0.5, 3), 0, 1).astype(np.float32),
        "moles": [
            (rng.uniform(25, 87), rng.uniform(40, 100), rng.uniform(0.8, 2.2))
            for _ in range(rng.poisson(1.5))
        ],
        "texture": rng.integers(0, 2**31),
        "texture_amp": rng.uniform(0.04, 0.12),
    }


def _render_identity(p: dict, size: int) -> np.ndarray:
    """Canonical renders of one person, one per expression: (E, size, size, 6) albedo, alpha, normal x/y."""
    cv = _Canvas(size)
    skin, hair = p["skin"], p["hair"]
    cx, cy = HEAD_CENTRE[0], HEAD_CENTRE[1] + p["head_dy"]
    rx, ry = p["head_rx"], p["head_ry"]
    tex_rng = np.random.default_rng(p["texture"])
    # Blotches, mostly in brightness: a person's skin pattern, stable across their images.
    blotch = _smooth_field(tex_rng, size, 7, 2)[0]
    skin_tex = 1.0 + p["texture_amp"] * (
        blotch[..., :1] + 0.3 * blotch[..., 1:] * np.array([1, -0.5, -0.5], np.float32)
    )
    hair_tex = (
        1.0 + 0.22 * np.sin(p["hair_freq"] * (cv.x + p["hair_tilt"] * cv.y) + p["hair_phase"])[..., None]
    )
    hair_tex = hair_tex * (1.0 + 0.1 * _smooth_field(tex_rng, size, 12, 1)[0])
    full = (slice(0, size), slice(0, size))

    # Long hair and neck behind the head.
    if p["hair_style"] == 2:
        sl, cover = cv.ellipse(cx, cy - 6, rx + 8, ry + 4)
        cover = cover * np.clip((p["hair_len"] - cv.y[sl]) * cv.k * 0.5, 0, 1)
        cv.paint(sl, cover, hair * hair_tex[sl])
    neck = np.clip((rx * 0.55 - np.abs(cv.x - cx)) * cv.k + 0.5, 0, 1) * (cv.y > cy + ry * 0.5)
    cv.paint(full, neck.astype(np.float32), skin * 0.78 * skin_tex)
    # Ears, then the head: an ellipse whose lower half narrows towards the chin.
    for side in (-1, 1):
        sl, cover = cv.ellipse(cx + side * rx * 0.97, LEFT_EYE[1] + 6, 5.5, p["ear_ry"])
        cv.paint(sl, cover, skin * 0.9 * skin_tex[sl])
    v = (cv.y - cy) / ry
    narrow = 1.0 - p["jaw"] * np.clip(v, 0, 1) ** p["chin_p"]
    u = (cv.x - cx) / (rx * narrow)
    r2 = u * u + v * v
    head = np.clip((1.0 - np.sqrt(r2)) * rx * cv.k + 0.5, 0, 1)
    cv.paint(full, head, skin * skin_tex)
    cv.z = p["depth"] * np.sqrt(np.clip(1.0 - r2, 0, 1)) * head

    # Relief that the lighting will reveal: nose ridge, brow ridge, cheekbones, eye sockets.
    nose_top = min(p["eyes"][0][1], p["eyes"][1][1])
    ny = NOSE_TIP[1]
    along = np.clip((cv.y - (ny - p["nose_len"])) / p["nose_len"], 0, 1.15)
    ridge = np.exp(-(((cv.x - cx) / (p["nose_w"] * (0.45 + 0.55 * along))) ** 2))
    cv.z += p["nose_h"] * along * ridge * np.exp(-(np.clip(cv.y - ny, 0, None) ** 2) / 8.0)
    for ex, ey in p["eyes"]:
        cv.z -= 4.0 * np.exp(-(((cv.x - ex) / 8.0) ** 2 + ((cv.y - ey) / 5.0) ** 2))
        cv.z += 2.0 * np.exp(-(((cv.x - ex) / 12.0) ** 2 + ((cv.y - (ey + 16)) / 6.0) ** 2))
    cv.z += 2.5 * np.exp(-(((cv.y - (nose_top - p["brow_gap"])) / 3.0) ** 2)) * head

    # Skin details: blush, moles.
    for side in (-1, 1):
        sl, cover = cv.ellipse(cx + side * 22, ny + 2, 9, 6)
        cv.paint(sl, cover * p["blush"], np.array([0.85, 0.3, 0.3], np.float32), opaque=False)
    for mx, my, mr in p["moles"]:
        sl, cover = cv.ellipse(mx, my, mr, mr)
        cv.paint(sl, cover * head[sl] * 0.8, skin * 0.35, opaque=False)

    # Hair on the head: above a curved hairline, with a side part and volume on top.
    if p["hair_style"] != 4:
        dx = (cv.x - cx - p["hair_part"] * (p["hair_style"] == 3)) / rx
        line = cy - ry + p["hairline"] + p["hair_curve"] * dx * dx
        if p["hair_style"] == 1:  # fringe: the hairline drops over the forehead
            line = line + 12 * np.exp(-(dx**2) / 0.25)
        _, volume = cv.ellipse(cx, cy, rx + 1.5, ry + p["hair_volume"], sl=full)
        cover = np.clip((line - cv.y) * cv.k + 0.5, 0, 1) * np.maximum(head, volume)
        cv.paint(full, cover, hair * hair_tex)
        cv.z += cover * p["hair_volume"] * 0.8
    elif p["hair_volume"] > 5:  # a crown of hair around a bald top
        sides = np.clip((np.abs(cv.x - cx) - rx * 0.72) * cv.k, 0, 1) * (cv.y < LEFT_EYE[1] + 4) * head
        cv.paint(full, sides.astype(np.float32), hair * hair_tex)

    # Eyes: sclera, iris, pupil, upper lid; brows above.
    for side, (ex, ey) in zip((-1, 1), p["eyes"]):
        tilt = side * p["eye_tilt"]
        sl, cover = cv.ellipse(ex, ey, p["eye_rx"], p["eye_ry"], tilt)
        cv.paint(sl, cover, np.array([0.92, 0.9, 0.88], np.float32))
        _, iris = cv.ellipse(ex, ey, p["iris_r"], p["iris_r"], sl=sl)
        cv.paint(sl, iris * cover, p["iris"])
        _, pupil = cv.ellipse(ex, ey, p["iris_r"] * 0.42, p["iris_r"] * 0.42, sl=sl)
        cv.paint(sl, pupil * cover, np.zeros(3, np.float32))
        lsl, lid = cv.ellipse(ex, ey - p["eye_ry"] * 0.55, p["eye_rx"] * 1.05, p["eye_ry"] * 0.75, tilt)
        cv.paint(lsl, lid * 0.85, skin * 0.55, opaque=False)
        bx, by = ex + side * 1.5, ey - p["brow_gap"]
        bsl = cv.box(bx, by, p["brow_len"], p["brow_len"])
        bxl = (cv.x[bsl] - bx) / p["brow_len"]
        centre = by - p["brow_arch"] * (1 - bxl * bxl) + side * p["brow_tilt"] * (cv.x[bsl] - bx)
        band = np.clip((p["brow_th"] / 2 - np.abs(cv.y[bsl] - centre)) * cv.k + 0.5, 0, 1)
        band = band * np.clip((1 - np.abs(bxl)) * p["brow_len"] * cv.k * 0.5, 0, 1)
        cv.paint(bsl, band * p["brow_dark"], hair * 0.6, opaque=False)

    # Nostrils.
    for side in (-1, 1):
        sl, cover = cv.ellipse(
            NOSE_TIP[0] + side * p["nose_w"] * 0.45, ny + 1.5, p["nostril"] * 1.5, p["nostril"]
        )
        cv.paint(sl, cover * 0.8, skin * 0.3, opaque=False)

    # Beard / moustache (hair-coloured, textured, partly transparent for stubble).
    my = MOUTH_Y + p["mouth_dy"]
    if p["beard"] in (1, 3):
        sl, cover = cv.ellipse(cx, my - p["lip_th"] - 2.5, p["mouth_w"] + 3, 3.0)
        cv.paint(sl, cover * 0.9, hair * hair_tex[sl], opaque=False)
    if p["beard"] in (2, 3):
        lower = np.clip((cv.y - (ny + 6)) * cv.k * 0.3, 0, 1) * head * (0.35 if p["beard"] == 2 else 0.9)
        cv.paint(full, lower.astype(np.float32), hair * hair_tex, opaque=False)

    if p["glasses"]:
        for ex, ey in p["eyes"]:
            sl, outer = cv.ellipse(ex, ey + 1, 10.5, 8.0)
            _, inner = cv.ellipse(ex, ey + 1, 9.3, 6.8, sl=sl)
            cv.paint(sl, np.clip(outer - inner, 0, 1), p["frame"])
        sl, bridge = cv.ellipse(cx, (p["eyes"][0][1] + p["eyes"][1][1]) / 2 - 1, 6.5, 0.8)
        cv.paint(sl, bridge, p["frame"])

    # Normals from the height field (the light is applied per image).
    gy, gx = np.gradient(cv.z, 1.0 / cv.k)
    norm = np.sqrt(gx * gx + gy * gy + 1.0)
    base = np.concatenate([cv.rgb, cv.alpha[..., None], (-gx / norm)[..., None], (-gy / norm)[..., None]], -1)

    out = np.repeat(base[None], len(_EXPRESSION_P), axis=0)
    mw, th = p["mouth_w"], p["lip_th"]
    for e in range(len(_EXPRESSION_P)):
        cv.rgb, cv.alpha = out[e, ..., :3], out[e, ..., _A]  # views: painting writes into `out`
        if e == 2:  # open: dark inside, teeth, lips around
            sl, cover = cv.ellipse(cx, my + 1, mw * 0.85, th + 3.5)
            cv.paint(sl, cover, p["lip"])
            sl, inner = cv.ellipse(cx, my + 1, mw * 0.7, 3.2)
            cv.paint(sl, inner, np.array([0.25, 0.08, 0.08], np.float32))
            sl, teeth = cv.ellipse(cx, my - 1.2, mw * 0.55, 1.3)
            cv.paint(sl, teeth, np.array([0.9, 0.88, 0.8], np.float32))
        else:
            curve = 2.5 if e == 1 else 0.0
            w = mw * (1.12 if e == 1 else 1.0)
            sl = cv.box(cx, my, w, w)
            xl = (cv.x[sl] - cx) / w
            centre = my - curve * xl * xl
            half = th * (1 - 0.75 * xl * xl)
            lips = np.clip((half - np.abs(cv.y[sl] - centre)) * cv.k + 0.5, 0, 1)
            lips = lips * np.clip((1 - np.abs(xl)) * w * cv.k, 0, 1)
            cv.paint(sl, lips, p["lip"])
            seam = np.clip((0.6 - np.abs(cv.y[sl] - centre)) * cv.k + 0.5, 0, 1) * (np.abs(xl) < 1)
            cv.paint(sl, seam * 0.7, p["lip"] * 0.35, opaque=False)
    return out


def _head_depth(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A mean head's height above the image plane (design units): how far a point moves when the head turns."""
    u = (x - HEAD_CENTRE[0]) / 41.0
    v = (y - HEAD_CENTRE[1]) / 54.0
    nose = 9.0 * np.exp(-(((x - NOSE_TIP[0]) / 6.0) ** 2 + ((y - 66.0) / 12.0) ** 2))
    return 31.0 * np.sqrt(np.clip(1.0 - u * u - v * v, 0.0, 1.0)) + nose


def _render_images(canon: np.ndarray, rng: np.random.Generator, n: int, var: Variation) -> np.ndarray:
    """`n` images of one person (uint8, n x S x S x 3): expression, pose, light, background, occluders, camera."""
    expr_count, size = canon.shape[0], canon.shape[1]
    k = size / DESIGN
    f32 = np.float32
    expr = rng.choice(expr_count, n, p=_EXPRESSION_P)
    angle = np.deg2rad(rng.uniform(-var.rotate_deg, var.rotate_deg, n)).astype(f32)
    scale = np.exp(rng.uniform(-var.scale, var.scale, n)).astype(f32)
    shift = rng.uniform(-var.shift_px, var.shift_px, (n, 2)).astype(f32)
    yaw = rng.uniform(-var.yaw, var.yaw, n).astype(f32)
    pitch = rng.uniform(-var.pitch, var.pitch, n).astype(f32)
    gain = rng.uniform(*var.brightness, (n, 1)) * np.exp(rng.uniform(-var.cast, var.cast, (n, 3)))
    theta = rng.uniform(0, 2 * math.pi, n)
    elev = rng.uniform(0.25, 1.2, n)
    ambient = rng.uniform(*var.ambient, n)
    grey = rng.uniform(0.1, 0.9, (n, 1, 1, 1))
    background = grey + rng.uniform(-0.25, 0.25, (n, 3, 1, 1)) + 0.15 * rng.standard_normal((n, 3, 4, 4))
    blur = rng.uniform(*var.blur, n) * k
    noise = rng.uniform(*var.noise, n)
    torch_seed = int(rng.integers(0, 2**63 - 1))

    # Light in the face's own frame: ambient + Lambertian-like term from a direction in front of the face.
    # Shading a + b * (n . l) is linear in the normal, so each image is a 4-term mix of per-person basis
    # images (albedo, albedo * nx, albedo * ny, albedo * nz); turning the head tilts its normals by (yaw, pitch).
    light = np.stack([np.cos(theta) * np.cos(elev), np.sin(theta) * np.cos(elev), np.sin(elev)], -1)
    diffuse = 1.15 * (1.0 - ambient)
    const = ambient + diffuse * 0.8 * (yaw * light[:, 0] + pitch * light[:, 1])
    coef = np.stack([const, diffuse * light[:, 0], diffuse * light[:, 1], diffuse * light[:, 2]], -1)
    coef = torch.from_numpy((coef[:, None, :] * gain[:, :, None] * 255.0).astype(f32))  # n x 3 x 4
    basis = _lighting_basis(canon)  # E x 3 x 4 x S*S
    fg = torch.empty((n, 4, size * size))
    for e in range(expr_count):
        rows = torch.from_numpy(np.flatnonzero(expr == e))
        if len(rows):
            fg[rows, :3] = torch.einsum("icj,cjp->icp", coef[rows], basis[e])
    fg[:, 3] = torch.from_numpy(canon[expr, ..., _A].reshape(n, -1))

    # Pose: output pixel -> source point by inverse roll/scale/shift, then parallax: a point at height z
    # moves by about z * turn, so the nose slides across the face while the outline barely moves. The map
    # is smooth, so it is computed on a 4-pixel lattice and interpolated.
    coords = (np.arange(size, dtype=f32) + 0.5) / k - 0.5
    gx, gy = np.meshgrid(coords, coords)
    lattice = np.linspace(coords[0], coords[-1], size // 4 + 1, dtype=f32)
    lx_, ly_ = np.meshgrid(lattice, lattice)
    c = f32(DESIGN / 2 - 0.5)
    dx = (lx_[None] - c - shift[:, 0, None, None]) / scale[:, None, None]
    dy = (ly_[None] - c - shift[:, 1, None, None]) / scale[:, None, None]
    ca, sa = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    sx = ca * dx + sa * dy + c
    sy = -sa * dx + ca * dy + c
    z = _head_depth(sx, sy)
    sx = sx - yaw[:, None, None] * z
    sy = sy - pitch[:, None, None] * z
    coarse = torch.from_numpy(np.stack([(sx + 0.5) * (2 * k / size) - 1, (sy + 0.5) * (2 * k / size) - 1], 1))
    grid = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    warped = F.grid_sample(
        fg.view(n, 4, size, size),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )

    # Background: a smooth random colour field seen by the same camera (same gain).
    up = torch.from_numpy(_upsampler(4, size))
    bg = (
        up @ torch.from_numpy((np.clip(background, 0, 1) * gain[:, :, None, None] * 255.0).astype(f32)) @ up.T
    )
    img = warped[:, :3] + bg * (1.0 - warped[:, 3:])

    _occlude(img, rng, var, gx, gy, angle, scale, shift, k)
    img = _blur(img, blur)
    gen = torch.Generator().manual_seed(torch_seed)
    img += torch.randn(img.shape, generator=gen) * torch.from_numpy(noise.astype(f32)).view(n, 1, 1, 1)
    return img.add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _lighting_basis(canon: np.ndarray) -> torch.Tensor:
    """Per expression, the four images whose mix is the lit face: premultiplied albedo times (1, nx, ny, nz)."""
    expr_count = canon.shape[0]
    albedo = canon[..., :3] * canon[..., _A : _A + 1]
    nx, ny = canon[..., _NX], canon[..., _NY]
    nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))
    terms = np.stack([albedo, albedo * nx[..., None], albedo * ny[..., None], albedo * nz[..., None]], 1)
    # E x 4 x S x S x 3 -> E x 3 x 4 x S*S
    return torch.from_numpy(
        np.ascontiguousarray(terms.transpose(0, 4, 1, 2, 3)).reshape(expr_count, 3, 4, -1)
    )


def _occlude(
    img: torch.Tensor,
    rng: np.random.Generator,
    var: Variation,
    gx: np.ndarray,
    gy: np.ndarray,
    angle: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    k: float,
) -> None:
    """Draw, in place, sunglasses-like bars across the eyes and blobs (hands, objects) over the lower face."""
    n = img.shape[0]
    c = DESIGN / 2 - 0.5
    bars = np.flatnonzero(rng.random(n) < var.p_sunglasses)
    blobs = np.flatnonzero(rng.random(n) < var.p_occluder)
    for i in bars:
        half_w, half_h = 44 * scale[i], rng.uniform(4.5, 7.0) * scale[i]
        ex, ey = c + shift[i, 0], (LEFT_EYE[1] - c) * scale[i] + c + shift[i, 1]
        # The output shows the face rolled by -angle (the sampling grid rolls by +angle).
        ca, sa = math.cos(angle[i]), math.sin(angle[i])
        u = ca * (gx - ex) - sa * (gy - ey)
        v = sa * (gx - ex) + ca * (gy - ey)
        cover = np.clip((half_h - np.abs(v)) * k + 0.5, 0, 1) * np.clip((half_w - np.abs(u)) * k + 0.5, 0, 1)
        _fill(img[i], cover, rng.uniform(0, 60, 3))
    for i in blobs:
        ox, oy = rng.uniform(10, 102), rng.uniform(60, 115)
        rx, ry = rng.uniform(12, 26, 2)
        dist = 1.0 - np.sqrt(((gx - ox) / rx) ** 2 + ((gy - oy) / ry) ** 2)
        _fill(img[i], np.clip(dist * min(rx, ry) * k + 0.5, 0, 1), rng.uniform(20, 230, 3))


def _fill(img: torch.Tensor, cover: np.ndarray, colour: np.ndarray) -> None:
    m = torch.from_numpy(cover.astype(np.float32))
    img.mul_(1 - m).add_(torch.from_numpy(colour.astype(np.float32)).view(3, 1, 1) * m)


def _blur(img: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Separable gaussian blur with a per-image sigma in pixels (below 0.3: untouched), edges replicated."""
    smax = float(sigma.max())
    if smax < 0.3:
        return img
    n, ch, h, w = img.shape
    r = math.ceil(2.5 * smax)
    t = np.arange(-r, r + 1, dtype=np.float64)
    kern = np.exp(-0.5 * (t[None] / np.maximum(sigma, 1e-3)[:, None]) ** 2)
    kern[sigma < 0.3] = t == 0
    kern /= kern.sum(1, keepdims=True)
    kern = torch.from_numpy(np.repeat(kern, ch, 0).astype(np.float32))  # one kernel per image channel
    x = F.pad(img.reshape(1, n * ch, h, w), (0, 0, r, r), mode="replicate")
    x = F.conv2d(x, kern.view(n * ch, 1, -1, 1), groups=n * ch)
    x = F.pad(x, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, kern.view(n * ch, 1, 1, -1), groups=n * ch)
    return x.view(n, ch, h, w)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes (4:2:0, libjpeg-turbo) of an RGB uint8 image, as the cv2.imencode output InsightFace stores."""
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(image), quality=int(quality), colorspace="RGB", colorsubsampling="420"
    )


def _identity_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one person: training, demo and demo_hard people come from separate streams."""
    return np.random.default_rng([seed, _SPLITS.index(split), index])


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: the batches are small, so worker threads only add sync cost (10x under
    load), and the bytes then cannot depend on the machine's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def identity_jpegs(
    seed: int, split: str, index: int, count: int, size: int, variation: Variation
) -> list[bytes]:
    """`count` JPEG images of person `index` of `split` ("train", "demo", "demo_hard"), deterministic for a seed."""
    rng = _identity_rng(seed, split, index)
    canon = _render_identity(_face_identity(rng), size)
    with _one_torch_thread():
        images = _render_images(canon, rng, count, variation)
    quality = rng.integers(variation.jpeg[0], variation.jpeg[1] + 1, count)
    return [encode_jpeg(image, q) for image, q in zip(images, quality)]


def _plan_pairs(seed: int, split: str, pairs: int) -> tuple[int, list[tuple[int, int]]]:
    """LFW-style pairs over a pool of fresh people: one positive pair per person, random negatives, shuffled."""
    rng = np.random.default_rng([seed, _SPLITS.index(split), 1 << 32])
    pool = max(2, pairs // 2)
    positive = pairs // 2
    same = rng.permutation(np.arange(positive) % pool)
    left = rng.integers(0, pool, pairs - positive)
    right = (left + rng.integers(1, pool, pairs - positive)) % pool
    plan = [(int(a), int(a)) for a in same] + [(int(a), int(b)) for a, b in zip(left, right)]
    # Mixed order: InsightFace's 10-fold protocol splits the file in order and needs both kinds in every fold.
    return pool, [plan[i] for i in rng.permutation(len(plan))]


def _write_pair_set(
    path: Path, seed: int, split: str, pairs: int, size: int, variation: Variation, bar: tqdm
) -> list[tuple[int, int]]:
    """Render the pair set `split` and write it as an InsightFace .bin; returns the (left, right) person ids."""
    pool, plan = _plan_pairs(seed, split, pairs)
    wanted = np.bincount(np.asarray(plan).ravel(), minlength=pool)
    stacks: dict[int, list[bytes]] = {}
    for person in map(int, np.flatnonzero(wanted)):
        count = int(wanted[person])
        stacks[person] = identity_jpegs(seed, split, person, count, size, variation)[::-1]  # popped in order
        bar.update(count)
    images: list[bytes] = []
    for a, b in plan:
        images += [stacks[a].pop(), stacks[b].pop()]
    write_bin(path, images, [a == b for a, b in plan])
    return plan


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise FembError(f"synth: {name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _previous_run(out_dir: Path, params: dict) -> dict | None:
    """The summary of a complete earlier run with the same parameters (all files present, same sizes), else None."""
    try:
        record = json.loads((out_dir / "synth.json").read_text(encoding="utf-8"))
        if record.get("format") != _FORMAT or record.get("params") != params:
            return None
        for name, size in record["files"].items():
            if (out_dir / name).stat().st_size != size:
                return None
        return record["summary"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _prepare_dir(out_dir: Path) -> None:
    """Create `out_dir`, or clear what an earlier `femb synth` left there; refuse a directory holding other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FembError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = [entry for entry in out_dir.iterdir() if entry.name in _FILES or _STALE_TEMP.fullmatch(entry.name)]
    others = sorted(entry.name for entry in out_dir.iterdir() if entry not in ours)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FembError(
            f"{out_dir}: holds files femb synth did not write ({shown}); choose an empty or new directory"
        )
    # synth.json first: a run cut short must never look complete.
    for entry in sorted(ours, key=lambda e: e.name != "synth.json"):
        if entry.is_dir():
            raise FembError(f"{entry}: is a directory where femb synth writes a file")
        entry.unlink()


def synthesize(
    out_dir: Path,
    identities: int = DEFAULT_IDENTITIES,
    images_per_identity: int = DEFAULT_IMAGES_PER_IDENTITY,
    pairs: int = DEFAULT_PAIRS,
    seed: int = 0,
    image_size: int = 112,
    progress: bool | None = None,
) -> dict:
    """Write a demo InsightFace dataset: train.rec/.idx, property, demo.bin, demo_hard.bin (and synth.json).

    The defaults (400 people x 25 images, 1,000 pairs per set) take about 13 s on one core: hundreds of
    people let a small CNN learn what tells people apart rather than memorise a few, 25 images each show
    it the variation to ignore, and 1,000 pairs give 10 folds of 100 and a 0.7% standard error at 95%
    accuracy. A complete dataset with the same parameters is left as it is; the bytes depend only on the
    parameters (and the numpy, torch and libjpeg-turbo builds).
    """
    out_dir = Path(out_dir)
    params = {
        "identities": _check_int("identities", identities, 2, 10_000_000),
        "images_per_identity": _check_int("images_per_identity", images_per_identity, 1, 100_000),
        "pairs": _check_int("pairs", pairs, 2, 10_000_000),
        "seed": _check_int("seed", seed, 0, 2**63 - 1),
        "image_size": _check_int("image_size", image_size, 32, 1024),
    }
    previous = _previous_run(out_dir, params)
    if previous is not None:
        return {**previous, "dir": str(out_dir), "reused": True}
    _prepare_dir(out_dir)

    started = time.perf_counter()
    num_images = identities * images_per_identity
    total = num_images + 2 * pairs * len(PAIR_SETS)
    disable = None if progress is None else not progress
    with tqdm(total=total, desc="femb synth", unit="img", disable=disable) as bar:
        with RecordWriter(out_dir / "train.rec", out_dir / "train.idx") as writer:
            # InsightFace layout: header [N+1, M], images 1..N, then one [start, end) record per identity.
            writer.write(0, pack(IRHeader(2, [num_images + 1, num_images + 1 + identities], 0, 0), b""))
            key = 1
            for person in range(identities):
                for jpeg in identity_jpegs(seed, "train", person, images_per_identity, image_size, NORMAL):
                    writer.write(key, pack(IRHeader(0, float(person), key, 0), jpeg))
                    key += 1
                bar.update(images_per_identity)
            for person in range(identities):
                key = num_images + 1 + person
                span = [1 + person * images_per_identity, 1 + (person + 1) * images_per_identity]
                writer.write(key, pack(IRHeader(2, span, key, 0), b""))
        write_text(out_dir / "property", f"{identities},{image_size},{image_size}")
        plans = {
            name: _write_pair_set(out_dir / f"{name}.bin", seed, name, pairs, image_size, variation, bar)
            for name, variation in PAIR_SETS.items()
        }

    summary = {
        "dir": str(out_dir),
        "num_classes": identities,
        "num_images": num_images,
        "image_size": image_size,
        "pair_sets": {
            name: {
                "pairs": len(plan),
                "positive": sum(a == b for a, b in plan),
                "people": len({person for pair in plan for person in pair}),
            }
            for name, plan in plans.items()
        },
        "seconds": round(time.perf_counter() - started, 2),
        "reused": False,
    }
    record = {
        "format": _FORMAT,
        "params": params,
        "summary": summary,
        "files": {name: (out_dir / name).stat().st_size for name in _FILES if name != "synth.json"},
        # Person ids of every pair: `demo:3` is person 3 of the demo stream; training people are `train:<label>`.
        "pair_identities": {
            name: [[f"{name}:{a}", f"{name}:{b}"] for a, b in plan] for name, plan in plans.items()
        },
    }
    write_text(out_dir / "synth.json", json.dumps(record, indent=1) + "\n")
    return summary
