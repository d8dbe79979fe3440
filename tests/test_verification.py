"""femb.evaluation.verification: InsightFace's k-fold accuracy to 1e-9, and exact-ROC TAR@FAR, AUC, EER."""

from __future__ import annotations

import json

import numpy as np
import pytest

from femb.errors import FembError
from femb.evaluation.verification import (
    THRESHOLDS,
    evaluate_pairs,
    far_key,
    kfold_bounds,
    mean_embedding_norm,
    pair_distances,
    roc_curve,
)


def literal_insightface_accuracy(emb1, emb2, is_same, n_folds=10):
    """InsightFace calculate_roc written out as loops: hand-made KFold(shuffle=False) folds, every threshold tried."""
    e1 = np.asarray(emb1, dtype=np.float64)
    e2 = np.asarray(emb2, dtype=np.float64)
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.sum(np.square(e1 - e2), 1)
    actual = np.asarray(is_same, dtype=bool)
    thresholds = np.arange(0, 4, 0.01)
    n = len(dist)

    fold_sizes = [n // n_folds] * n_folds
    for i in range(n % n_folds):
        fold_sizes[i] += 1

    def accuracy(threshold, idx):
        predict = dist[idx] < threshold
        tp = np.sum(predict & actual[idx])
        tn = np.sum(~predict & ~actual[idx])
        return float(tp + tn) / idx.size

    accuracies, chosen = [], []
    start = 0
    for size in fold_sizes:
        test = np.arange(start, start + size)
        train = np.concatenate([np.arange(0, start), np.arange(start + size, n)])
        start += size
        train_acc = np.zeros(len(thresholds))
        for j, threshold in enumerate(thresholds):
            train_acc[j] = accuracy(threshold, train)
        best = int(np.argmax(train_acc))
        chosen.append(thresholds[best])
        accuracies.append(accuracy(thresholds[best], test))
    return float(np.mean(accuracies)), float(np.std(accuracies)), chosen


def tied_discrete_pairs(num_pairs, seed):
    """Embeddings in {-1, 0, 1}^4: few distinct distances, many exact ties, some exactly on a threshold (0, 2)."""
    rng = np.random.default_rng(seed)
    emb1 = rng.integers(-1, 2, size=(num_pairs, 4)).astype(np.float64)
    emb2 = rng.integers(-1, 2, size=(num_pairs, 4)).astype(np.float64)
    emb1[~emb1.any(axis=1), 0] = 1.0
    emb2[~emb2.any(axis=1), 1] = 1.0
    cos = np.sum(emb1 * emb2, 1) / np.linalg.norm(emb1, axis=1) / np.linalg.norm(emb2, axis=1)
    is_same = rng.random(num_pairs) < np.where(cos > 0.3, 0.7, 0.3)
    return emb1, emb2, is_same


def threshold_valued_pairs(num_pairs, seed):
    """Squared distances exactly 0, 2 or 4 (identical, orthogonal, opposite); the best cut accepts the pairs at 2.0."""
    rng = np.random.default_rng(seed)
    is_same = rng.random(num_pairs) < 0.5
    level = np.where(
        is_same, rng.random(num_pairs) < 0.4, 1 + (rng.random(num_pairs) < 0.8)
    )  # 0, 1, 2 -> 0, 2, 4
    emb1 = np.tile([1.0, 0.0], (num_pairs, 1))
    emb2 = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])[level]
    return emb1, emb2, is_same


def near_separable_pairs(num_pairs, seed, dim=64):
    """Same pairs close, different pairs near-orthogonal, with a few hard cases: accuracy near 1, plateaus of ties."""
    rng = np.random.default_rng(seed)
    is_same = rng.random(num_pairs) < 0.5
    emb1 = rng.standard_normal((num_pairs, dim))
    emb2 = rng.standard_normal((num_pairs, dim))
    noise = rng.uniform(0.2, 1.3, size=(num_pairs, 1))
    emb2[is_same] = emb1[is_same] + noise[is_same] * emb2[is_same]
    return emb1, emb2, is_same


def pairs_at_distances(same_dists, diff_dists):
    """2-D unit embeddings whose squared distances are the given values (equal values give bit-equal distances)."""
    dists = np.array(list(same_dists) + list(diff_dists), dtype=np.float64)
    theta = np.arccos(1.0 - dists / 2.0)
    emb1 = np.tile([1.0, 0.0], (dists.size, 1))
    emb2 = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    is_same = np.array([True] * len(same_dists) + [False] * len(diff_dists))
    return emb1, emb2, is_same


