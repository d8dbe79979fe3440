"""`femb evaluate`: verify a backbone on pair sets and IJB releases; metrics JSON, ROC, quality and EVR plots.

A set that is a file (an InsightFace .bin or a femb pair .parquet) is a pair set: decoded, embedded with
flips and scored by the InsightFace protocol (`femb.evaluation.verification.evaluate_pairs`). A set that
is a directory is an IJB-B/C release (`femb.evaluation.ijb`): its crops aligned and embedded (F1),
features cached under `ijb_cache`, template pairs scored (1:1) and, with the 1:N files, gallery and
probes (1:N). For every set the per-image quality (the feature norm) and the error-versus-reject curve
(`femb.evaluation.quality`: FNMR at FMR 1e-3 for pair sets, 1e-4 for IJB) are computed too.

The metrics file maps each set name (file stem, or directory name such as `IJBC`) to its numbers and
holds the mean accuracy over the pair sets at the top level, the shape `dvc metrics show` reads. With
a plots directory, `roc_<set>.csv` (fpr,tpr, at most 1,000 points) and `roc.png` (all sets, log FAR
axis), `evr_<set>.csv` (reject_fraction,fnmr) and `evr.png`, and `quality_<set>.csv` (per image) are
written there, or the latter two kinds into `evr_dir` and `quality_dir`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from femb.device import resolve_device
from femb.embed import check_batch_size
from femb.errors import FembError
from femb.evaluation.ijb import IJBDataset, embed_ijb, evaluate_ijb, read_ijb
from femb.evaluation.pairsets import embed_pair_set, load_pair_set
from femb.evaluation.plots import plot_evr_curves, plot_roc_curves, write_evr_csv, write_roc_csv
from femb.evaluation.quality import (
    IJB_FMR,
    PAIR_FMR,
    RejectCurve,
    error_versus_reject,
    feature_quality,
    quality_summary,
    template_pair_quality,
    template_quality,
    write_quality_csv,
)
from femb.evaluation.verification import evaluate_pairs, far_key, mean_embedding_norm, pair_distances
from femb.io import write_json
from femb.weights import OnnxBackbone, load_backbone

MEAN_ACCURACY_KEY = "mean_accuracy"
ROC_PNG = "roc.png"
EVR_PNG = "evr.png"


def run_evaluate(
    weights: Path,
    sets: Sequence[Path],
    output: Path,
    backbone: str | None = None,
    batch_size: int = 128,
    device: str | None = None,
    plots_dir: Path | None = None,
    progress: bool | None = None,
    *,
    ijb_normalize_images: bool = False,
    ijb_faceness: bool = True,
    ijb_cache: Path | None = None,
    evr_dir: Path | None = None,
    quality_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate `weights` (.pth / .pt / .ckpt / .onnx) on every pair set and IJB release; write the metrics JSON.

    Returns what was written: `{"<set>": {...metrics...}, ..., "mean_accuracy": float}` (the mean over
    the pair sets; left out without any). Set names must be distinct. `ijb_normalize_images` and
    `ijb_faceness` pick the IJB modes (N0 / D1 of arcface_torch's eval_ijbc.py; defaults N1 D1); IJB
    features are cached as .npy under `ijb_cache` when given. `device` defaults to CUDA when available
    (ONNX weights run on onnxruntime's own provider). The JSON is written atomically, last.
    """
    sets = [Path(s) for s in sets]
    output = Path(output)
    if not sets:
        raise FembError("no sets given; pass .bin or pair .parquet files, or IJB release directories")
    names: dict[str, Path] = {}
    releases: dict[str, IJBDataset] = {}
    for path in sets:
        name = path.name if path.is_dir() else path.stem
        if name in names:
            raise FembError(f"{path}: a second set named '{name}' (first: {names[name]})")
        if not path.exists():
            raise FembError(f"{path}: no such pair set file or IJB directory")
        if name == MEAN_ACCURACY_KEY:
            raise FembError(f"{path}: the set name '{MEAN_ACCURACY_KEY}' is reserved for the summary")
        names[name] = path
    check_batch_size(batch_size)
    if output.suffix.lower() != ".json":
        raise FembError(f"{output}: the metrics file must end in .json")
    for name, path in names.items():
        if path.is_dir():  # read (and checked) before anything is embedded
            releases[name] = read_ijb(path)

    target = resolve_device(device)
    model = load_backbone(weights, backbone)
    if not isinstance(model, OnnxBackbone):
        model = model.to(target)

    metrics: dict[str, Any] = {}
    curves: dict[str, dict[str, Any]] = {}
    rejects: dict[str, RejectCurve] = {}
    qualities: dict[str, dict[str, Any]] = {}
    for name, path in names.items():
        if name in releases:
            result, curves[name], rejects[name], qualities[name] = _evaluate_release(
                model,
                releases[name],
                batch_size=batch_size,
                progress=progress,
                normalize_images=ijb_normalize_images,
                use_faceness=ijb_faceness,
                cache_dir=ijb_cache,
            )
        else:
            result, curves[name], rejects[name], qualities[name] = _evaluate_pair_set(
                model, path, batch_size=batch_size, progress=progress
            )
        metrics[name] = result
    pair_sets = [name for name in names if name not in releases]
    if pair_sets:
        metrics[MEAN_ACCURACY_KEY] = float(np.mean([metrics[name]["accuracy"] for name in pair_sets]))

    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        evr_dir = Path(evr_dir) if evr_dir is not None else plots_dir
        quality_dir = Path(quality_dir) if quality_dir is not None else plots_dir
        for name, curve in curves.items():
            write_roc_csv(plots_dir / f"roc_{name}.csv", curve["fpr"], curve["tpr"])
            write_evr_csv(evr_dir / f"evr_{name}.csv", rejects[name].reject_fraction, rejects[name].fnmr)
            write_quality_csv(quality_dir / f"quality_{name}.csv", qualities[name])
        plot_roc_curves(plots_dir / ROC_PNG, curves, title=f"ROC of {Path(weights).name}")
        evr = {
            name: {"reject_fraction": c.reject_fraction, "fnmr": c.fnmr, "fmr": c.fmr, "auc": c.auc}
            for name, c in rejects.items()
        }
        plot_evr_curves(evr_dir / EVR_PNG, evr, title=f"Error versus reject of {Path(weights).name}")
    write_json(output, metrics)
    return metrics


