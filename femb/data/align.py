"""Five-point face alignment onto the ArcFace template, as InsightFace's `insightface/utils/face_align.py` does it.

A face detector (RetinaFace, SCRFD, MTCNN) gives five landmarks in image pixels: left eye, right eye, nose
tip, left and right mouth corners (left and right as seen in the image). `estimate_norm` finds the
least-squares similarity (rotation, uniform scale and translation, never a reflection) that carries them onto
the ArcFace template, the five points every InsightFace training set was aligned to (Deng et al., "ArcFace",
CVPR 2019). It is Umeyama's closed form ("Least-squares estimation of transformation parameters between two
point patterns", IEEE TPAMI 13(4), 1991), the estimator behind scikit-image's `SimilarityTransform`, which
InsightFace calls. `norm_crop` warps the image with it (bilinear, black outside: `cv2.warpAffine`), so the
crop has the pixels of `insightface.utils.face_align.norm_crop`.

Landmarks that cannot be a face (not finite, all on one point, all on one line) are a FembError that names
the image when the caller says which (`name=`), rather than a matrix of NaNs or a crop of nothing.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import ArrayLike

from femb.errors import FembError

# InsightFace's `arcface_dst` for a 112 x 112 crop, kept in float32 as InsightFace stores (and scales) it, so
# that every crop size gets the very target points InsightFace uses.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ARCFACE_TEMPLATE.flags.writeable = False
POINTS = ("left eye", "right eye", "nose", "left mouth corner", "right mouth corner")

_COINCIDENT = 1e-9  # spread below this fraction of the coordinates' magnitude: one point
_COLLINEAR = 1e-6  # second singular value below this fraction of the first: one line


def arcface_template(image_size: int = 112) -> np.ndarray:
    """The ArcFace template for an image_size x image_size crop, (5, 2) float64, by InsightFace's rule.

    A multiple of 112 scales the 112 template by image_size / 112; otherwise a multiple of 128 scales it by
    image_size / 128 and moves it right by 8 * image_size / 128 (the 112 crop centred in 128 columns, its
    rows unchanged). Sizes that are neither are refused: InsightFace asserts the same.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size <= 0:
        raise FembError(f"image_size must be a positive integer, got {image_size!r}")
    if image_size % 112 == 0:
        ratio, shift = image_size / 112, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128
        shift = 8.0 * ratio
    else:
        raise FembError(
            f"image_size must be a multiple of 112 or 128 (the crops InsightFace's ArcFace template is "
            f"defined for), got {image_size}"
        )
    points = ARCFACE_TEMPLATE * np.float32(ratio)  # in float32, as InsightFace computes it
    points[:, 0] += np.float32(shift)
    return points.astype(np.float64)


def _prefix(name: str | None) -> str:
    return f"{name}: " if name else ""


def _landmarks(landmarks: ArrayLike, name: str | None) -> np.ndarray:
    """The landmarks as (5, 2) float64, or a FembError if they cannot be a face's."""
    prefix = _prefix(name)
    try:
        points = np.asarray(landmarks, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FembError(f"{prefix}landmarks are not numbers ({exc})") from None
    if points.shape != (5, 2):
        hint = "; landmarks_68_to_5 reduces 68-point iBUG landmarks" if points.shape == (68, 2) else ""
        raise FembError(
            f"{prefix}landmarks must be five (x, y) points ({', '.join(POINTS)}), an array of shape (5, 2); "
            f"got shape {points.shape}{hint}"
        )
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise FembError(
            f"{prefix}landmarks are not finite ({POINTS[i]} is {points[i].tolist()}); "
            "the detector found no face here: skip the image or detect its landmarks again"
        )
    spread = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    what = None
    if spread[0] <= _COINCIDENT * max(1.0, float(np.abs(points).max())):
        what = f"all on one point, {points[0].tolist()}"
    elif spread[1] <= _COLLINEAR * spread[0]:
        what = "all on one line"
    if what:
        raise FembError(
            f"{prefix}landmarks are degenerate ({what}); no face looks like that: "
            "skip the image or detect its landmarks again"
        )
    return points


def estimate_norm(landmarks: ArrayLike, image_size: int = 112, *, name: str | None = None) -> np.ndarray:
    """The (2, 3) float64 similarity that maps five landmarks (image pixels) onto `arcface_template(image_size)`.

    Umeyama (1991), eqs. (38)-(42), as scikit-image's `_umeyama` computes it: centre both point sets, take
    the 2 x 2 covariance and its SVD U S V^T, flip the last axis (D = diag(1, -1)) when the covariance has a
    negative determinant so that the result is a rotation and never a mirror, R = U D V^T, scale =
    trace(S D) / (variance of the landmarks), translation = mean(template) - scale R mean(landmarks). It is
    the matrix InsightFace's `estimate_norm` returns (`SimilarityTransform.estimate(...).params[0:2, :]`).
    `name` (the image) prefixes every error.
    """
    target = arcface_template(image_size)
    source = _landmarks(landmarks, name)
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_c, target_c = source - source_mean, target - target_mean
    covariance = target_c.T @ source_c / len(source)
    d = np.array([1.0, -1.0 if np.linalg.det(covariance) < 0 else 1.0])
    u, s, vt = np.linalg.svd(covariance)
    if d[1] < 0 and s[0] - s[1] <= _COINCIDENT * s[0]:  # trace(S D) = 0: every rotation fits equally badly
        raise FembError(
            f"{_prefix(name)}landmarks are degenerate (a mirror image of the template that no rotation fits "
            "better than another); skip the image or detect its landmarks again"
        )
    rotation = (u * d) @ vt
    scale = (s @ d) / source_c.var(axis=0).sum()
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = target_mean - scale * (rotation @ source_mean)
    return matrix


def norm_crop(
    image: np.ndarray, landmarks: ArrayLike, image_size: int = 112, *, name: str | None = None
) -> np.ndarray:
    """The image_size x image_size x 3 uint8 aligned crop of an H x W x 3 uint8 image (channels kept as given).

    `cv2.warpAffine(image, estimate_norm(...), (image_size, image_size), borderValue=0.0)`: bilinear, black
    outside the image, exactly InsightFace's `norm_crop`. `name` (the image) prefixes every error.
    """
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8 or 0 in pixels.shape:
        raise FembError(
            f"{_prefix(name)}image must be an H x W x 3 uint8 array, got shape {pixels.shape} of {pixels.dtype}"
        )
    matrix = estimate_norm(landmarks, image_size, name=name)
    return cv2.warpAffine(np.ascontiguousarray(pixels), matrix, (image_size, image_size), borderValue=0.0)


def landmarks_68_to_5(points: ArrayLike, *, name: str | None = None) -> np.ndarray:
    """68 iBUG 300-W landmarks (0-based, (68, 2)) -> the five of `estimate_norm`, (5, 2) float64.

    The eyes are the midpoints of their corners (36 and 39, 42 and 45), the nose is its tip (30) and the
    mouth corners are 48 and 54.
    """
    try:
        full = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FembError(f"{_prefix(name)}landmarks are not numbers ({exc})") from None
    if full.shape != (68, 2):
        raise FembError(
            f"{_prefix(name)}68-point landmarks must be an array of shape (68, 2), got shape {full.shape}"
        )
    return np.stack([(full[36] + full[39]) / 2, (full[42] + full[45]) / 2, full[30], full[48], full[54]])