@pytest.mark.parametrize(
    ("num_pairs", "seed", "n_folds"), [(997, 0, 10), (1000, 1, 10), (3001, 2, 10), (503, 3, 7)]
)
def test_accuracy_equals_literal_insightface_loop_on_tied_data(num_pairs, seed, n_folds):
    emb1, emb2, is_same = tied_discrete_pairs(num_pairs, seed)
    dist = pair_distances(emb1, emb2)
    assert np.isin(dist, THRESHOLDS).any()  # some pairs sit exactly on a threshold, so `<` vs `<=` would show
    assert np.unique(dist).size < 60

    result = evaluate_pairs(emb1, emb2, is_same, n_folds=n_folds)
    accuracy, std, chosen = literal_insightface_accuracy(emb1, emb2, is_same, n_folds)

    assert abs(result["accuracy"] - accuracy) <= 1e-9
    assert abs(result["accuracy_std"] - std) <= 1e-9
    assert result["best_thresholds"] == chosen


def test_pairs_at_exactly_a_threshold_are_rejected_by_it():
    emb1, emb2, is_same = threshold_valued_pairs(1000, 17)
    assert set(pair_distances(emb1, emb2).tolist()) == {0.0, 2.0, 4.0}
    result = evaluate_pairs(emb1, emb2, is_same)
    accuracy, std, chosen = literal_insightface_accuracy(emb1, emb2, is_same)

    assert (
        result["best_thresholds"] == chosen == [THRESHOLDS[201]] * 10
    )  # 2.01: the first threshold with 2.0 < t
    assert abs(result["accuracy"] - accuracy) <= 1e-9
    assert abs(result["accuracy_std"] - std) <= 1e-9


@pytest.mark.parametrize(("num_pairs", "seed"), [(1203, 4), (2000, 5), (6000, 6)])
def test_accuracy_equals_literal_insightface_loop_on_near_separable_data(num_pairs, seed):
    emb1, emb2, is_same = near_separable_pairs(num_pairs, seed)
    result = evaluate_pairs(emb1.astype(np.float32), emb2.astype(np.float32), is_same)
    accuracy, std, chosen = literal_insightface_accuracy(
        emb1.astype(np.float32), emb2.astype(np.float32), is_same
    )

    assert 0.9 < result["accuracy"] < 1.0
    assert abs(result["accuracy"] - accuracy) <= 1e-9
    assert abs(result["accuracy_std"] - std) <= 1e-9
    assert result["best_thresholds"] == chosen
    assert result["threshold"] == pytest.approx(np.mean(chosen), abs=1e-12)


def test_one_fold_trains_and_tests_on_all_pairs_like_lfold():
    emb1, emb2, is_same = tied_discrete_pairs(400, 18)
    dist = pair_distances(emb1, emb2)
    accuracies = [np.mean((dist < t) == is_same) for t in THRESHOLDS]
    result = evaluate_pairs(emb1, emb2, is_same, n_folds=1)
    assert result["accuracy"] == max(accuracies)
    assert result["best_thresholds"] == [THRESHOLDS[int(np.argmax(accuracies))]]
    assert result["accuracy_std"] == 0.0


def test_folds_follow_sklearn_kfold_order():
    model_selection = pytest.importorskip("sklearn.model_selection")
    for num_pairs, n_folds in [(6000, 10), (997, 10), (23, 7), (10, 10)]:
        expected = [
            (int(test[0]), int(test[-1]) + 1)
            for _, test in model_selection.KFold(n_splits=n_folds, shuffle=False).split(np.arange(num_pairs))
        ]
        assert kfold_bounds(num_pairs, n_folds) == expected


def test_perfect_separation_gives_accuracy_one():
    rng = np.random.default_rng(7)
    emb1 = rng.standard_normal((600, 32))
    emb2 = -emb1.copy()
    emb2[:300] = emb1[:300] + 0.05 * rng.standard_normal((300, 32))
    is_same = np.arange(600) < 300
    result = evaluate_pairs(emb1, emb2, is_same)

    assert result["accuracy"] == 1.0
    assert result["accuracy_std"] == 0.0
    assert result["auc"] == 1.0
    assert result["eer"] == 0.0
    assert result["tar_at_far"] == {"1e-04": 1.0, "1e-03": 1.0, "1e-02": 1.0}