def _evaluate_pair_set(
    model: nn.Module, path: Path, *, batch_size: int, progress: bool | None
) -> tuple[dict[str, Any], dict[str, Any], RejectCurve, dict[str, Any]]:
    """InsightFace verification of one pair set, plus the quality of each image and the EVR curve."""
    # Not cached: sets are used once here, and a decoded set weighs ~450 MB per 6,000 pairs.
    pair_set = load_pair_set(path, cache=False, progress=progress)
    emb, emb_flip = embed_pair_set(model, pair_set, batch_size=batch_size, progress=progress)
    is_same = pair_set.is_same
    del pair_set
    summed = emb + emb_flip  # arcface_torch's `test`: the flip sum is what is compared
    result = evaluate_pairs(summed[0::2], summed[1::2], is_same)
    result["xnorm"] = mean_embedding_norm(emb, emb_flip)
    roc = result.pop("roc")
    quality = feature_quality(summed)
    cosine = 1.0 - pair_distances(summed[0::2], summed[1::2]) / 2.0  # |a - b|^2 = 2 - 2 cos for unit a, b
    reject = error_versus_reject(cosine, is_same, np.minimum(quality[0::2], quality[1::2]), fmr=PAIR_FMR)
    result["quality"] = {"image": quality_summary(quality), **reject.summary()}
    curve = {
        "fpr": roc["fpr"],
        "tpr": roc["tpr"],
        "tar_at_far": result["tar_at_far"],
        "far_below_resolution": result["far_below_resolution"],
        "accuracy": result["accuracy"],
        "auc": result["auc"],
    }
    pairs = np.arange(len(quality)) // 2
    table = {
        "pair": pairs,
        "side": np.where(np.arange(len(quality)) % 2, "right", "left"),
        "quality": quality,
    }
    return result, curve, reject, table


def _evaluate_release(
    model: nn.Module,
    dataset: IJBDataset,
    *,
    batch_size: int,
    progress: bool | None,
    normalize_images: bool,
    use_faceness: bool,
    cache_dir: Path | None,
) -> tuple[dict[str, Any], dict[str, Any], RejectCurve, dict[str, Any]]:
    """IJB 1:1 (and 1:N) of one release, plus each image's quality and the template-pair EVR curve."""
    features = embed_ijb(model, dataset, batch_size, progress=progress, cache_dir=cache_dir)
    scored = evaluate_ijb(
        dataset, features, normalize_images=normalize_images, use_faceness=use_faceness, arrays=True
    )
    one = scored["1v1"]
    scores, fpr, tpr = one.pop("scores"), one.pop("fpr"), one.pop("tpr")
    one.pop("thresholds")
    num_pairs, num_same = one.pop("pairs"), one.pop("genuine")
    num_diff = num_pairs - num_same
    resolution = 1.0 / num_diff
    result: dict[str, Any] = {
        "protocol": f"{dataset.name} 1:1" + (" and 1:N" if dataset.has_1vn else ""),
        "normalize_images": normalize_images,
        "use_faceness": use_faceness,
        **one,  # tar_at_far, tar_at_far_interpolated, threshold_at_far, auc
        "far_resolution": resolution,
        "far_below_resolution": [key for key in one["tar_at_far"] if float(key) < resolution],
        "num_pairs": num_pairs,
        "num_same": num_same,
        "num_diff": num_diff,
        "num_images": len(dataset.images),
        "num_templates": int(np.unique(dataset.templates).size),
    }
    if "1vn" in scored:
        result["1vn"] = scored["1vn"]
    quality = feature_quality(features)
    templates, per_template = template_quality(quality, dataset.templates)
    pair_quality = template_pair_quality(templates, per_template, dataset.pair_t1, dataset.pair_t2)
    reject = error_versus_reject(scores, dataset.pair_labels == 1, pair_quality, fmr=IJB_FMR)
    result["quality"] = {"image": quality_summary(quality), **reject.summary()}
    curve = {
        "fpr": fpr,
        "tpr": tpr,
        # marked at the interpolated TAR, which lies on the drawn curve; the JSON has the official one too
        "tar_at_far": one["tar_at_far_interpolated"],
        "far_below_resolution": result["far_below_resolution"],
        "auc": result["auc"],
    }
    table = {"image": list(dataset.images), "template": dataset.templates, "quality": quality}
    return result, curve, reject, table


def ijb_summary_line(name: str, result: dict[str, Any]) -> str:
    """One line of IJB numbers for the console: TAR at FAR 1e-5 and 1e-4, and rank-1 when 1:N ran."""
    tar = result.get("tar_at_far", {})
    parts = [f"TAR@FAR={k} {100 * tar[k]:.2f}%" for k in (far_key(1e-5), far_key(1e-4)) if k in tar]
    if "1vn" in result:
        parts.append(f"rank-1 {100 * result['1vn']['rank_1']:.2f}%")
    return f"{name}: " + ", ".join(parts)


def default_ijb_cache() -> Path:
    """Where `femb evaluate` caches IJB features by default: `$XDG_CACHE_HOME/femb/ijb` (~/.cache/femb/ijb)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "femb" / "ijb"
