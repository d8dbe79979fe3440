"""femb.data.align against scikit-image's SimilarityTransform and cv2.warpAffine, the pair InsightFace's
`face_align.norm_crop` is made of, and every way landmarks can fail to be a face."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from skimage.transform import SimilarityTransform

from femb.data.align import arcface_template, estimate_norm, landmarks_68_to_5, norm_crop
from femb.errors import FembError

# The ArcFace template as InsightFace writes it (float32) and its rule for other crop sizes, spelled out here
# independently of femb.
INSIGHTFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# size -> (ratio, x shift): multiples of 112 scale; other multiples of 128 scale by size/128 and shift x by 8*ratio.
SIZES = {112: (1.0, 0.0), 224: (2.0, 0.0), 128: (1.0, 8.0), 256: (2.0, 16.0), 336: (3.0, 0.0)}


def insightface_dst(size: int) -> np.ndarray:
    ratio, shift = SIZES[size]
    dst = INSIGHTFACE_DST * np.float32(ratio)
    dst[:, 0] += np.float32(shift)
    return dst.astype(np.float64)


def skimage_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """`SimilarityTransform` estimated from src to dst, `.params[0:2, :]` (from_estimate on scikit-image >= 0.26)."""
    if hasattr(SimilarityTransform, "from_estimate"):
        tform = SimilarityTransform.from_estimate(src, dst)
    else:  # pragma: no cover - older scikit-image
        tform = SimilarityTransform()
        assert tform.estimate(src, dst)
    return tform.params[0:2, :]


def similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert(matrix: np.ndarray) -> np.ndarray:
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def random_landmarks(rng: np.random.Generator, size: int) -> np.ndarray:
    """The template carried into an image by a random similarity, plus a few pixels of detector noise."""
    to_crop = similarity(
        rng.uniform(0.3, 1.5), rng.uniform(-60, 60), rng.uniform(-80, 80), rng.uniform(-80, 80)
    )
    return apply(invert(to_crop), insightface_dst(size)) + rng.normal(0.0, 2.0, (5, 2))


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("size", sorted(SIZES))
def test_arcface_template_follows_insightface_size_rule(size: int) -> None:
    assert arcface_template(size).dtype == np.float64
    np.testing.assert_array_equal(arcface_template(size), insightface_dst(size))


@pytest.mark.parametrize("size", [0, -112, 100, 200, 113, 112.0, True])
def test_arcface_template_refuses_sizes_insightface_does_not_define(size: object) -> None:
    with pytest.raises(FembError, match="image_size") as excinfo:
        arcface_template(size)  # type: ignore[arg-type]
    assert repr(size) in one_line_error(excinfo) or str(size) in one_line_error(excinfo)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_estimate_norm_equals_skimage_similarity_transform(size: int) -> None:
    rng = np.random.default_rng(size)
    for _ in range(50):
        landmarks = random_landmarks(rng, size)
        matrix = estimate_norm(landmarks, size)
        assert matrix.shape == (2, 3) and matrix.dtype == np.float64
        np.testing.assert_allclose(
            matrix, skimage_matrix(landmarks, insightface_dst(size)), rtol=0, atol=1e-9
        )


def test_estimate_norm_matches_insightface_float32_recipe() -> None:
    """InsightFace hands skimage its float32 template and float32 detector landmarks; femb computes in float64."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        landmarks = random_landmarks(rng, 112).astype(np.float32)
        insightface = skimage_matrix(landmarks, INSIGHTFACE_DST)
        np.testing.assert_allclose(estimate_norm(landmarks), insightface, rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_template_maps_onto_itself_as_identity(size: int) -> None:
    np.testing.assert_allclose(estimate_norm(arcface_template(size), size), np.eye(2, 3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale, degrees, tx, ty", [(0.5, 30.0, 12.0, -7.5), (2.25, -135.0, -40.0, 90.0)])
def test_known_similarity_is_recovered_exactly(scale: float, degrees: float, tx: float, ty: float) -> None:
    to_crop = similarity(scale, degrees, tx, ty)
    landmarks = apply(invert(to_crop), arcface_template(112))  # noiseless: the fit is exact
    np.testing.assert_allclose(estimate_norm(landmarks), to_crop, rtol=0, atol=1e-10)


@pytest.mark.parametrize("size", [112, 128])
def test_mirrored_landmarks_give_rotation_not_reflection(size: int) -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        landmarks = random_landmarks(rng, size) * [-1.0, 1.0] + [500.0, 0.0]  # a mirror image of a face
        matrix = estimate_norm(landmarks, size)
        assert np.linalg.det(matrix[:, :2]) > 0
        a, b = matrix[0, 0], matrix[1, 0]  # a rotation-and-scale [[a, -b], [b, a]], never [[a, b], [b, -a]]
        np.testing.assert_allclose(matrix[:, :2], [[a, -b], [b, a]], rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            matrix, skimage_matrix(landmarks, insightface_dst(size)), rtol=0, atol=1e-9
        )


def test_mirror_that_fits_every_rotation_equally_is_refused() -> None:
    """Landmarks whose covariance with the template is a pure reflection: trace(S D) = 0, scale 0."""
    dst = arcface_template(112)
    dst_c = dst - dst.mean(axis=0)
    reflection = np.array([[0.6, 0.8], [0.8, -0.6]])
    landmarks = dst_c @ np.linalg.inv(dst_c.T @ dst_c / 5) @ reflection.T * 100 + 200
    with pytest.raises(FembError, match="^face.png: landmarks are degenerate .*mirror") as excinfo:
        estimate_norm(landmarks, name="face.png")
    one_line_error(excinfo)


@pytest.mark.parametrize("size", [112, 224, 128])
def test_norm_crop_equals_warp_affine_with_skimage_matrix(size: int) -> None:
    rng = np.random.default_rng(size + 1)
    image = rng.integers(0, 256, (300, 250, 3), dtype=np.uint8)
    for _ in range(5):
        landmarks = random_landmarks(rng, size) / 2 + [125.0, 150.0]
        crop = norm_crop(image, landmarks, size)
        expected = cv2.warpAffine(
            image, skimage_matrix(landmarks, insightface_dst(size)), (size, size), borderValue=0.0
        )
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, expected)


def test_norm_crop_takes_non_contiguous_images() -> None:
    rng = np.random.default_rng(5)
    bgr = rng.integers(0, 256, (160, 140, 3), dtype=np.uint8)
    landmarks = arcface_template(112) + 10.0
    np.testing.assert_array_equal(
        norm_crop(bgr[..., ::-1], landmarks), norm_crop(bgr[..., ::-1].copy(), landmarks)
    )


def smooth_face(size: int) -> np.ndarray:
    """A smooth, asymmetric uint8 pattern (bilinear resampling of it loses almost nothing)."""
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [
        128 + 100 * np.sin(2 * np.pi * (1.3 * x + 0.4 * y)),
        128 + 100 * np.cos(2 * np.pi * (0.5 * x - 1.1 * y)),
        255 * np.exp(-((x - 0.3) ** 2 + (y - 0.6) ** 2) / 0.08),
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).round().astype(np.uint8)


def test_face_rendered_at_known_similarity_is_recovered() -> None:
    face = smooth_face(112)
    # crop -> image: the face 2.5 times larger and turned 25 degrees
    to_image = similarity(2.5, 25.0, 150.0, 40.0)
    image = cv2.warpAffine(face, to_image, (480, 480), borderValue=0.0)  # image(to_image(p)) = face(p)
    landmarks = apply(to_image, arcface_template(112))
    crop = norm_crop(image, landmarks, 112, name="rendered.png")
    interior = (slice(6, -6), slice(6, -6))
    error = np.abs(crop[interior].astype(int) - face[interior].astype(int))
    assert error.mean() < 0.1 and error.max() <= 2
    shifted = norm_crop(image, landmarks + [3.0, 0.0])  # three image pixels off: visibly not the face
    assert np.abs(shifted[interior].astype(int) - face[interior].astype(int)).mean() > 2.0


def test_landmarks_68_to_5_picks_eye_corner_midpoints_nose_tip_and_mouth_corners() -> None:
    points = np.arange(136, dtype=np.float64).reshape(68, 2)  # point i is (2i, 2i + 1)
    expected = [[75.0, 76.0], [87.0, 88.0], [60.0, 61.0], [96.0, 97.0], [108.0, 109.0]]
    five = landmarks_68_to_5(points)
    assert five.dtype == np.float64
    np.testing.assert_array_equal(five, expected)
    np.testing.assert_array_equal(landmarks_68_to_5(points.tolist()), expected)


def test_landmarks_68_to_5_refuses_other_shapes() -> None:
    with pytest.raises(FembError, match=r"^a.jpg: 68-point landmarks .*\(5, 2\)") as excinfo:
        landmarks_68_to_5(np.zeros((5, 2)), name="a.jpg")
    one_line_error(excinfo)


BAD_LANDMARKS = {
    "not finite": (np.where(np.eye(5, 2, k=-2) > 0, np.nan, arcface_template(112)), r"not finite \(nose is"),
    "infinite": (arcface_template(112) + [[0, 0], [np.inf, 0], [0, 0], [0, 0], [0, 0]], "not finite"),
    "coincident": (np.full((5, 2), 17.3), r"degenerate \(all on one point"),
    "collinear": (
        np.array([[0.1, 0.2], [1.1, 2.2], [2.1, 4.2], [5.1, 10.2], [-3.9, -7.8]]) * 31.7,
        "one line",
    ),
    "collinear vertical": (np.array([[40.0, y] for y in (10.0, 20.0, 35.0, 50.0, 70.0)]), "one line"),
}


@pytest.mark.parametrize("case", sorted(BAD_LANDMARKS))
def test_bad_landmarks_raise_fembError_naming_the_image(case: str) -> None:
    landmarks, reason = BAD_LANDMARKS[case]
    image = np.zeros((120, 120, 3), np.uint8)
    with pytest.raises(FembError, match=f"^img/001.jpg: landmarks are .*{reason}") as excinfo:
        norm_crop(image, landmarks, name="img/001.jpg")
    assert "skip the image" in one_line_error(excinfo)
    with pytest.raises(FembError, match=f"^landmarks are .*{reason}"):
        estimate_norm(landmarks)


@pytest.mark.parametrize("shape", [(4, 2), (5, 3), (10,), (68, 2)])
def test_wrong_landmark_shape_is_an_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(FembError, match=r"^img/001.jpg: landmarks must be five .*\(5, 2\)") as excinfo:
        estimate_norm(np.ones(shape), name="img/001.jpg")
    message = one_line_error(excinfo)
    assert str(shape) in message
    assert ("landmarks_68_to_5" in message) == (shape == (68, 2))


def test_non_numeric_landmarks_are_an_error() -> None:
    with pytest.raises(FembError, match="^x.png: landmarks are not numbers"):
        estimate_norm([["a", "b"]] * 5, name="x.png")


@pytest.mark.parametrize(
    "image",
    [np.zeros((50, 50), np.uint8), np.zeros((50, 50, 4), np.uint8), np.zeros((50, 50, 3), np.float32)],
)
def test_norm_crop_refuses_images_that_are_not_hxwx3_uint8(image: np.ndarray) -> None:
    with pytest.raises(FembError, match=r"^x.png: image must be an H x W x 3 uint8 array") as excinfo:
        norm_crop(image, arcface_template(112), name="x.png")
    one_line_error(excinfo)
