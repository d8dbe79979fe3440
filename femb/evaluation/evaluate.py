"""`femb evaluate`: verify a backbone on pair sets and write metrics JSON and ROC plots (InsightFace protocol).

Each set (an InsightFace .bin or a femb pair .parquet) is decoded, embedded with flips and scored
by `femb.evaluation.pairsets.verify_pair_set`. The metrics file maps each set name to its numbers
(accuracy, accuracy_std, tar_at_far, auc, eer, xnorm, ...) and holds the mean accuracy over the sets
at the top level, the shape `dvc metrics show` reads. With a plots directory, `roc_<set>.csv`
(fpr,tpr, at most 1,000 points) and `roc.png` (all sets, log FAR axis) are written next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from femb.device import resolve_device
from femb.embed import check_batch_size
from femb.errors import FembError
from femb.evaluation.pairsets import load_pair_set, verify_pair_set
from femb.evaluation.plots import plot_roc_curves, write_roc_csv
from femb.io import write_json
from femb.weights import OnnxBackbone, load_backbone

MEAN_ACCURACY_KEY = "mean_accuracy"
ROC_PNG = "roc.png"


def run_evaluate(
    weights: Path,
    sets: Sequence[Path],
    output: Path,
    backbone: str | None = None,
    batch_size: int = 128,
    device: str | None = None,
    plots_dir: Path | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Evaluate `weights` (.pth / .pt / .ckpt / .onnx) on every pair set; write the metrics JSON atomically.

    Returns what was written: `{"<set>": {...metrics...}, ..., "mean_accuracy": float}`. Set names are
    the file stems and must be distinct. `device` defaults to CUDA when available (ONNX weights run
    on onnxruntime's own provider).
    """
    sets = [Path(s) for s in sets]
    output = Path(output)
    if not sets:
        raise FembError("no pair sets given; pass one or more .bin or pair .parquet files")
    names: dict[str, Path] = {}
    for path in sets:
        if path.stem in names:
            raise FembError(f"{path}: a second set named '{path.stem}' (first: {names[path.stem]})")
        if not path.is_file():
            raise FembError(f"{path}: no such pair set file")
        if path.stem == MEAN_ACCURACY_KEY:
            raise FembError(f"{path}: the set name '{MEAN_ACCURACY_KEY}' is reserved for the summary")
        names[path.stem] = path
    check_batch_size(batch_size)
    if output.suffix.lower() != ".json":
        raise FembError(f"{output}: the metrics file must end in .json")

    target = resolve_device(device)
    model = load_backbone(weights, backbone)
    if not isinstance(model, OnnxBackbone):
        model = model.to(target)

    metrics: dict[str, Any] = {}
    curves: dict[str, dict[str, Any]] = {}
    for path in sets:
        # Not cached: sets are used once here, and a decoded set weighs ~450 MB per 6,000 pairs.
        pair_set = load_pair_set(path, cache=False, progress=progress)
        result = verify_pair_set(model, pair_set, batch_size=batch_size, progress=progress)
        del pair_set
        roc = result.pop("roc")
        metrics[path.stem] = result
        curves[path.stem] = {
            "fpr": roc["fpr"],
            "tpr": roc["tpr"],
            "tar_at_far": result["tar_at_far"],
            "far_below_resolution": result["far_below_resolution"],
            "accuracy": result["accuracy"],
            "auc": result["auc"],
        }
    metrics[MEAN_ACCURACY_KEY] = float(np.mean([metrics[name]["accuracy"] for name in names]))

    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        for name, curve in curves.items():
            write_roc_csv(plots_dir / f"roc_{name}.csv", curve["fpr"], curve["tpr"])
        plot_roc_curves(plots_dir / ROC_PNG, curves, title=f"ROC of {Path(weights).name}")
    write_json(output, metrics)
    return metrics
