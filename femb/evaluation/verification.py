"""Pair verification as InsightFace reports it (arcface_torch eval/verification.py), plus TAR@FAR, AUC, EER.

The accuracy follows InsightFace's `calculate_roc` exactly: L2-normalised embeddings, squared L2
distance, thresholds `arange(0, 4, 0.01)`, contiguous `KFold(shuffle=False)` folds (the first
`n % k` folds one pair longer), per fold the threshold of best train-fold accuracy (the first, i.e.
smallest, on ties) applied to the test fold, "same" when `distance < threshold`; mean and std
(ddof=0) of the test-fold accuracies. It is computed with counts instead of InsightFace's loop over
folds and thresholds, so the numbers are identical and 6,000 pairs take milliseconds.

TAR@FAR, AUC and EER come from the exact empirical ROC over all pairs (no folds): pairs sorted by
distance, pairs of equal distance accepted together. The official VAL@FAR code interpolates the
threshold on the FAR curve with `interp1d`, which fails on current scipy when FAR values repeat;
nothing here interpolates on FAR.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from femb.errors import FembError

# InsightFace's accuracy thresholds on the squared distance; the exact float values matter for `<`.
THRESHOLDS: np.ndarray = np.arange(0, 4, 0.01)
FAR_TARGETS: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
_CHUNK_ROWS = 8192


def far_key(far: float) -> str:
    """The stable dict key of a FAR target: the shortest exact `e` notation, e.g. 1e-4 -> "1e-04"."""
    for digits in range(17):
        key = f"{far:.{digits}e}"
        if float(key) == far:
            return key
    return repr(far)


def kfold_bounds(num_pairs: int, n_folds: int) -> list[tuple[int, int]]:
    """[start, stop) of each test fold in scikit-learn's KFold(shuffle=False) order: the first n % k folds get one extra pair."""
    sizes = [num_pairs // n_folds + (1 if i < num_pairs % n_folds else 0) for i in range(n_folds)]
    stops = np.cumsum(sizes).tolist()
    return [(stop - size, stop) for size, stop in zip(sizes, stops)]


def pair_distances(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Squared L2 distance (0..4) between the L2-normalised rows of emb1 and emb2, in float64 as InsightFace computes it."""
    emb1, emb2 = _check_embeddings(emb1, emb2)
    dist = np.empty(emb1.shape[0], dtype=np.float64)
    # Chunks bound the float64 copies; every value is computed within one row, so chunking changes no bit.
    for start in range(0, emb1.shape[0], _CHUNK_ROWS):
        stop = start + _CHUNK_ROWS
        diff = _l2_normalise(emb1[start:stop]) - _l2_normalise(emb2[start:stop])
        dist[start:stop] = np.sum(np.square(diff), axis=1)
    return dist


def roc_curve(dist: np.ndarray, is_same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact empirical ROC (fpr, tpr, thresholds) of accepting pairs with distance <= threshold, ties accepted together.

    Point 0 accepts nothing (threshold -inf); point i > 0 accepts every pair whose distance is at most
    thresholds[i], the i-th distinct distance; the last point is (1, 1). Curves are non-decreasing.
    """
    dist = np.asarray(dist, dtype=np.float64)
    if dist.ndim != 1 or np.isnan(dist).any():
        raise FembError(f"dist: expected a 1-D array of distances without NaN, got shape {dist.shape}")
    same = _check_is_same(is_same, dist.shape[0])
    order = np.argsort(dist, kind="stable")
    sorted_dist, sorted_same = dist[order], same[order]
    last_of_value = np.flatnonzero(np.r_[sorted_dist[1:] != sorted_dist[:-1], True])
    true_accepts = np.r_[0, np.cumsum(sorted_same)[last_of_value]]
    false_accepts = np.r_[0, np.cumsum(~sorted_same)[last_of_value]]
    tpr = true_accepts / true_accepts[-1]
    fpr = false_accepts / false_accepts[-1]
    thresholds = np.r_[-np.inf, sorted_dist[last_of_value]]
    return fpr, tpr, thresholds


def mean_embedding_norm(*embeddings: np.ndarray) -> float:
    """Mean L2 norm of the raw (unnormalised) embedding rows, InsightFace's "XNorm"; pass the plain and flipped embeddings."""
    if not embeddings:
        raise FembError("mean_embedding_norm: no embeddings given")
    norms = []
    for i, emb in enumerate(embeddings):
        emb = np.asarray(emb)
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise FembError(
                f"embeddings[{i}]: expected a non-empty 2-D array (rows x dim), got shape {emb.shape}"
            )
        norms.append(np.linalg.norm(emb.astype(np.float64), axis=1))
    return float(np.mean(np.concatenate(norms)))


def evaluate_pairs(
    emb1: np.ndarray,
    emb2: np.ndarray,
    is_same: np.ndarray,
    n_folds: int = 10,
    far_targets: Sequence[float] = FAR_TARGETS,
) -> dict:
    """InsightFace k-fold verification accuracy plus TAR@FAR, AUC and EER over all pairs (LFW protocol, arcface_torch).

    Returns a dict; every entry except "roc" is a plain Python number, list, or dict, ready for JSON:
      accuracy, accuracy_std   mean and np.std (ddof=0) of the test-fold accuracies (InsightFace "Accuracy-Flip"
                               when the embeddings are the sums of plain and flipped images)
      fold_accuracies          the n_folds test-fold accuracies, in fold order
      best_thresholds          per fold, the squared-distance threshold of best train-fold accuracy;
      threshold                their mean
      tar_at_far               {far_key(target): TAR}: the highest TAR of the exact ROC whose FAR <= target,
                               keys like "1e-04", "1e-03", "1e-02" (see `far_key`)
      far_achieved             {far_key(target): the FAR of the operating point reported in tar_at_far}
      far_resolution           1 / num_diff, the smallest non-zero FAR that these pairs can measure
      far_below_resolution     keys whose target < far_resolution: their TAR is the one at the largest threshold
                               with zero false accepts, not a TAR at that FAR
      auc                      trapezoid area under the exact ROC (ties count one half, as Mann-Whitney)
      eer                      the FAR where FAR = 1 - TAR, linearly interpolated between the two bracketing ROC points
      num_pairs, num_same, num_diff, n_folds
      roc                      {"fpr", "tpr", "thresholds"}: numpy arrays of `roc_curve` for plotting
    With n_folds=1 the one fold is both train and test set, as InsightFace's LFold does.
    """
    dist = pair_distances(emb1, emb2)
    num_pairs = dist.shape[0]
    same = _check_is_same(is_same, num_pairs)
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 1:
        raise FembError(f"n_folds: expected a positive integer, got {n_folds!r}")
    if num_pairs < n_folds:
        raise FembError(f"n_folds: {n_folds} folds need at least {n_folds} pairs, got {num_pairs}")
    targets = [float(t) for t in far_targets]
    for target in targets:
        if not 0.0 < target <= 1.0:
            raise FembError(f"far_targets: each target must be in (0, 1], got {target!r}")

    fold_acc, best_thresholds = _kfold_accuracy(dist, same, int(n_folds))
    fpr, tpr, thresholds = roc_curve(dist, same)
    num_same = int(same.sum())
    num_diff = num_pairs - num_same
    far_resolution = 1.0 / num_diff

    tar_at_far, far_achieved, below = {}, {}, []
    for target in targets:
        key = far_key(target)
        # The last ROC point with FAR <= target; point 0 (nothing accepted) always qualifies.
        point = int(np.searchsorted(fpr, target, side="right")) - 1
        tar_at_far[key] = float(tpr[point])
        far_achieved[key] = float(fpr[point])
        if target < far_resolution:
            below.append(key)

    return {
        "accuracy": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "fold_accuracies": fold_acc.tolist(),
        "best_thresholds": best_thresholds.tolist(),
        "threshold": float(np.mean(best_thresholds)),
        "tar_at_far": tar_at_far,
        "far_achieved": far_achieved,
        "far_resolution": far_resolution,
        "far_below_resolution": below,
        "auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)),
        "eer": _equal_error_rate(fpr, tpr),
        "num_pairs": num_pairs,
        "num_same": num_same,
        "num_diff": num_diff,
        "n_folds": int(n_folds),
        "roc": {"fpr": fpr, "tpr": tpr, "thresholds": thresholds},
    }


def _kfold_accuracy(dist: np.ndarray, same: np.ndarray, n_folds: int) -> tuple[np.ndarray, np.ndarray]:
    """Test-fold accuracies and chosen thresholds of InsightFace's calculate_roc, from per-fold cumulative counts."""
    num_thresholds = THRESHOLDS.shape[0]
    # dist < THRESHOLDS[j] exactly when j >= first_accepting, the number of thresholds <= dist.
    first_accepting = np.searchsorted(THRESHOLDS, dist, side="right")
    bounds = kfold_bounds(dist.shape[0], n_folds)
    fold_of_pair = np.repeat(np.arange(n_folds), [stop - start for start, stop in bounds])
    bins = (fold_of_pair * 2 + same) * (num_thresholds + 1) + first_accepting
    counts = np.bincount(bins, minlength=n_folds * 2 * (num_thresholds + 1)).reshape(n_folds, 2, -1)
    # accepted[fold, is_same, j]: pairs of the fold and class with dist < THRESHOLDS[j].
    accepted = np.cumsum(counts, axis=2)[:, :, :num_thresholds]
    fold_diff, fold_same = counts.sum(axis=2).T
    false_acc, true_acc = accepted[:, 0], accepted[:, 1]

    test_correct = true_acc + fold_diff[:, None] - false_acc
    if n_folds == 1:
        train_correct = test_correct
    else:
        train_true = true_acc.sum(axis=0) - true_acc
        train_false = false_acc.sum(axis=0) - false_acc
        train_diff = fold_diff.sum() - fold_diff
        train_correct = train_true + train_diff[:, None] - train_false
    # Same denominator within a fold, so argmax of counts = argmax of accuracies, first maximum on ties.
    best = np.argmax(train_correct, axis=1)
    fold_size = fold_same + fold_diff
    fold_acc = test_correct[np.arange(n_folds), best] / fold_size
    return fold_acc.astype(np.float64), THRESHOLDS[best]


def _equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """FAR at FAR = 1 - TAR: fpr + tpr - 1 rises strictly from -1 to 1 along the ROC; interpolate at its zero."""
    gap = fpr + tpr - 1.0
    i = int(np.argmax(gap >= 0.0))
    if gap[i] == 0.0:
        return float(fpr[i])
    t = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm in float64, as sklearn.preprocessing.normalize (zero rows stay zero)."""
    x = np.array(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
    x /= norms[:, None]
    return x


def _check_embeddings(emb1: np.ndarray, emb2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both embedding arrays as 2-D numeric arrays of one shape with finite values, or a FembError saying what is wrong."""
    arrays = []
    for name, emb in (("emb1", emb1), ("emb2", emb2)):
        emb = np.asarray(emb)
        if emb.ndim != 2:
            raise FembError(f"{name}: expected a 2-D array (pairs x embedding dim), got shape {emb.shape}")
        if not (np.issubdtype(emb.dtype, np.floating) or np.issubdtype(emb.dtype, np.integer)):
            raise FembError(f"{name}: expected a numeric array, got dtype {emb.dtype}")
        if emb.shape[1] == 0:
            raise FembError(f"{name}: embedding dimension is 0 (shape {emb.shape})")
        bad_rows = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if bad_rows.size:
            kind = "NaN" if np.isnan(emb[bad_rows[0]]).any() else "inf"
            raise FembError(
                f"{name}: {bad_rows.size} of {emb.shape[0]} embeddings contain NaN or inf "
                f"(first: row {bad_rows[0]} has {kind}); check the model output"
            )
        arrays.append(emb)
    if arrays[0].shape != arrays[1].shape:
        raise FembError(f"emb1 and emb2: shapes differ, {arrays[0].shape} vs {arrays[1].shape}")
    return arrays[0], arrays[1]


def _check_is_same(is_same: np.ndarray, num_pairs: int) -> np.ndarray:
    """is_same as a boolean array of num_pairs labels with both classes present, or a FembError saying what is wrong."""
    labels = np.asarray(is_same)
    if labels.ndim != 1 or labels.shape[0] != num_pairs:
        raise FembError(f"is_same: expected {num_pairs} labels (one per pair), got shape {labels.shape}")
    if labels.dtype != np.bool_:
        if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
            raise FembError(f"is_same: expected booleans (or 0/1), got dtype {labels.dtype}")
        bad = np.flatnonzero((labels != 0) & (labels != 1))
        if bad.size:
            raise FembError(
                f"is_same: expected booleans (or 0/1), found {labels[bad[0]].item()!r} at index {bad[0]}"
            )
        labels = labels == 1
    num_same = int(labels.sum())
    if num_same == 0 or num_same == num_pairs:
        kind = "same-identity" if num_same else "different-identity"
        raise FembError(
            f"is_same: all {num_pairs} pairs are {kind} pairs; verification needs both same and different pairs"
        )
    return labels
