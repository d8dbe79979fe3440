"""Loose image files as a face dataset: an image folder or an image list, and each photo made a training crop.

- **Image folder** `ROOT/<identity>/.../<image>`: labels follow the sorted identity folder names, as
  torchvision's `ImageFolder.class_to_idx` does; a folder's images are found recursively and sorted.
  An identity folder without images is left out with a warning (it takes no label), so labels stay
  0..C-1 with every class present.
- **Image list**: `relative/path label` lines (space or tab; the path may hold spaces), the layout
  FaceX-Zoo and MagFace read, with paths under `root`.

`prepare_image` turns one file into the bytes a shard stores (docs/architecture.md "Image sources"): a
JPEG of the dataset's size that needs no alignment, no rotation and no colour conversion keeps its
bytes; everything else is decoded (EXIF orientation applied; grayscale, palette, CMYK and alpha made
RGB), aligned with `norm_crop` when it has landmarks, and encoded once, as JPEG or PNG. A kept JPEG's
header is read, not its body: `femb convert --verify` decodes every image.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from femb.data.align import arcface_template, norm_crop
from femb.errors import FembError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # read in any letter case
MAX_LABEL = 1 << 24  # RecordIO stores labels as float32: the integers below this are exact
_EXIF_ORIENTATION = 0x0112

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL modes of 16-bit samples

log = logging.getLogger(__name__)


class BadImage(FembError):
    """One image that cannot become a training crop: unreadable, corrupt, of the wrong size, unlabelled."""


@dataclass(frozen=True)
class ImageOptions:
    """How a loose photo becomes a crop: its side, and the encoding of images that are re-encoded."""

    image_size: int = 112
    jpeg_quality: int = 95
    lossless: bool = False

    def check(self, aligning: bool) -> None:
        """A FembError naming the option that is out of range (alignment needs an ArcFace template size)."""
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 16:
            raise FembError(f"image_size must be an integer of at least 16, got {self.image_size!r}")
        if aligning:
            arcface_template(self.image_size)  # refuses sizes the template is not defined for
        if not 1 <= self.jpeg_quality <= 100:
            raise FembError(f"jpeg_quality must be between 1 and 100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class SourceImage:
    """One photo of the dataset: its path under the root (the key landmarks and the manifest use) and label."""

    name: str  # relative posix path
    label: int
    size: int  # bytes on disk, part of the source fingerprint
    where: str  # how an error names it: the path, or `list.txt:12`


@dataclass
class ImageSource:
    """The photos an image folder or image list holds, in label order, and the names of the identities."""

    kind: str  # "folder" or "list"
    root: Path
    images: list[SourceImage]
    identities: list[str]  # label -> identity name
    skipped: list[dict]  # {"file", "reason"}: entries left out under skip_bad
    list_path: Path | None = None


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(top: Path) -> list[tuple[str, int]]:
    """(relative posix path, size) of every image file under `top`, recursively, hidden entries left out."""
    found: list[tuple[str, int]] = []
    stack = [""]  # directories relative to `top`, as posix strings (pathlib costs more than the scan)
    while stack:
        relative = stack.pop()
        with os.scandir(os.path.join(top, relative)) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir():
                    stack.append(name)
                elif entry.is_file() and _is_image(entry.name):
                    found.append((name, entry.stat().st_size))
    return sorted(found)


def scan_folder(root: Path) -> ImageSource:
    """The images of `ROOT/<identity>/.../<image>`, labelled by the sorted identity folder names."""
    root = Path(root)
    if not root.is_dir():
        raise FembError(f"{root}: no such directory (expected one folder of images per identity)")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise FembError(f"{root}: holds no identity folders (expected ROOT/<identity>/<image>)")
    images: list[SourceImage] = []
    identities: list[str] = []
    for folder in folders:
        found = _walk_images(root / folder)
        if not found:
            log.warning("%s: an identity folder with no images, left out", root / folder)
            continue
        label = len(identities)
        identities.append(folder)
        images += [
            SourceImage(f"{folder}/{rel}", label, size, os.path.join(root, folder, rel))
            for rel, size in found
        ]
    if not images:
        raise FembError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in any identity folder")
    return ImageSource("folder", root, images, identities, [])


def _list_identities(images: list[SourceImage], num_classes: int) -> list[str]:
    """Name each label by its images' parent folder when labels and folders correspond one to one, else by number."""
    parents: dict[int, set[str]] = {}
    for image in images:
        parents.setdefault(image.label, set()).add(PurePosixPath(image.name).parent.name)
    names = [next(iter(parents[c])) if len(parents.get(c, ())) == 1 else "" for c in range(num_classes)]
    if all(names) and len(set(names)) == num_classes:
        return names
    return [str(c) for c in range(num_classes)]


