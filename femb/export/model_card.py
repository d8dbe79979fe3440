"""A short Markdown model card beside an exported model (after Mitchell et al., "Model Cards", FAT* 2019).

It says what the file is (backbone, head, training data fingerprint, precision, interface), how well
it verifies (one table row per pair set, InsightFace protocol; one per IJB-B/C release: TAR at FAR
1e-5 and 1e-4 and rank-1), how closely the ONNX graph matches PyTorch, and how to run it with
onnxruntime.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from femb import __version__
from femb.evaluation.verification import FAR_TARGETS, far_key
from femb.io import write_text

IJB_CARD_FARS = (1e-5, 1e-4)  # the columns IJB-C results are compared by (arcface_torch's table)

_USAGE = """\
```python
import numpy as np
import onnxruntime as ort
from PIL import Image

session = ort.InferenceSession("{model}", providers=["CPUExecutionProvider"])
# An aligned 112x112 face crop (ArcFace 5-point alignment), RGB, normalised as (x/255 - 0.5)/0.5.
face = np.asarray(Image.open("face.jpg").convert("RGB").resize((112, 112)), dtype=np.float32)
data = ((face / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]  # float32 N x 3 x 112 x 112
embedding = session.run(["embedding"], {{"data": data}})[0][0]
embedding /= np.linalg.norm(embedding)  # compare two faces by the dot product of such vectors
```

InsightFace serves the file as a recognition model too: `insightface.model_zoo.get_model("{model}")`
(it feeds float32 `(x - 127.5) / 127.5`, the same normalisation)."""


def write_model_card(
    path: Path | str, info: Mapping[str, Any], metrics: Mapping[str, Any] | None = None
) -> Path:
    """Write the model card Markdown to `path` atomically from `export_onnx`'s result and `run_evaluate`'s metrics."""
    path = Path(path)
    write_text(path, render_model_card(info, metrics))
    return path


def render_model_card(info: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> str:
    """The model card as Markdown text; missing entries of `info` show as "unknown"."""
    model = Path(str(info.get("output", "model.onnx"))).name
    backbone = info.get("backbone", "unknown")
    date = info.get("date") or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    output_tensor = info.get("output_tensor", {})
    version = dict(info.get("metadata", {})).get("femb_version", __version__)
    embedding_size = output_tensor.get("shape", ["N", "D"])[-1] if isinstance(output_tensor, Mapping) else "D"
    lines = [
        f"# {model}: {backbone} face embedding",
        "",
        "| | |",
        "|---|---|",
        f"| Backbone | {backbone} |",
        f"| Head (training loss) | {info.get('header', 'unknown')} |",
        f"| Training data fingerprint | `{info.get('dataset_fingerprint', 'unknown')}` |",
        f"| Precision | {'float16 weights, float32 input/output' if info.get('fp16') else 'float32'} |",
        "| Input | `data` float32 N x 3 x 112 x 112, RGB, (x/255 - 0.5)/0.5, batch dynamic |",
        f"| Output | `embedding` float32 N x {embedding_size}, not normalised |",
        f"| ONNX opset | {info.get('opset', 'unknown')} |",
        f"| sha256 | `{info.get('sha256', 'unknown')}` |",
        f"| Written | {date}, femb {version} |",
        "",
        "## Verification",
        "",
    ]
    lines += _metrics_table(metrics) if metrics and _pair_sets(metrics) else ["Not evaluated."]
    if metrics and _releases(metrics):
        lines += ["", "## IJB (template 1:1 verification, 1:N identification)", ""]
        lines += _ijb_table(metrics)
    lines += ["", "## Export parity (onnxruntime CPU vs PyTorch float32)", ""]
    if "max_abs_diff" in info:
        lines += [
            f"Max |difference| {info['max_abs_diff']:.3g} (relative {info.get('max_rel_diff', float('nan')):.3g} "
            f"of the largest |embedding element| {info.get('embedding_scale', float('nan')):.3g}), "
            f"tolerance {info.get('tolerance', float('nan')):.3g}; lowest cosine similarity "
            f"{info.get('min_cosine', float('nan')):.6f}; random batches of {info.get('checked_batches', [])}.",
        ]
    else:
        lines.append("Not checked.")
    lines += ["", "## Use", "", _USAGE.format(model=model), ""]
    return "\n".join(lines)


def _pair_sets(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The pair-set entries of `run_evaluate`'s metrics: those with an accuracy."""
    return {k: v for k, v in metrics.items() if isinstance(v, Mapping) and "accuracy" in v}


def _releases(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The IJB entries of `run_evaluate`'s metrics: TAR@FAR without an accuracy."""
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, Mapping) and "accuracy" not in v and isinstance(v.get("tar_at_far"), Mapping)
    }


def _ijb_table(metrics: Mapping[str, Any]) -> list[str]:
    """One row per IJB release: TAR at FAR 1e-5 and 1e-4 (official nearest-point rule), rank-1, pairs, mode."""
    keys = [far_key(far) for far in IJB_CARD_FARS]
    header = ["Set", *(f"TAR@FAR={k} (%)" for k in keys), "Rank-1 (%)", "Template pairs", "Mode"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    below: list[str] = []
    for name, result in _releases(metrics).items():
        tar = result["tar_at_far"]
        one_n = result.get("1vn")
        mode = ("N0" if result.get("normalize_images") else "N1") + (
            "D0" if result.get("use_faceness") is False else "D1"
        )
        cells = [
            name,
            *(f"{100 * tar[k]:.2f}" if isinstance(tar.get(k), (int, float)) else "-" for k in keys),
            f"{100 * one_n['rank_1']:.2f}" if isinstance(one_n, Mapping) and "rank_1" in one_n else "-",
            str(result.get("num_pairs", "-")),
            f"F1 {mode}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
        below += [k for k in keys if k in result.get("far_below_resolution", []) and k not in below]
    if below:
        rows += ["", f"TAR at FAR {', '.join(below)} lies below what some releases can measure."]
    return rows


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    """One row per set: accuracy +- std (10 folds, flip-summed), TAR@FAR, AUC, EER, XNorm, pairs."""
    keys = [far_key(far) for far in FAR_TARGETS]
    header = ["Set", "Accuracy (%)", *(f"TAR@FAR={k} (%)" for k in keys), "AUC", "EER (%)", "XNorm", "Pairs"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in _pair_sets(metrics).items():
        tar = result.get("tar_at_far", {})
        cells = [
            name,
            f"{100 * result['accuracy']:.2f} ± {100 * result.get('accuracy_std', 0.0):.2f}",
            *(f"{100 * tar[k]:.2f}" if k in tar else "-" for k in keys),
            f"{result['auc']:.4f}" if "auc" in result else "-",
            f"{100 * result['eer']:.2f}" if "eer" in result else "-",
            f"{result['xnorm']:.2f}" if "xnorm" in result else "-",
            str(result.get("num_pairs", "-")),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    if "mean_accuracy" in metrics:
        rows += ["", f"Mean accuracy over the sets: {100 * metrics['mean_accuracy']:.2f}%."]
    below = sorted({k for r in _pair_sets(metrics).values() for k in r.get("far_below_resolution", [])})
    if below:
        rows.append(f"TAR at FAR {', '.join(below)} lies below what some sets can measure (too few pairs).")
    return rows
