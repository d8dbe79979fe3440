"""Stage `train`: `backbone` with head `header` on `data.shards`; checkpoints, backbone.pth, DVCLive curves.

A preempted run (SIGTERM, SIGUSR1) exits with status 75 after its checkpoint; `dvc repro` resumes it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from dvclive.lightning import DVCLiveLogger

from femb.config import Params
from femb.io import write_json
from femb.training.checkpoints import remove_run
from femb.training.run import CHECKPOINTS, RUN_OUTPUTS, resuming, run_fingerprint, train
from femb.training.stash import StashCheckpoints, restore
from stages.common import run_stage

STASH = Path(".femb-cache/runs")  # hard links of each unfinished run's checkpoints, by run fingerprint


def main(params: Params, argv: Sequence[str]) -> None:
    """Train into `train.out_dir`; write the run's numbers (steps, time, throughput, best accuracy) as metrics.

    dvc.yaml keeps `train.out_dir` (`persist: true`), so a killed run resumes from its last checkpoint;
    an earlier run of other params, code or data there is replaced, as DVC would have removed it.
    `dvc exp run` removes an out_dir its baseline does not hold, so the checkpoints are also stashed
    (hard links) under `.femb-cache/runs/<fingerprint>` until the run completes, and put back from there.
    """
    (metrics,) = argv
    stash = STASH / run_fingerprint(params)
    checkpoints = params.train.out_dir / CHECKPOINTS
    resume = resuming(params, other_run="replace")
    if not resume and restore(stash, checkpoints):
        # What else out_dir holds is not this run's (dvc exp run put back its baseline's, or nothing).
        remove_run(params.train.out_dir, [name for name in RUN_OUTPUTS if name != CHECKPOINTS])
        print(f"train: checkpoints of this run restored from {stash} (dvc exp run had removed them)")
        resume = True
    live = DVCLiveLogger(
        dir=str(params.train.out_dir / "dvclive"),
        save_dvc_exp=False,
        dvcyaml=None,
        resume=resume,
        report=None,
    )
    summary = train(
        params, loggers=[live], other_run="replace", callbacks=[StashCheckpoints(checkpoints, stash)]
    )
    shutil.rmtree(stash, ignore_errors=True)  # complete: DVC holds the outputs now
    if summary:  # rank 0 (every rank of a multi-device run runs this script)
        numbers = {
            k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        write_json(metrics, numbers)
        print(f"train: {json.dumps(numbers)}")


if __name__ == "__main__":
    run_stage(main)
