"""Stage `export`: the trained backbone as ONNX (parity-checked against PyTorch) and its model card."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from femb.config import Params
from femb.data.layout import data_fingerprint, manifest_path
from femb.errors import FembError
from femb.export.model_card import write_model_card
from femb.export.onnx import export_onnx
from stages.common import run_stage


def main(params: Params, argv: Sequence[str]) -> None:
    """Export `train.out_dir`/backbone.pth to `export.output`, stamped with the shards' fingerprint."""
    (metrics_path,) = argv
    fingerprint = data_fingerprint(params.data.shards)
    if fingerprint is None:
        raise FembError(
            f"{manifest_path(params.data.shards)}: no manifest fingerprint; run the convert stage"
        )
    e = params.export
    info = export_onnx(
        params.train.out_dir / "backbone.pth",
        e.output,
        backbone=params.backbone,
        header=params.header,
        dataset_fingerprint=fingerprint,
        fp16=e.fp16,
        opset=e.opset,
    )
    write_model_card(e.model_card, info, json.loads(Path(metrics_path).read_text()))
    print(f"export: {e.output} ({info['max_abs_diff']:.2g} max |onnxruntime - torch|), card {e.model_card}")


if __name__ == "__main__":
    run_stage(main)
