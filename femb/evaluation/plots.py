"""ROC and error-versus-reject curves of evaluated sets: a CSV per set for `dvc plots`, one PNG of all sets.

The ROC PNG draws TAR against FAR on a log FAR axis, as face-recognition papers report verification
(TAR@FAR = 1e-4 ... 1e-2 marked on each curve); the CSVs hold `fpr,tpr` rows that DVC plots with
`x: fpr, y: tpr`. The EVR PNG draws FNMR against the share of lowest-quality pairs discarded
(`femb.evaluation.quality`), its CSVs `reject_fraction,fnmr` rows. matplotlib runs through its Agg canvas only, with no pyplot state, so plotting
works on machines without a display and inside training processes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from femb.io import write_bytes

MAX_ROC_POINTS = 1000


def downsample_roc(
    fpr: np.ndarray, tpr: np.ndarray, max_points: int = MAX_ROC_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points of a monotone ROC: both ends, log-spaced FAR points, evenly spaced indices.

    Half the budget goes to the operating points at log-spaced FAR targets (the last point whose FAR
    does not exceed each target, i.e. the TAR@FAR points, dense where a log axis needs them), half to
    evenly spaced indices (the shape at high FAR). The first and last points are always kept.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if fpr.shape != tpr.shape or fpr.ndim != 1 or fpr.size == 0:
        raise ValueError(f"fpr and tpr must be 1-D arrays of one length, got {fpr.shape} and {tpr.shape}")
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    n = fpr.size
    if n <= max_points:
        return fpr, tpr
    budget = max_points - 2
    positive = fpr[fpr > 0]
    log_points = np.empty(0, dtype=np.int64)
    if positive.size:
        targets = np.geomspace(positive.min(), fpr[-1], budget // 2)
        log_points = np.searchsorted(fpr, targets, side="right") - 1
    even = np.linspace(0, n - 1, budget - budget // 2 + 2).round().astype(np.int64)
    keep = np.unique(np.concatenate([[0, n - 1], log_points, even]))
    return fpr[keep], tpr[keep]


def write_roc_csv(path: Path, fpr: np.ndarray, tpr: np.ndarray, max_points: int = MAX_ROC_POINTS) -> Path:
    """Write the (downsampled) ROC as CSV with columns fpr,tpr, atomically; DVC plots it with x=fpr, y=tpr."""
    fpr, tpr = downsample_roc(fpr, tpr, max_points)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["fpr", "tpr"])
    writer.writerows((f"{f:.8g}", f"{t:.8g}") for f, t in zip(fpr, tpr))
    write_bytes(Path(path), buffer.getvalue().encode())
    return Path(path)


def plot_roc_curves(path: Path, curves: Mapping[str, Mapping[str, object]], title: str = "ROC") -> Path:
    """Draw every set's ROC (TAR vs log FAR) with its TAR@FAR points marked into one PNG, atomically.

    `curves[name]` holds "fpr" and "tpr" arrays, and optionally "tar_at_far" ({"1e-04": tar, ...}; keys
    listed in "far_below_resolution" are not marked), "auc" and "accuracy" for the legend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 5.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    sampled = {name: downsample_roc(np.asarray(c["fpr"]), np.asarray(c["tpr"])) for name, c in curves.items()}
    marks = {
        name: [
            (float(key), float(tar))
            for key, tar in dict(curve.get("tar_at_far", {})).items()
            if key not in set(curve.get("far_below_resolution", []))  # not measurable with so few pairs
        ]
        for name, curve in curves.items()
    }
    visible = [f for fpr, _ in sampled.values() for f in fpr if f > 0]
    visible += [far for points in marks.values() for far, _ in points]
    left = min(visible, default=1e-4) / 2
    for index, (name, curve) in enumerate(curves.items()):
        fpr, tpr = sampled[name]
        color = f"C{index % 10}"
        label = name
        if "accuracy" in curve:
            label += f"  acc {100 * float(curve['accuracy']):.2f}%"
        if "auc" in curve:
            label += f"  AUC {float(curve['auc']):.4f}"
        # FAR = 0 has no place on a log axis: the points without false accepts start at the left edge.
        axes.plot(np.maximum(fpr, left), tpr, color=color, linewidth=1.4, label=label)
        for far, tar in marks[name]:
            axes.plot([far], [tar], marker="o", markersize=4, color=color, linestyle="none")
    for far in sorted({far for points in marks.values() for far, _ in points}):
        axes.axvline(far, color="0.6", linestyle=":", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_xlim(left, 1.0)
    axes.set_ylim(0.0, 1.01)
    axes.set_xlabel("FAR (false accept rate)")
    axes.set_ylabel("TAR (true accept rate)")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    if curves:
        axes.legend(loc="lower right", fontsize=8)
    return _save_png(figure, path)


def _save_png(figure: object, path: Path) -> Path:
    """Lay out a matplotlib figure and write it as a PNG, atomically."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def write_evr_csv(path: Path, reject_fraction: np.ndarray, fnmr: np.ndarray) -> Path:
    """Write an error-versus-reject curve as CSV `reject_fraction,fnmr`, atomically (empty FNMR where undefined)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["reject_fraction", "fnmr"])
    writer.writerows(
        (f"{r:.6g}", f"{e:.8g}" if np.isfinite(e) else "") for r, e in zip(reject_fraction, fnmr)
    )
    write_bytes(Path(path), buffer.getvalue().encode())
    return Path(path)


def plot_evr_curves(
    path: Path, curves: Mapping[str, Mapping[str, object]], title: str = "Error versus reject"
) -> Path:
    """Draw every set's FNMR against the fraction of lowest-quality pairs discarded into one PNG, atomically.

    `curves[name]` holds "reject_fraction" and "fnmr" arrays, and optionally "fmr" and "auc" for the legend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 5.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    top = 0.0
    for index, (name, curve) in enumerate(curves.items()):
        fraction = np.asarray(curve["reject_fraction"], dtype=np.float64)
        fnmr = np.asarray(curve["fnmr"], dtype=np.float64)
        label = name
        if "fmr" in curve:
            label += f"  FNMR@FMR={float(curve['fmr']):.0e}"
        if curve.get("auc") is not None and np.isfinite(float(curve["auc"])):
            label += f"  AUC {float(curve['auc']):.4f}"
        axes.plot(100 * fraction, fnmr, color=f"C{index % 10}", linewidth=1.4, label=label)
        if np.isfinite(fnmr).any():
            top = max(top, float(np.nanmax(fnmr)))
    axes.set_xlim(0.0, 100 * max((float(np.max(c["reject_fraction"])) for c in curves.values()), default=0.5))
    axes.set_ylim(0.0, max(top * 1.05, 1e-3))
    axes.set_xlabel("lowest-quality pairs discarded (%)")
    axes.set_ylabel("FNMR (false non-match rate)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if curves:
        axes.legend(loc="best", fontsize=8)
    return _save_png(figure, path)
