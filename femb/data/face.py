"""The demo faces' model: a random parametric person, rendered once in the ArcFace-aligned frame.

A person (`face_identity`) is head shape and depth, skin tone and blotch pattern, hair style and colour,
eye spacing, size and iris colour, brows, nose relief, lips, beard, glasses and moles. `render_face`
paints them in the 112x112 ArcFace-aligned frame (scaled to the image size) as albedo, alpha and surface
normals, in three expressions; `femb.data.capture` then photographs that render the way aligned crops vary.
"""

from __future__ import annotations

import math

import numpy as np

DESIGN = 112.0  # every coordinate below is in the 112x112 ArcFace-aligned frame, scaled to `image_size`
# InsightFace's 5-point template (arcface_torch `arcface_dst`): eyes, nose tip, mouth corners.
LEFT_EYE = (38.29, 51.70)
RIGHT_EYE = (73.53, 51.50)
NOSE_TIP = (56.03, 71.74)
MOUTH_Y = 92.3
HEAD_CENTRE = (56.0, 60.0)
# Channels of an identity's canonical render: albedo RGB (0-2), coverage alpha, surface normal x / y.
ALPHA, NORMAL_X, NORMAL_Y = 3, 4, 5
EXPRESSION_P = (0.55, 0.3, 0.15)  # neutral, smile, open mouth

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


def upsampler(cells: int, size: int) -> np.ndarray:
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
    up = upsampler(cells, size)
    return np.moveaxis(up @ grid @ up.T, 1, -1)


def face_identity(rng: np.random.Generator) -> dict:
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


def render_face(p: dict, size: int) -> np.ndarray:
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

    out = np.repeat(base[None], len(EXPRESSION_P), axis=0)
    mw, th = p["mouth_w"], p["lip_th"]
    for e in range(len(EXPRESSION_P)):
        cv.rgb, cv.alpha = out[e, ..., :3], out[e, ..., ALPHA]  # views: painting writes into `out`
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
