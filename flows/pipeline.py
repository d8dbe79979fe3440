"""Flow `femb-pipeline`: `dvc repro` one stage at a time in DAG order, one Prefect task per stage.

Each task runs `dvc repro --single-item <stage>`, so a task is exactly one DVC stage (upstream stages
ran in the tasks before it), and only one dvc runs at a time: DVC forbids parallel runs in one
workspace. Output lines stream into the Prefect log (terminal, and the UI when a server runs).
Transient failures are retried with exponential backoff, config errors are not (flows/common.py).
When a stage fails for good, `dvc checkout <stage>` puts back the outputs of its last successful run
(DVC deletes a stage's outputs before running it), so the workspace matches dvc.lock again.

    python -m flows.pipeline                 # every stage
    python -m flows.pipeline train evaluate  # these stages, in DAG order
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow

from femb.errors import FembError
from flows.common import DvcError, add_run_arguments, failed, run_dvc, run_logger, run_main, with_retries

DAG_EDGE = re.compile(r'^"(?P<up>[^"]+)"\s*->\s*"(?P<down>[^"]+)";?$')


def topological_order(names: Sequence[str], edges: Sequence[tuple[str, str]]) -> list[str]:
    """`names` sorted so that every (upstream, downstream) edge points forward; ties keep their given order."""
    upstream: dict[str, set[str]] = {name: set() for name in names}
    for up, down in edges:
        upstream.setdefault(down, set()).add(up)
        upstream.setdefault(up, set())
    order = [*names, *(name for name in upstream if name not in names)]
    done: list[str] = []
    while len(done) < len(order):
        ready = next((n for n in order if n not in done and upstream[n] <= set(done)), None)
        if ready is None:
            raise FembError(f"dvc.yaml: the stages {sorted(set(order) - set(done))} form a cycle")
        done.append(ready)
    return done


def list_stages(repo: Path | str = ".") -> list[str]:
    """The pipeline's stages in DAG order: names from `dvc stage list`, edges from `dvc dag --dot`."""
    names = [line.strip() for line in run_dvc(["stage", "list", "--name-only"], repo, capture=True).stdout]
    names = [name for name in names if name]
    if not names:
        raise FembError(f"{Path(repo) / 'dvc.yaml'}: no stages to run")
    dot = run_dvc(["dag", "--dot"], repo, capture=True).stdout
    edges = [(m["up"], m["down"]) for m in map(DAG_EDGE.match, (line.strip() for line in dot)) if m]
    return topological_order(names, edges)


def select_stages(order: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """The `wanted` stages (all when None) in DAG order; an unknown name is a one-line error."""
    if not wanted:
        return list(order)
    for name in wanted:
        if name not in order:
            raise FembError(f"stages: '{name}' is not a stage of dvc.yaml; choose from {', '.join(order)}")
    return [name for name in order if name in wanted]


def ran(stage: str, stdout: Sequence[str]) -> bool:
    """Whether `dvc repro` ran `stage` (True) or found it unchanged (False), from what it printed."""
    return any(line.startswith(f"Running stage '{stage}'") for line in stdout)


@flow(name="femb-pipeline")
def pipeline(
    repo: str = ".",
    stages: list[str] | None = None,
    retries: int = 3,
    retry_delay: float = 30.0,
) -> Any:
    """Reproduce the DVC pipeline in `repo` stage by stage; returns {stage: "ran" | "unchanged"}."""
    logger = run_logger()
    try:
        order = select_stages(list_stages(repo), stages)
    except (FembError, DvcError) as error:
        return failed(error)
    logger.info("stages in order: %s", " -> ".join(order))
    outcome: dict[str, str] = {}
    for stage in order:
        repro = with_retries(f"repro {stage}", retries, retry_delay)
        state = repro(["repro", "--single-item", stage], repo, return_state=True)
        if state.is_failed():
            restore = with_retries(f"restore {stage}", min(retries, 2), 1.0)
            restored = restore(["checkout", stage], repo, return_state=True)
            if restored.is_failed():
                logger.warning(
                    "%s: could not restore its previous outputs; `dvc checkout %s` later", stage, stage
                )
            return failed(state.result(raise_on_failure=False))  # the flow fails with this stage's message
        outcome[stage] = "ran" if ran(stage, state.result().stdout) else "unchanged"
        logger.info("%s: %s", stage, outcome[stage])
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.pipeline [STAGE ...]`: run the pipeline locally (a temporary Prefect server)."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("stages", nargs="*", help="stages to run, in DAG order (default: all)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    return run_main(
        parser.prog,
        lambda: pipeline(
            repo=args.repo, stages=args.stages or None, retries=args.retries, retry_delay=args.retry_delay
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