def read_image_list(list_path: Path, root: Path | None = None, skip_bad: bool = False) -> ImageSource:
    """The images of a `relative/path label` list under `root` (default: the list's folder), in list order.

    A malformed line, a label that is not an integer in [0, 2**24), a duplicate path or a missing file
    is a BadImage naming the list and line; with `skip_bad` the entry is left out and listed instead.
    """
    list_path = Path(list_path)
    root = Path(root) if root is not None else list_path.parent
    if not list_path.is_file():
        raise FembError(f"{list_path}: no such image list")
    if not root.is_dir():
        raise FembError(f"root {root}: no such directory (the image list's paths are relative to it)")
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise FembError(f"{list_path}: the image list is not UTF-8 text") from None
    images: list[SourceImage] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{list_path}:{number}"
        fields = text.rsplit(None, 1)
        try:
            if len(fields) != 2:
                raise BadImage(f"{where}: expected `relative/path label`, got {text!r}")
            name, label_text = fields[0].replace("\\", "/"), fields[1]
            try:
                label = int(label_text)
            except ValueError:
                raise BadImage(f"{where}: the label {label_text!r} is not an integer") from None
            if not 0 <= label < MAX_LABEL:
                raise BadImage(f"{where}: the label {label} is out of range [0, {MAX_LABEL})")
            if name in seen:
                raise BadImage(f"{where}: {name} is listed a second time")
            try:
                size = (root / name).stat().st_size
            except OSError as err:
                raise BadImage(f"{where}: cannot read {root / name} ({err.strerror or err})") from None
        except BadImage as err:
            if not skip_bad:
                raise
            skipped.append({"file": fields[0] if fields else text, "reason": str(err)})
            continue
        seen.add(name)
        images.append(SourceImage(name, label, size, where))
    if not images:
        raise FembError(f"{list_path}: the image list names no usable image")
    images.sort(key=lambda image: image.label)  # stable: list order within a label
    num_classes = images[-1].label + 1
    return ImageSource("list", root, images, _list_identities(images, num_classes), skipped, list_path)


