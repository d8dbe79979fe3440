"""Capture variation of the demo faces: how one photo of a person differs from another, as aligned crops do.

`photograph` turns a person's canonical render (`femb.data.face`) into JPEG images, each with its own
expression, roll, scale and shift left over by 5-point alignment, yaw and pitch as depth parallax, light
from a random direction, brightness and white balance, background, sunglasses-like bars and blobs,
gaussian blur, sensor noise and JPEG quality. `NORMAL` varies like training data, `HARD` more.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F

from femb.data.face import (
    ALPHA,
    DESIGN,
    EXPRESSION_P,
    HEAD_CENTRE,
    LEFT_EYE,
    NORMAL_X,
    NORMAL_Y,
    NOSE_TIP,
    upsampler,
)


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
    expr = rng.choice(expr_count, n, p=EXPRESSION_P)
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
    fg[:, 3] = torch.from_numpy(canon[expr, ..., ALPHA].reshape(n, -1))

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
    up = torch.from_numpy(upsampler(4, size))
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
    albedo = canon[..., :3] * canon[..., ALPHA : ALPHA + 1]
    nx, ny = canon[..., NORMAL_X], canon[..., NORMAL_Y]
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


def photograph(canon: np.ndarray, rng: np.random.Generator, count: int, variation: Variation) -> list[bytes]:
    """`count` JPEG photos of the person rendered as `canon`, varied by `variation`, drawn from `rng`."""
    with _one_torch_thread():
        images = _render_images(canon, rng, count, variation)
    quality = rng.integers(variation.jpeg[0], variation.jpeg[1] + 1, count)
    return [encode_jpeg(image, q) for image, q in zip(images, quality)]
