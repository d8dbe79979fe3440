"""Face quality (feature norm) and error-versus-reject curves: hand-computed cases, and a MagFace demo model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from femb.config import parse_params
from femb.errors import FembError
from femb.evaluation.pairsets import embed_pair_set, load_pair_set
from femb.evaluation.quality import (
    REJECT_FRACTIONS,
    error_versus_reject,
    feature_quality,
    match_threshold,
    template_pair_quality,
    template_quality,
    trapezoid_area,
)
from femb.evaluation.verification import pair_distances
from femb.training.run import train
from femb.weights import load_backbone

# Ten pairs: similarity, genuine, quality. Impostors score 0.3, 0.1, 0.5, 0.35.
SCORES = np.array([0.9, 0.2, 0.3, 0.8, 0.4, 0.1, 0.5, 0.7, 0.35, 0.6])
GENUINE = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
QUALITY = np.array([5, 1, 2, 6, 3, 7, 4, 8, 9, 10], dtype=float)
FRACTIONS = [0.0, 0.1, 0.2, 0.3]


def test_threshold_lets_at_most_floor_fmr_n_impostors_match():
    impostors = np.arange(1000) / 1000.0  # 0.000 ... 0.999
    assert match_threshold(impostors, 1e-3) == 0.998  # one impostor (0.999) is strictly above
    assert match_threshold(impostors[:999], 1e-3) == 0.998  # 999 * 1e-3 < 1: none may match, the largest
    assert (
        match_threshold(np.arange(3000) / 3000.0, 1e-3) == 2996 / 3000
    )  # 3 above; 1e-3 * 3000 is not 2.99..
    assert match_threshold(SCORES[~GENUINE], 0.25) == 0.35  # floor(0.25 * 4) = 1 above it: 0.5


def test_fixed_threshold_edc_by_hand():
    curve = error_versus_reject(SCORES, GENUINE, QUALITY, fmr=0.25, reject_fractions=FRACTIONS)
    # tau = 0.35 from all pairs; genuine 0.2 fails. Discarding the lowest qualities (1, then 2, then 3)
    # drops that genuine pair first, so nothing fails after it.
    np.testing.assert_allclose(curve.threshold, [0.35] * 4)
    np.testing.assert_allclose(curve.fnmr, [1 / 6, 0, 0, 0])
    assert curve.remaining_genuine.tolist() == [6, 5, 5, 4]
    assert curve.auc == pytest.approx(0.1 * (1 / 6) / 2)
    assert curve.fixed_threshold and curve.summary()["fnmr_at_reject"] == {
        "0": pytest.approx(1 / 6),
        "0.1": 0.0,
        "0.2": 0.0,
        "0.3": 0.0,
    }


def test_recomputed_threshold_follows_magface_eval_quality_by_hand():
    curve = error_versus_reject(
        SCORES, GENUINE, QUALITY, fmr=0.25, reject_fractions=FRACTIONS, fixed_threshold=False
    )
    # r = 0.2 discards the impostor 0.3 too: floor(0.25 * 3) = 0, tau = 0.5, and genuine 0.4 now fails.
    np.testing.assert_allclose(curve.threshold, [0.35, 0.35, 0.5, 0.5])
    np.testing.assert_allclose(curve.fnmr, [1 / 6, 0, 1 / 5, 0])


def test_reject_fraction_discards_floor_r_n_pairs_and_breaks_quality_ties_by_order():
    scores = np.array([0.1, 0.9, 0.0, 0.05])  # impostors 0.0 and 0.05: tau = 0.05 at fmr 0.1
    genuine = np.array([True, True, False, False])
    quality = np.array([1.0, 1.0, 2.0, 2.0])  # tied: pair 0 goes before pair 1
    curve = error_versus_reject(scores, genuine, quality, fmr=0.1, reject_fractions=[0.0, 0.25, 0.29, 0.5])
    # 0.29 * 4 = 1.16 -> one pair; at 0.5 both genuine pairs are gone: FNMR undefined
    assert curve.remaining_genuine.tolist() == [2, 1, 1, 0]
    np.testing.assert_array_equal(curve.fnmr[:3], [0.0, 0.0, 0.0])
    assert np.isnan(curve.fnmr[3]) and curve.summary()["fnmr_at_reject"]["0.5"] is None
    flipped = error_versus_reject(scores, genuine, quality, fmr=0.1, reject_fractions=[0.0, 0.25])
    assert flipped.fnmr.tolist() == [0.0, 0.0]
    low_first = error_versus_reject(
        np.array([0.01, 0.9, 0.0, 0.05]), genuine, quality, fmr=0.1, reject_fractions=[0.0, 0.25]
    )
    assert low_first.fnmr.tolist() == [0.5, 0.0]  # the failing genuine pair 0 is discarded first


def test_default_curve_spans_zero_to_half_in_51_points_and_auc_is_the_trapezoid():
    assert len(REJECT_FRACTIONS) == 51 and REJECT_FRACTIONS[0] == 0.0 and REJECT_FRACTIONS[-1] == 0.5
    rng = np.random.default_rng(0)
    scores, genuine = rng.random(400), rng.random(400) < 0.5
    curve = error_versus_reject(scores, genuine, rng.random(400), fmr=1e-3)
    x, y = curve.reject_fraction, curve.fnmr
    assert curve.auc == pytest.approx(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(50)))
    assert trapezoid_area([0.0, 0.5], [0.2, 0.2]) == pytest.approx(0.1)


def test_quality_is_the_norm_of_the_raw_feature_and_templates_average_it():
    features = np.array([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], dtype=np.float32)
    np.testing.assert_allclose(feature_quality(features), [5.0, 1.0, 10.0])
    templates, quality = template_quality(np.array([5.0, 1.0, 10.0]), np.array([7, 3, 7]))
    assert templates.tolist() == [3, 7] and quality.tolist() == [1.0, 7.5]
    pair = template_pair_quality(templates, quality, np.array([7, 3, 7]), np.array([7, 7, 3]))
    assert pair.tolist() == [7.5, 1.0, 1.0]
    with pytest.raises(FembError, match="t2: pair 0 names template 9"):
        template_pair_quality(templates, quality, np.array([3]), np.array([9]))


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(FembError, match="both genuine and impostor"):
        error_versus_reject(SCORES, np.ones(10, dtype=bool), QUALITY)
    with pytest.raises(FembError, match="one length"):
        error_versus_reject(SCORES, GENUINE, QUALITY[:-1])
    with pytest.raises(FembError, match="NaN"):
        error_versus_reject(np.r_[SCORES[:-1], np.nan], GENUINE, QUALITY)
    with pytest.raises(FembError, match=r"reject fractions must lie in \[0, 1\)"):
        error_versus_reject(SCORES, GENUINE, QUALITY, reject_fractions=[0.0, 1.0])


# ------------------------------------------------------------------------------------ a MagFace demo model

MAGFACE_STEPS = 48
SHUFFLES = 200


@pytest.mark.slow
def test_magface_quality_curve_falls_on_the_demo_and_shuffled_quality_does_not(demo_shards, tmp_path):
    # Measured on a shared, busy 2-core CPU (load 5): 48 steps of iresnet_tiny with MagFace take
    # about 10 s on one thread (5x longer on two). On demo, FNMR@FMR=1e-3 goes 0.48 -> 0.28 at 50%
    # rejection, AUC 0.185 against shuffled qualities' 0.240 +- 0.016; on demo_hard 0.90 -> 0.88,
    # AUC 0.446 against 0.450 +- 0.010; no one of 200 shuffles takes off as much over both sets.
    params = parse_params(
        {
            "backbone": "iresnet_tiny",
            "embedding_size": 64,
            "header": "magface",
            "data": {"shards": str(demo_shards)},
            "train": {
                "out_dir": str(tmp_path / "run"),
                "batch_size": 32,
                "num_workers": 0,
                "max_steps": MAGFACE_STEPS,
                "max_epochs": 1000,
                "checkpoint_every": 1000,
                "val_every": 1000,
                "warmup_steps": 10,
                "val_sets": [],
            },
        }
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: a second thread only adds sync cost (5x slower under load)
    try:
        train(params, progress=False)
        model = load_backbone(tmp_path / "run" / "backbone.pth")
        embedded = {}
        for name in ("demo", "demo_hard"):
            pair_set = load_pair_set(demo_shards / f"{name}.parquet", cache=False)
            embedded[name] = (pair_set, *embed_pair_set(model, pair_set, progress=False))
    finally:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    gain, null = 0.0, np.zeros(SHUFFLES)
    for name, (pair_set, emb, flip) in embedded.items():
        summed = emb + flip  # what `femb evaluate` scores and takes the quality of
        quality = feature_quality(summed)
        pair_quality = np.minimum(quality[0::2], quality[1::2])
        scores = 1.0 - pair_distances(summed[0::2], summed[1::2]) / 2.0
        curve = error_versus_reject(scores, pair_set.is_same, pair_quality)  # FMR 1e-3, 0..50%
        assert curve.fnmr[-1] < curve.fnmr[0], (name, curve.fnmr)  # the curve falls
        # The control: the same scores with qualities that say nothing about them.
        shuffled = np.array(
            [
                error_versus_reject(scores, pair_set.is_same, rng.permutation(pair_quality)).auc
                for _ in range(SHUFFLES)
            ]
        )
        gain += shuffled.mean() - curve.auc  # the area the feature norm takes off, beyond chance
        null += shuffled.mean() - shuffled
    # One-sided permutation test over both sets: shuffled qualities rarely take off as much.
    assert gain > 0.0 and np.mean(null >= gain) < 0.05, (gain, np.quantile(null, [0.5, 0.95]))