def test_random_embeddings_give_chance_accuracy_and_auc():
    rng = np.random.default_rng(8)
    emb1, emb2 = rng.standard_normal((2, 6000, 128))
    is_same = rng.random(6000) < 0.5
    result = evaluate_pairs(emb1, emb2, is_same)

    assert 0.46 < result["accuracy"] < 0.54
    assert 0.47 < result["auc"] < 0.53
    assert 0.46 < result["eer"] < 0.54


def test_tar_at_far_accepts_tied_distances_together():
    # Sorted by distance: 0.2: 4 same | 0.5: 3 same + 1 diff (tie) | 0.9: 2 same | 1.4: 1 same + 4 diff | 2.5: 5 diff.
    # ROC: (0, 0) (0, .4) (.1, .7) (.1, .9) (.5, 1) (1, 1).
    emb1, emb2, is_same = pairs_at_distances(
        [0.2] * 4 + [0.5] * 3 + [0.9] * 2 + [1.4], [0.5] + [1.4] * 4 + [2.5] * 5
    )
    result = evaluate_pairs(emb1, emb2, is_same, n_folds=2, far_targets=(0.05, 0.1, 0.3, 0.5))

    assert result["tar_at_far"] == {"5e-02": 0.4, "1e-01": 0.9, "3e-01": 0.9, "5e-01": 1.0}
    assert result["far_achieved"] == {"5e-02": 0.0, "1e-01": 0.1, "3e-01": 0.1, "5e-01": 0.5}
    assert result["far_resolution"] == 0.1
    assert result["far_below_resolution"] == ["5e-02"]
    np.testing.assert_allclose(result["roc"]["fpr"], [0, 0, 0.1, 0.1, 0.5, 1])
    np.testing.assert_allclose(result["roc"]["tpr"], [0, 0.4, 0.7, 0.9, 1, 1])
    np.testing.assert_allclose(result["roc"]["thresholds"][1:], [0.2, 0.5, 0.9, 1.4, 2.5])
    assert result["roc"]["thresholds"][0] == -np.inf
    assert result["auc"] == pytest.approx(0.935, abs=1e-12)


def test_tar_at_far_below_resolution_reports_zero_false_accepts():
    emb1, emb2, is_same = near_separable_pairs(4000, 9)
    result = evaluate_pairs(emb1, emb2, is_same)
    fpr, tpr, _ = roc_curve(pair_distances(emb1, emb2), is_same)

    assert result["far_resolution"] == 1.0 / result["num_diff"] > 1e-4
    assert result["far_below_resolution"] == ["1e-04"]
    assert result["far_achieved"]["1e-04"] == 0.0
    assert result["tar_at_far"]["1e-04"] == tpr[fpr == 0].max()


def test_auc_equals_mann_whitney_count_over_all_pairs():
    for emb1, emb2, is_same in [tied_discrete_pairs(700, 11), near_separable_pairs(800, 12)]:
        dist = pair_distances(emb1, emb2)
        same, diff = dist[is_same], dist[~is_same]
        wins = (same[:, None] < diff[None, :]).sum() + 0.5 * (same[:, None] == diff[None, :]).sum()
        assert evaluate_pairs(emb1, emb2, is_same)["auc"] == pytest.approx(
            wins / (same.size * diff.size), abs=1e-12
        )


def test_eer_interpolates_where_far_equals_frr():
    # Sorted: same | same + diff (tie) | diff | same | diff | diff: 3 same, 4 diff.
    # ROC (0,0) (0,1/3) (1/4,2/3) (1/2,2/3) (1/2,1) ...: FAR = 1 - TAR = 1/3 on the segment (1/4,2/3)-(1/2,2/3).
    emb1, emb2, is_same = pairs_at_distances([0.1, 0.3, 0.9], [0.3, 0.6, 1.2, 1.5])
    assert evaluate_pairs(emb1, emb2, is_same, n_folds=2)["eer"] == pytest.approx(1 / 3, abs=1e-12)


def test_eer_on_roc_point_where_far_equals_frr():
    emb1, emb2, is_same = pairs_at_distances([0.1, 0.2, 0.7, 0.8], [0.5, 1.0, 1.1, 1.2])
    assert evaluate_pairs(emb1, emb2, is_same, n_folds=2)["eer"] == pytest.approx(0.25, abs=1e-12)


def test_result_is_json_ready_apart_from_roc_arrays():
    emb1, emb2, is_same = near_separable_pairs(500, 13)
    result = evaluate_pairs(emb1, emb2, is_same)
    text = json.dumps({k: v for k, v in result.items() if k != "roc"})
    assert json.loads(text)["num_pairs"] == 500
    assert len(result["fold_accuracies"]) == len(result["best_thresholds"]) == result["n_folds"] == 10
    assert result["num_same"] + result["num_diff"] == 500
    assert {"fpr", "tpr", "thresholds"} == set(result["roc"])


