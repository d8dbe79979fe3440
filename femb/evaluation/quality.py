"""Face quality as the feature norm (MagFace, AdaFace) and error-versus-reject curves (ISO/IEC 29794-1 EDC).

Quality. MagFace (Meng et al., CVPR 2021) trains the feature magnitude to grow with how recognisable a
face is, and its `eval_quality.py` takes the L2 norm of the raw feature as the quality; AdaFace (Kim et
al., CVPR 2022) uses the norm the same way, and fuses an image with its mirror by summing the raw
(norm-weighted) features, the quality being the norm of that sum. femb embeds every evaluation image
with its mirror and sums (InsightFace's protocol, IJB mode F1), so `feature_quality` is the L2 norm of
the un-normalised flip sum: AdaFace's fused norm. MagFace's single-image norm differs from it only by
how much the mirror's norm differs, which changes no ranking for a mirror-symmetric face.

Error versus reject. A pair's quality is the lower of its two images' (MagFace's `min(q_a, q_b)`; the
ISO/IEC 29794-1 pairwise quality); an IJB template's is the mean of its images' and a template pair's
the lower of its two templates'. For each reject fraction r in 0, 0.01, ..., 0.5 the floor(r N + 1e-9)
pairs of lowest quality are discarded (ties in the order given, as MagFace's `argsort` cut does) and
the FNMR of the remaining genuine pairs is measured at the threshold where FMR = `fmr`. Following the
Error-versus-Discard Characteristic of ISO/IEC 29794-1:2024 (Grother and Tabassi's error-versus-reject,
as Schlett et al. 2023 formalise it), that threshold is fixed once on all pairs (r = 0), so the curve
shows only the errors that discarding removes; MagFace's `eval_quality.py` instead recomputes it on the
remaining pairs at each r (`fixed_threshold=False` does that, at the same FMR rule). The threshold at
FMR f over N impostor scores is the (floor(f N) + 1)-th largest of them and a pair matches when its
score is strictly above it, so at most floor(f N) impostors match (with N < 1/f: none, the largest
impostor score). The AUC is the trapezoid area under FNMR over r in [0, 0.5], not normalised (divide
by 0.5 for the mean FNMR over the range). Everything is sorted once and counted with cumulative sums.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from femb.errors import FembError
from femb.io import write_bytes

MAX_REJECT = 0.5
REJECT_FRACTIONS: np.ndarray = np.round(np.linspace(0.0, MAX_REJECT, 51), 10)
PAIR_FMR = 1e-3  # pair sets (LFW-sized: 3,000 impostor pairs)
IJB_FMR = 1e-4  # IJB template pairs (IJB-C: 15.6 M impostor pairs)
SUMMARY_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # FNMR reported in the metrics JSON at these r
_EPS = 1e-9  # guards floor(r N) and floor(f N) against products like 0.29 * 100 = 28.999999999999996


def feature_quality(features: np.ndarray) -> np.ndarray:
    """L2 norm (float64) of each raw, un-normalised feature row: the MagFace / AdaFace quality."""
    features = np.asarray(features)
    if features.ndim != 2 or not len(features):
        raise FembError(f"features: expected a non-empty (N, D) array, got shape {features.shape}")
    norms = np.empty(len(features), dtype=np.float64)
    for start in range(0, len(features), 65536):  # bounds the float64 copy
        block = features[start : start + 65536].astype(np.float64)
        norms[start : start + 65536] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return norms


def template_quality(image_quality: np.ndarray, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids, the mean quality of each template's images)."""
    image_quality = np.asarray(image_quality, dtype=np.float64)
    templates = np.asarray(templates, dtype=np.int64)
    if image_quality.shape != templates.shape or image_quality.ndim != 1:
        raise FembError(
            f"image quality and templates must be 1-D of one length, got {image_quality.shape} and {templates.shape}"
        )
    unique, inverse = np.unique(templates, return_inverse=True)
    sums = np.bincount(inverse, weights=image_quality, minlength=len(unique))
    return unique, sums / np.bincount(inverse, minlength=len(unique))


