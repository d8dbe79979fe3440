"""IJB-C 1:1 scoring: femb's vectorised pooling + pair scoring + ROC against arcface_torch's loops, one run.

Synthetic features of IJB-C's size (469,375 images x 512 float32, 23,124 templates, 15,658,489 pairs of
which 19,557 genuine; `--scale` shrinks every count). Both sides get the same features, faceness and
meta data. The official side is eval_ijbc.py's algorithm as written there: `image2template_feature`
with a Python loop over templates and their medias, `verification` in batches of 100,000 pairs, then
sklearn's `roc_curve` and the nearest-point TAR@FAR table. femb's side is `femb.evaluation.ijb.evaluate_1v1`.
Peak memory is what femb allocates beyond the features (tracemalloc sees numpy's buffers).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import sklearn.preprocessing
from sklearn.metrics import roc_curve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from femb.evaluation.ijb import FAR_TARGETS, evaluate_1v1  # noqa: E402
from femb.evaluation.verification import far_key  # noqa: E402

IMAGES, TEMPLATES, PAIRS, GENUINE, DIM = 469_375, 23_124, 15_658_489, 19_557, 512


def synthetic(scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images, templates = int(IMAGES * scale), int(TEMPLATES * scale)
    pairs, genuine = int(PAIRS * scale), max(1, int(GENUINE * scale))
    subjects = max(2, int(3_531 * scale))  # IJB-C's subjects
    template_subject = rng.integers(0, subjects, templates)
    template_of_image = np.sort(np.r_[np.arange(templates), rng.integers(0, templates, images - templates)])
    medias = template_of_image * 8 + rng.integers(0, 8, images)  # up to 8 medias per template
    centres = rng.standard_normal((subjects, DIM), dtype=np.float32)
    offsets = 2.0 * rng.standard_normal((templates, DIM), dtype=np.float32)  # a template's own pose/quality
    features = centres[template_subject[template_of_image]]
    features += offsets[template_of_image]
    features += 2.0 * rng.standard_normal((images, DIM), dtype=np.float32)
    faceness = rng.uniform(0.5, 1.0, images).astype(np.float32)
    # impostor pairs drawn uniformly (the worst case for block scoring); genuine pairs share a subject
    t1 = rng.integers(0, templates, pairs)
    t2 = rng.integers(0, templates, pairs)
    by_subject = np.argsort(template_subject, kind="stable")
    first = np.searchsorted(template_subject[by_subject], template_subject[t1[:genuine]])
    counts = np.bincount(template_subject, minlength=subjects)[template_subject[t1[:genuine]]]
    t2[:genuine] = by_subject[first + rng.integers(0, counts)]
    clash = genuine + np.flatnonzero(template_subject[t1[genuine:]] == template_subject[t2[genuine:]])
    while clash.size:  # impostors are pairs of different subjects
        t2[clash] = rng.integers(0, templates, clash.size)
        clash = clash[template_subject[t1[clash]] == template_subject[t2[clash]]]
    labels = (template_subject[t1] == template_subject[t2]).astype(np.int64)
    ids = np.arange(templates) * 3 + 5  # ids need not be contiguous
    return {
        "features": features,
        "faceness": faceness,
        "templates": ids[template_of_image],
        "medias": medias,
        "t1": ids[t1],
        "t2": ids[t2],
        "labels": labels,
    }


def official(data: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
    """eval_ijbc.py: F1 features in, use_norm_score, use_detector_score; loops as the official has them."""
    img_feats = data["features"] * data["faceness"][:, np.newaxis]
    templates, medias = data["templates"], data["medias"]
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        template_feats[count_template] = np.sum(np.array(media_norm_feats), axis=0)
    template_norm_feats = sklearn.preprocessing.normalize(template_feats)

    p1, p2 = data["t1"], data["t2"]
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    score = np.zeros((len(p1),))
    total_pairs = np.array(range(len(p1)))
    batchsize = 100000
    for s in [total_pairs[i : i + batchsize] for i in range(0, len(p1), batchsize)]:
        feat1 = template_norm_feats[template2id[p1[s]]]
        feat2 = template_norm_feats[template2id[p2[s]]]
        score[s] = np.sum(feat1 * feat2, -1).flatten()

    fpr, tpr, _ = roc_curve(data["labels"], score)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    table = {}
    for far in FAR_TARGETS:
        _, min_index = min(list(zip(abs(fpr - far), range(len(fpr)))))
        table[far_key(far)] = float(tpr[min_index])
    return score, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale", type=float, default=1.0, help="fraction of IJB-C's images, templates, pairs"
    )
    parser.add_argument("--skip-official", action="store_true", help="time femb only")
    args = parser.parse_args()
    t = time.perf_counter()
    data = synthetic(args.scale)
    print(f"synthetic data: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    keys = ("features", "faceness", "templates", "medias", "t1", "t2", "labels")

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = time.perf_counter()
    ours = evaluate_1v1(*(data[k] for k in keys))
    femb_s = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    print(f"femb: {femb_s:.1f} s", file=sys.stderr)
    result = {
        "images": len(data["features"]),
        "templates": len(np.unique(data["templates"])),
        "pairs": len(data["labels"]),
        "genuine": int(data["labels"].sum()),
        "femb_s": round(femb_s, 2),
        "femb_peak_extra_gb": round(peak / 2**30, 2),
        "femb_peak_extra_gb_note": "beyond the inputs; includes the returned scores/ROC arrays",
        "features_gb": round(data["features"].nbytes / 2**30, 2),
        "tar_at_far": ours["tar_at_far"],
    }
    if not args.skip_official:
        t = time.perf_counter()
        score, table = official(data)
        result["official_s"] = round(time.perf_counter() - t, 2)
        result["speedup"] = round(result["official_s"] / femb_s, 1)
        result["max_abs_score_diff"] = float(np.abs(score - ours["scores"]).max())
        result["official_tar_at_far"] = table
        result["tar_at_far_equal"] = table == ours["tar_at_far"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
