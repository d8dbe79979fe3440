"""Time femb's evaluate_pairs (6,000 and 60,000 pairs) against InsightFace's loop over folds and thresholds; print JSON."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from femb.evaluation.verification import evaluate_pairs, pair_distances


def literal_insightface_accuracy(
    emb1: np.ndarray, emb2: np.ndarray, is_same: np.ndarray
) -> tuple[float, float]:
    """calculate_roc of arcface_torch eval/verification.py as loops (10 KFold folds x 400 thresholds): the baseline."""
    e1 = emb1.astype(np.float64) / np.linalg.norm(emb1.astype(np.float64), axis=1, keepdims=True)
    e2 = emb2.astype(np.float64) / np.linalg.norm(emb2.astype(np.float64), axis=1, keepdims=True)
    dist = np.sum(np.square(e1 - e2), 1)
    thresholds = np.arange(0, 4, 0.01)
    n, k = len(dist), 10
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]

    def accuracy(threshold: float, idx: np.ndarray) -> float:
        predict = dist[idx] < threshold
        return float(np.sum(predict & is_same[idx]) + np.sum(~predict & ~is_same[idx])) / idx.size

    accuracies, start = [], 0
    for size in sizes:
        test = np.arange(start, start + size)
        train = np.concatenate([np.arange(0, start), np.arange(start + size, n)])
        start += size
        best = int(np.argmax([accuracy(t, train) for t in thresholds]))
        accuracies.append(accuracy(thresholds[best], test))
    return float(np.mean(accuracies)), float(np.std(accuracies))


def make_pairs(num_pairs: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 embeddings like a backbone's: same pairs correlated, different pairs independent."""
    rng = np.random.default_rng(seed)
    is_same = rng.random(num_pairs) < 0.5
    emb1 = rng.standard_normal((num_pairs, dim), dtype=np.float32)
    emb2 = rng.standard_normal((num_pairs, dim), dtype=np.float32)
    emb2[is_same] = (
        emb1[is_same] + rng.uniform(1.0, 12.0, (int(is_same.sum()), 1)).astype(np.float32) * emb2[is_same]
    )
    return emb1, emb2, is_same


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` wall-clock runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    small = make_pairs(6000, args.dim, 0)
    large = make_pairs(60000, args.dim, 1)
    femb_small = evaluate_pairs(*small)
    reference = literal_insightface_accuracy(*small)
    report = {
        "dim": args.dim,
        "evaluate_pairs_6000_s": best_time(lambda: evaluate_pairs(*small), args.repeats),
        "evaluate_pairs_60000_s": best_time(lambda: evaluate_pairs(*large), args.repeats),
        "pair_distances_6000_s": best_time(lambda: pair_distances(*small[:2]), args.repeats),
        "pair_distances_60000_s": best_time(lambda: pair_distances(*large[:2]), args.repeats),
        "literal_loop_6000_s": best_time(lambda: literal_insightface_accuracy(*small), 1),
        "accuracy_6000": femb_small["accuracy"],
        "accuracy_abs_diff_vs_literal": abs(femb_small["accuracy"] - reference[0]),
        "accuracy_std_abs_diff_vs_literal": abs(femb_small["accuracy_std"] - reference[1]),
    }
    report["speedup_6000"] = report["literal_loop_6000_s"] / report["evaluate_pairs_6000_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