def template_pair_quality(
    unique_templates: np.ndarray, quality: np.ndarray, t1: np.ndarray, t2: np.ndarray
) -> np.ndarray:
    """The lower of the two templates' qualities for each template pair (t1[i], t2[i])."""
    unique_templates = np.asarray(unique_templates, dtype=np.int64)
    positions = []
    for name, ids in (("t1", t1), ("t2", t2)):
        ids = np.asarray(ids, dtype=np.int64)
        where = np.minimum(np.searchsorted(unique_templates, ids), len(unique_templates) - 1)
        bad = np.flatnonzero(unique_templates[where] != ids)
        if bad.size:
            raise FembError(f"{name}: pair {bad[0]} names template {ids[bad[0]]}, which has no quality")
        positions.append(where)
    quality = np.asarray(quality, dtype=np.float64)
    return np.minimum(quality[positions[0]], quality[positions[1]])


def match_threshold(impostor_scores: np.ndarray, fmr: float) -> float:
    """The score threshold at FMR `fmr`: the (floor(fmr N) + 1)-th largest of N impostor scores.

    A comparison matches when its score is strictly above it, so at most floor(fmr N) impostors match.
    """
    impostor_scores = np.asarray(impostor_scores, dtype=np.float64)
    if not impostor_scores.size:
        raise FembError("no impostor pairs: the threshold at a false match rate needs some")
    allowed = math.floor(fmr * impostor_scores.size + _EPS)
    allowed = min(allowed, impostor_scores.size - 1)
    position = impostor_scores.size - 1 - allowed
    return float(np.partition(impostor_scores, position)[position])


@dataclass(frozen=True)
class RejectCurve:
    """An error-versus-reject (EDC) curve: FNMR at `fmr` after discarding each fraction of lowest quality.

    `threshold` holds the score threshold used at each point (one value repeated when fixed);
    `remaining_genuine` the genuine pairs left; `fnmr` is NaN where none is left.
    """

    reject_fraction: np.ndarray
    fnmr: np.ndarray
    threshold: np.ndarray
    remaining_genuine: np.ndarray
    fmr: float
    fixed_threshold: bool
    auc: float

    def fnmr_at(self, fraction: float) -> float:
        """FNMR at the curve point nearest to the reject `fraction`."""
        return float(self.fnmr[int(np.argmin(np.abs(self.reject_fraction - fraction)))])

    def summary(self) -> dict[str, Any]:
        """The curve's numbers for the metrics JSON: FNMR at r = 0, 0.1, ..., 0.5 and the AUC (NaN as None)."""
        points = {
            f"{r:g}": _finite(self.fnmr_at(r)) for r in SUMMARY_FRACTIONS if r <= self.reject_fraction[-1]
        }
        return {
            "fmr": self.fmr,
            "threshold": _finite(float(self.threshold[0])),
            "fixed_threshold": self.fixed_threshold,
            "fnmr_at_reject": points,
            "auc": _finite(self.auc),
            "max_reject": float(self.reject_fraction[-1]),
        }