def test_pair_distances_are_squared_l2_of_normalised_rows():
    rng = np.random.default_rng(14)
    emb1, emb2 = rng.standard_normal((2, 20000, 8)).astype(np.float32)  # more rows than one chunk
    a = emb1.astype(np.float64) / np.linalg.norm(emb1.astype(np.float64), axis=1, keepdims=True)
    b = emb2.astype(np.float64) / np.linalg.norm(emb2.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(pair_distances(emb1, emb2), np.sum((a - b) ** 2, 1), rtol=0, atol=1e-12)


def test_mean_embedding_norm_averages_raw_row_norms_of_all_arrays():
    plain = np.array([[3.0, 4.0], [0.0, 1.0]])
    flipped = np.array([[6.0, 8.0]], dtype=np.float32)
    assert mean_embedding_norm(plain, flipped) == pytest.approx((5.0 + 1.0 + 10.0) / 3)


def test_far_keys_are_short_exact_strings():
    assert [far_key(t) for t in (1e-4, 1e-3, 1e-2, 1.5e-3, 0.1)] == [
        "1e-04",
        "1e-03",
        "1e-02",
        "1.5e-03",
        "1e-01",
    ]


def test_is_same_accepts_zero_one_integers_like_booleans():
    emb1, emb2, is_same = near_separable_pairs(300, 15)
    from_ints = evaluate_pairs(emb1, emb2, is_same.astype(np.int64))
    from_bools = evaluate_pairs(emb1, emb2, is_same)
    assert {k: v for k, v in from_ints.items() if k != "roc"} == {
        k: v for k, v in from_bools.items() if k != "roc"
    }


def _valid(num_pairs=40):
    rng = np.random.default_rng(16)
    return (
        rng.standard_normal((num_pairs, 8)),
        rng.standard_normal((num_pairs, 8)),
        np.arange(num_pairs) % 2 == 0,
    )


def _with_nan(array):
    array = array.copy()
    array[5, 3] = np.nan
    return array


def _with_inf(array):
    array = array.copy()
    array[7, 0] = np.inf
    return array


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (lambda e1, e2, s: (e1, e2[:, :4], s, 10), r"emb1 and emb2: shapes differ, \(40, 8\) vs \(40, 4\)"),
        (lambda e1, e2, s: (e1[0], e2[0], s[:1], 1), r"emb1: expected a 2-D array"),
        (
            lambda e1, e2, s: (e1, e2, s[:-1], 10),
            r"is_same: expected 40 labels \(one per pair\), got shape \(39,\)",
        ),
        (lambda e1, e2, s: (e1[:9], e2[:9], s[:9], 10), r"n_folds: 10 folds need at least 10 pairs, got 9"),
        (lambda e1, e2, s: (e1, e2, np.ones(40, bool), 10), r"is_same: all 40 pairs are same-identity pairs"),
        (lambda e1, e2, s: (e1, e2, np.zeros(40, bool), 10), r"is_same: all 40 pairs are different-identity"),
        (
            lambda e1, e2, s: (_with_nan(e1), e2, s, 10),
            r"emb1: 1 of 40 embeddings contain NaN or inf \(first: row 5 has NaN\)",
        ),
        (
            lambda e1, e2, s: (e1, _with_inf(e2), s, 10),
            r"emb2: 1 of 40 embeddings contain NaN or inf \(first: row 7 has inf\)",
        ),
        (lambda e1, e2, s: (e1, e2, s * 2, 10), r"is_same: expected booleans \(or 0/1\), found 2 at index 0"),
        (lambda e1, e2, s: (e1, e2, s, 0), r"n_folds: expected a positive integer, got 0"),
        (lambda e1, e2, s: (e1[:, :0], e2[:, :0], s, 10), r"emb1: embedding dimension is 0"),
    ],
)
def test_bad_input_raises_one_line_femb_error(case, message):
    emb1, emb2, is_same, n_folds = case(*_valid())
    with pytest.raises(FembError, match=message) as info:
        evaluate_pairs(emb1, emb2, is_same, n_folds=n_folds)
    assert "\n" not in str(info.value)


def test_far_target_outside_unit_interval_is_refused():
    emb1, emb2, is_same = _valid()
    with pytest.raises(FembError, match=r"far_targets: each target must be in \(0, 1\], got 0.0"):
        evaluate_pairs(emb1, emb2, is_same, far_targets=(0.0,))
