"""Stage `train`: `backbone` with head `header` on `data.shards`; checkpoints, backbone.pth, DVCLive curves."""

from __future__ import annotations

import json
from collections.abc import Sequence

from dvclive.lightning import DVCLiveLogger

from femb.config import Params
from femb.io import write_json
from femb.training.run import resuming, train
from stages.common import run_stage


def main(params: Params, argv: Sequence[str]) -> None:
    """Train into `train.out_dir`; write the run's numbers (steps, time, throughput, best accuracy) as metrics."""
    (metrics,) = argv
    live = DVCLiveLogger(
        dir=str(params.train.out_dir / "dvclive"),
        save_dvc_exp=False,
        dvcyaml=None,
        resume=resuming(params),
        report=None,
    )
    summary = train(params, loggers=[live])
    if summary:  # rank 0 (every rank of a multi-device run runs this script)
        numbers = {
            k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        write_json(metrics, numbers)
        print(f"train: {json.dumps(numbers)}")


if __name__ == "__main__":
    run_stage(main)
