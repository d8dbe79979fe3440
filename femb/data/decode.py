"""Encoded face images -> uint8 RGB batches, and their (x/255 - 0.5)/0.5 normalisation (arcface_torch's transform).

The one place that knows the image size, how an image is decoded (libjpeg-turbo for JPEG, PIL for
anything else) and how pixels are normalised. Batches are uint8 N x 3 x H x W in channels-last memory
(N x H x W x 3 bytes, the layout libjpeg-turbo writes): decoding is the only pass over the pixels on the
CPU, and `normalize` turns them into contiguous floats on whichever device they are sent to.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image

from femb.data.images import rgb_pixels

IMAGE_SIZE = 112  # the ArcFace-aligned crop of every InsightFace dataset
_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageDecodeError(ValueError):
    """One image of a batch cannot be decoded or has the wrong size; `index` says which."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


def _decode_with_pil(data: bytes, size: int, out: np.ndarray, colorspace: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (size, size):
                raise ValueError(f"image is {img.width}x{img.height}, expected {size}x{size}")
            rgb = rgb_pixels(img)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # unknown, corrupt or huge images
        raise ValueError(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    out[...] = rgb if colorspace == "RGB" else rgb[..., ::-1]


def _decode(data: bytes, size: int, out: np.ndarray, colorspace: str) -> str | None:
    """Decode into `out` (size, size, 3) as RGB or BGR; what libjpeg-turbo warned about when PIL had to take over."""
    warning = None
    if data[:2] == _JPEG_MAGIC:
        # On a ValueError (too large for the buffer, or corrupt) PIL takes over: it names the size, decodes
        # what libjpeg-turbo only warns about (as OpenCV does for arcface_torch) and refuses truncated data.
        try:
            shape = simplejpeg.decode_jpeg(data, colorspace=colorspace, buffer=out).shape
        except ValueError as err:
            shape, warning = None, str(err).strip() or type(err).__name__
        if shape == out.shape:
            return None
        if shape is not None:
            raise ValueError(f"image is {shape[1]}x{shape[0]}, expected {size}x{size}")
    _decode_with_pil(data, size, out, colorspace)
    return warning


def decode_checked(data: bytes, size: int = IMAGE_SIZE, out: np.ndarray | None = None) -> str | None:
    """Decode as `decode_rgb` does; say what was repaired or reduced on the way, None for a clean image.

    That is a JPEG libjpeg-turbo reports corrupt ("premature end of data segment": decoded anyway, gray
    where data is missing, as OpenCV does) or a 16-bit PNG (reduced to its high byte, as OpenCV does).
    `convert --verify` reports these as warnings; a ValueError means the image cannot be decoded at all.
    """
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    warning = _decode(data, size, out, "RGB")
    if warning is not None:
        return f"libjpeg-turbo reports {warning!r}; decoded anyway, as OpenCV does"
    if data[:8] == _PNG_MAGIC and len(data) > 24 and data[24] == 16:  # IHDR bit depth
        return "a 16-bit PNG, reduced to 8 bits (the high byte, as OpenCV does)"
    return None


def decode_rgb(
    data: bytes, size: int = IMAGE_SIZE, out: np.ndarray | None = None, mirror: bool = False
) -> np.ndarray:
    """Decode one image to RGB uint8 (size, size, 3), mirrored left-right if `mirror`; ValueError if it cannot."""
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    elif out.shape != (size, size, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous uint8 array of shape ({size}, {size}, 3)")
    if not mirror:
        _decode(data, size, out, "RGB")
        return out
    _decode_mirrored(data, size, out, np.empty_like(out))
    return out


def _decode_mirrored(data: bytes, size: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """Decode as BGR into `scratch`, then reverse the bytes of each row into `out`: that mirrors the pixels
    and makes them RGB in one long copy per row, not `size` three-byte ones."""
    _decode(data, size, scratch, "BGR")
    src, dst = scratch.reshape(size, 3 * size), out.reshape(size, 3 * size)
    if (3 * size) % 8:
        np.copyto(dst, src[:, ::-1])
    else:  # in 8-byte words: reverse the words and byte-swap each on the way, three times faster
        np.copyto(dst.view(">u8"), src.view("<u8")[:, ::-1])


def image_batch(n: int, size: int = IMAGE_SIZE, shared: bool = False) -> torch.Tensor:
    """An empty uint8 n x 3 x size x size batch in channels-last memory (in shared memory if `shared`)."""
    shape = (n, size, size, 3)
    if shared:  # as default_collate does in a worker: the batch then crosses to the main process uncopied
        storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(math.prod(shape))
        pixels = torch.empty(0, dtype=torch.uint8).new(storage).view(shape)
    else:  # numpy's allocation: huge pages and reused heap, where torch.empty faults in fresh 4 KB pages
        pixels = torch.from_numpy(np.empty(shape, np.uint8))
    return pixels.permute(0, 3, 1, 2)


def decode_batch(
    images: Sequence[bytes],
    size: int = IMAGE_SIZE,
    flip: np.ndarray | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode (and mirror where `flip`) encoded images into uint8 N x 3 x size x size, channels-last (or `out`).

    `out` must come from `image_batch`; an ImageDecodeError gives the index of the first bad image.
    """
    n = len(images)
    if out is None:
        out = image_batch(n, size)
    pixels = out.permute(0, 2, 3, 1)
    if pixels.shape != (n, size, size, 3) or out.dtype != torch.uint8 or not pixels.is_contiguous():
        raise ValueError(f"out must be a {n} x 3 x {size} x {size} uint8 batch from image_batch")
    array = pixels.numpy()
    mirror = [False] * n if flip is None else flip.tolist()
    scratch = np.empty((size, size, 3), np.uint8)
    for i in range(n):
        try:
            if mirror[i]:
                _decode_mirrored(images[i], size, array[i], scratch)
            else:
                _decode(images[i], size, array[i], "RGB")
        except ValueError as exc:
            raise ImageDecodeError(i, str(exc)) from exc
    return out


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x 3 x H x W on any device -> contiguous (x/255 - 0.5)/0.5 in `dtype` (computed in at least float32).

    The training loader delivers uint8 and this runs after the transfer to the device, so four times
    fewer bytes cross the bus and the channels-last -> contiguous transpose rides along with the
    conversion. x/127.5 - 1 equals the arcface_torch formula bit for bit in float32 (scaling by 2 is exact).
    """
    compute = torch.promote_types(dtype, torch.float32)
    floats = images.to(compute, memory_format=torch.contiguous_format)
    # A tensor divisor: CUDA multiplies by the float32 reciprocal of a Python scalar, one ulp off for 111 of 256 values.
    return floats.div_(torch.full((), 127.5, dtype=compute, device=floats.device)).sub_(1.0).to(dtype)
