"""Encoded face images -> normalised float32 batches: libjpeg-turbo decode, mirror, (x/255 - 0.5)/0.5, RGB, CHW."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image

IMAGE_SIZE = 112  # the ArcFace-aligned crop of every InsightFace dataset
_JPEG_MAGIC = b"\xff\xd8"
_CHUNK = 16  # images decoded then normalised together, so that their pixels are still in cache


class ImageDecodeError(ValueError):
    """One image of a batch cannot be decoded or has the wrong size; `index` says which."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


def _decode_with_pil(data: bytes, size: int, out: np.ndarray) -> None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (size, size):
                raise ValueError(f"image is {img.width}x{img.height}, expected {size}x{size}")
            out[...] = np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # unknown, corrupt or huge images
        raise ValueError(f"cannot decode image ({len(data)} bytes): {exc}") from exc


def decode_rgb(data: bytes, size: int = IMAGE_SIZE, out: np.ndarray | None = None) -> np.ndarray:
    """Decode one image to RGB uint8 (size, size, 3): libjpeg-turbo for JPEG, PIL for anything else."""
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    if data[:2] == _JPEG_MAGIC:
        # On a ValueError (too large for the buffer, or corrupt) PIL takes over: it names the size, decodes
        # what libjpeg-turbo only warns about (as OpenCV does for arcface_torch) and refuses truncated data.
        try:
            shape = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out).shape
        except ValueError:
            shape = None
        if shape == out.shape:
            return out
        if shape is not None:
            raise ValueError(f"image is {shape[1]}x{shape[0]}, expected {size}x{size}")
    _decode_with_pil(data, size, out)
    return out


def normalise_batch(
    pixels: np.ndarray, flip: np.ndarray | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RGB uint8 N x H x W x 3 -> float32 N x 3 x H x W, (x/255 - 0.5)/0.5 as arcface_torch, mirrored where flip."""
    n, height, width, _ = pixels.shape
    if out is None:
        out = torch.empty((n, 3, height, width), dtype=torch.float32)
    if flip is None or not flip.any():
        chw = pixels.transpose(0, 3, 1, 2)
    else:
        # The mirror rides along with the HWC -> CHW copy; a separate flip of 3-byte pixels costs as much again.
        chw = np.empty((n, 3, height, width), np.uint8)
        for i in range(n):
            chw[i] = (pixels[i, :, ::-1] if flip[i] else pixels[i]).transpose(2, 0, 1)
    out.copy_(torch.from_numpy(chw))
    # x/127.5 - 1 equals (x/255 - 0.5)/0.5 bit for bit in float32 (scaling by 2 is exact), in one pass less.
    return out.div_(127.5).sub_(1.0)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x 3 x H x W on any device -> (x/255 - 0.5)/0.5 in `dtype` (computed in at least float32).

    The training loader delivers uint8 and this runs after the transfer to the device, so four times
    fewer bytes cross the bus; x/127.5 - 1 equals the arcface_torch formula bit for bit in float32.
    """
    compute = torch.promote_types(dtype, torch.float32)
    return images.to(compute).div_(127.5).sub_(1.0).to(dtype)


def decode_batch(
    images: Sequence[bytes],
    size: int = IMAGE_SIZE,
    flip: np.ndarray | None = None,
    scratch: np.ndarray | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode, mirror (where flip) and normalise encoded images into one float32 N x 3 x H x W tensor (or `out`)."""
    n = len(images)
    if scratch is None or scratch.shape[0] < n or scratch.shape[1:] != (size, size, 3):
        scratch = np.empty((n, size, size, 3), np.uint8)
    if out is None:
        out = torch.empty((n, 3, size, size), dtype=torch.float32)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        for i in range(lo, hi):
            try:
                decode_rgb(images[i], size, out=scratch[i])
            except ValueError as exc:
                raise ImageDecodeError(i, str(exc)) from exc
        normalise_batch(scratch[lo:hi], None if flip is None else flip[lo:hi], out[lo:hi])
    return out
