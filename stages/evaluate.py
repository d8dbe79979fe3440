"""Stage `evaluate`: the trained backbone on the pair sets, InsightFace protocol; metrics JSON and ROC plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from femb.config import Params
from femb.data.layout import pair_set_files
from femb.evaluation.evaluate import run_evaluate
from stages.common import run_stage


def main(params: Params, argv: Sequence[str]) -> None:
    """Evaluate `train.out_dir`/backbone.pth on `evaluate.sets` (default: every pair set in `data.shards`)."""
    metrics_path, plots_dir = argv
    sets = [Path(s) for s in params.evaluate.sets] or pair_set_files(params.data.shards)
    metrics = run_evaluate(
        params.train.out_dir / "backbone.pth",
        sets,
        Path(metrics_path),
        backbone=params.backbone,
        batch_size=params.evaluate.batch_size,
        plots_dir=Path(plots_dir),
    )
    for name in (s.stem for s in sets):
        print(
            f"evaluate: {name} accuracy {100 * metrics[name]['accuracy']:.2f}% +- {100 * metrics[name]['accuracy_std']:.2f}"
        )


if __name__ == "__main__":
    run_stage(main)