def rgb_pixels(img: Image.Image) -> np.ndarray:
    """uint8 RGB pixels (H, W, 3) of a PIL image as OpenCV's IMREAD_COLOR decodes it (arcface_torch's decoder).

    A 16-bit sample keeps its high byte (v >> 8, OpenCV's conversion), where PIL's own convert("RGB")
    clips a 16-bit grayscale image to white. A 32-bit integer image with values beyond 16 bits, or a float
    image, is refused.
    """
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise ValueError(f"a {img.mode} image with values outside 16 bits; faces are 8- or 16-bit images")
        gray = (values.astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        raise ValueError("a floating-point image; faces are 8- or 16-bit images")
    return np.asarray(img.convert("RGB"))


def _open(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.size  # noqa: B018 (parses the header)
    except UnidentifiedImageError:
        raise BadImage(f"{where}: not an image file (no known format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"{where}: not a readable image ({err})") from None
    return image


def _decode(image: Image.Image, where: str) -> np.ndarray:
    """RGB pixels, EXIF orientation applied; grayscale, palette, CMYK, alpha and 16-bit images made RGB."""
    try:
        image.load()
        return rgb_pixels(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImage(f"{where}: a corrupt image ({err})") from None


def _decode_bgr(image: Image.Image, data: bytes, where: str) -> np.ndarray:
    """BGR pixels as `_decode` gives them, decoded by OpenCV where it is the faster and equal path.

    Baseline/progressive RGB or grayscale JPEGs that end in their EOI marker go through `cv2.imdecode`
    (libjpeg-turbo, EXIF orientation applied), twice as fast as PIL; anything else, a truncated JPEG
    included (PIL refuses it where OpenCV would fill it grey), is decoded by PIL.
    """
    if image.format == "JPEG" and image.mode in ("RGB", "L") and data.rstrip(b"\0").endswith(b"\xff\xd9"):
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if pixels is not None:
            return pixels
    return cv2.cvtColor(_decode(image, where), cv2.COLOR_RGB2BGR)


def encode(pixels: np.ndarray, options: ImageOptions) -> bytes:
    """Encode RGB pixels once: JPEG at the options' quality, or PNG when lossless (OpenCV, libjpeg-turbo)."""
    return _encode_bgr(cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), options)


def _encode_bgr(bgr: np.ndarray, options: ImageOptions) -> bytes:
    if options.lossless:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 HxWx3 array
        raise RuntimeError("OpenCV could not encode an image")
    return buf.tobytes()


def prepare_image(
    data: bytes, options: ImageOptions, landmarks: np.ndarray | None = None, where: str = "image"
) -> bytes:
    """The bytes a shard stores for one photo: kept when an aligned RGB JPEG, else decoded, aligned, encoded.

    Without landmarks the photo must be image_size x image_size already; otherwise a BadImage names it,
    its size and `landmarks`.
    """
    side = options.image_size
    if landmarks is None and _plain_aligned_jpeg(data, side):
        return data
    image = _open(data, where)
    if landmarks is None:
        kept = image.format == "JPEG" and image.mode == "RGB" and image.size == (side, side)
        if kept and image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return data
        pixels = _decode(image, where)
        if pixels.shape[:2] != (side, side):
            height, width = pixels.shape[:2]
            raise BadImage(
                f"{where}: is {width}x{height}, not an aligned {side}x{side} crop; give its five points "
                "with `landmarks` to align it"
            )
        return encode(pixels, options)
    pixels = _decode_bgr(image, data, where)  # norm_crop keeps channels as given: no RGB round trip
    try:
        crop = norm_crop(pixels, landmarks, side, name=where)
    except FembError as err:  # degenerate landmarks: this image's fault, skippable like a corrupt one
        raise BadImage(str(err)) from None
    return _encode_bgr(crop, options)


def _plain_aligned_jpeg(data: bytes, side: int) -> bool:
    """A colour JPEG of side x side without an EXIF block: kept as it is, judged from its header alone.

    The same verdict as PIL's (format JPEG, mode RGB, size, no rotation) at a tenth of the cost; a JPEG
    with EXIF, or anything this does not recognise, goes the PIL way.
    """
    if not data.startswith(b"\xff\xd8"):
        return False
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return False
    if (width, height) != (side, side) or colorspace not in ("YCbCr", "RGB"):
        return False
    position = 2  # walk the marker segments up to the scan: an APP1 "Exif" block may rotate the image
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xDA:  # start of scan
            return True
        if marker == 0xE1 and data[position + 4 : position + 10] == b"Exif\x00\x00":
            return False
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return False


def check_image(data: bytes, options: ImageOptions, where: str = "image") -> None:
    """Decode stored bytes fully (what `--verify` asks): a BadImage when corrupt or not image_size square."""
    pixels = _decode(_open(data, where), where)
    side = options.image_size
    if pixels.shape[:2] != (side, side):
        raise BadImage(f"{where}: decodes to {pixels.shape[1]}x{pixels.shape[0]}, not {side}x{side}")


def read_image(path: Path | str, where: str) -> bytes:
    """The bytes of one image file; a BadImage naming it when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise BadImage(f"{where}: cannot read {path} ({err.strerror or err})") from None