def error_versus_reject(
    scores: np.ndarray,
    genuine: np.ndarray,
    quality: np.ndarray,
    *,
    fmr: float = PAIR_FMR,
    reject_fractions: Sequence[float] | np.ndarray = REJECT_FRACTIONS,
    fixed_threshold: bool = True,
) -> RejectCurve:
    """FNMR at FMR `fmr` as the lowest-quality pairs are discarded (ISO/IEC 29794-1 EDC; see the module doc).

    `scores` are similarities (higher: more alike), `genuine` says which pairs are mated, `quality` is
    each pair's quality (e.g. the lower of its two images' feature norms).
    """
    scores = np.asarray(scores, dtype=np.float64)
    genuine = np.asarray(genuine).astype(bool)
    quality = np.asarray(quality, dtype=np.float64)
    n = scores.shape[0] if scores.ndim == 1 else -1
    if scores.ndim != 1 or genuine.shape != (n,) or quality.shape != (n,) or n == 0:
        raise FembError(
            f"scores, genuine and quality must be 1-D of one length, got {scores.shape}, {genuine.shape}, {quality.shape}"
        )
    if np.isnan(scores).any() or np.isnan(quality).any():
        raise FembError("scores and quality must not contain NaN")
    if genuine.all() or not genuine.any():
        raise FembError("error versus reject needs both genuine and impostor pairs")
    if not 0 < fmr < 1:
        raise FembError(f"fmr must lie in (0, 1), got {fmr}")
    fractions = np.asarray(reject_fractions, dtype=np.float64)
    if fractions.ndim != 1 or not fractions.size or np.any(np.diff(fractions) < 0):
        raise FembError("reject_fractions must be a non-empty increasing sequence")
    if fractions[0] < 0 or fractions[-1] >= 1:
        raise FembError(f"reject fractions must lie in [0, 1), got {fractions[0]} .. {fractions[-1]}")

    order = np.argsort(quality, kind="stable")  # lowest quality first; ties keep the given order
    sorted_scores, sorted_genuine = scores[order], genuine[order]
    discarded = np.floor(fractions * n + _EPS).astype(np.int64)
    genuine_left = np.count_nonzero(sorted_genuine) - np.r_[0, np.cumsum(sorted_genuine)][discarded]
    if fixed_threshold:
        threshold = np.full(fractions.size, match_threshold(scores[~genuine], fmr))
        failed = sorted_genuine & (sorted_scores <= threshold[0])
        failed_left = np.count_nonzero(failed) - np.r_[0, np.cumsum(failed)][discarded]
    else:
        threshold = np.empty(fractions.size)
        failed_left = np.empty(fractions.size, dtype=np.int64)
        for i, k in enumerate(discarded):
            kept_scores, kept_genuine = sorted_scores[k:], sorted_genuine[k:]
            impostors = kept_scores[~kept_genuine]
            threshold[i] = match_threshold(impostors, fmr) if impostors.size else -np.inf
            failed_left[i] = np.count_nonzero(kept_genuine & (kept_scores <= threshold[i]))
    with np.errstate(invalid="ignore", divide="ignore"):
        fnmr = np.where(genuine_left > 0, failed_left / np.maximum(genuine_left, 1), np.nan)
    return RejectCurve(
        reject_fraction=fractions,
        fnmr=fnmr,
        threshold=threshold,
        remaining_genuine=genuine_left,
        fmr=float(fmr),
        fixed_threshold=fixed_threshold,
        auc=trapezoid_area(fractions, fnmr),
    )


def trapezoid_area(x: np.ndarray, y: np.ndarray) -> float:
    """The trapezoid-rule area under y(x) (NaN when any y is NaN); 0 for a single point."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def quality_summary(quality: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and quantiles of per-image quality, for the metrics JSON."""
    quality = np.asarray(quality, dtype=np.float64)
    q = np.quantile(quality, [0.0, 0.1, 0.5, 0.9, 1.0])
    return {
        "mean": float(quality.mean()),
        "std": float(quality.std()),
        "min": float(q[0]),
        "p10": float(q[1]),
        "median": float(q[2]),
        "p90": float(q[3]),
        "max": float(q[4]),
    }


def write_quality_csv(path: Path | str, columns: dict[str, Sequence[Any] | np.ndarray]) -> Path:
    """Per-image quality as CSV, atomically: the given columns in order (e.g. image, template, quality)."""
    names = list(columns)
    values = [np.asarray(columns[name]) for name in names]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    formatted = [
        [f"{v:.6g}" for v in column.tolist()] if np.issubdtype(column.dtype, np.floating) else column.tolist()
        for column in values
    ]
    writer.writerows(zip(*formatted))
    write_bytes(Path(path), buffer.getvalue().encode())
    return Path(path)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
