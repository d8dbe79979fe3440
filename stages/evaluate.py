"""Stage `evaluate`: the trained backbone on the pair sets and IJB releases; metrics JSON, ROC, EVR, quality."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from femb.config import Params
from femb.data.layout import pair_set_files
from femb.errors import FembError
from femb.evaluation.evaluate import ijb_summary_line, run_evaluate
from stages.common import run_stage


def main(params: Params, argv: Sequence[str]) -> None:
    """Evaluate `train.out_dir`/backbone.pth on `evaluate.sets` (default: every pair set) and `evaluate.ijb`."""
    metrics_path, roc_dir, evr_dir, quality_dir = argv
    e = params.evaluate
    sets = [Path(s) for s in e.sets] or pair_set_files(params.data.shards)
    for release in e.ijb:
        if not release.is_dir():
            raise FembError(f"params.yaml: evaluate.ijb: {release} is not a directory (an IJB-B/C release)")
    metrics = run_evaluate(
        params.train.out_dir / "backbone.pth",
        [*sets, *e.ijb],
        Path(metrics_path),
        backbone=params.backbone,
        batch_size=e.batch_size,
        plots_dir=Path(roc_dir),
        evr_dir=Path(evr_dir),
        quality_dir=Path(quality_dir),
        ijb_normalize_images=e.ijb_normalize_images,
        ijb_faceness=e.ijb_faceness,
        ijb_cache=e.ijb_cache,
    )
    for name in (s.stem for s in sets):
        print(
            f"evaluate: {name} accuracy {100 * metrics[name]['accuracy']:.2f}% +- {100 * metrics[name]['accuracy_std']:.2f}"
        )
    for name in (Path(d).name for d in e.ijb):
        print(f"evaluate: {ijb_summary_line(name, metrics[name])}")


if __name__ == "__main__":
    run_stage(main)
