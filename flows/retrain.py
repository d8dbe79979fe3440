"""Flow `femb-retrain`: retrain when the data changed, then `dvc push` the new models.

"Changed" is DVC's word: `dvc status --with-deps convert` (the stage that reads `data.source`, and the
stages upstream of it, such as `synth` for the demo) reports a changed dependency, parameter or
output, or a stage that never ran. Then the pipeline flow reproduces every stage and `dvc push`
sends the new outputs to the default remote. Nothing is committed: `git add dvc.lock && git commit`
records the new lineage.

    python -m flows.retrain                          # once, now
    python -m flows.retrain serve --cron "0 3 * * 1" # every Monday 03:00 (needs a Prefect server)

Schedules live on a Prefect server: `make prefect-server` starts one on 127.0.0.1:4200; export
PREFECT_API_URL=http://127.0.0.1:4200/api in the shell that serves.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL

from femb.errors import FembError
from flows.common import add_run_arguments, failed, run_logger, run_main, with_retries
from flows.pipeline import pipeline

DATA_STAGES = ("convert",)
DEPLOYMENT = "femb-retrain"


@flow(name="femb-retrain")
def retrain(
    repo: str = ".",
    data_stages: list[str] | None = None,
    force: bool = False,
    push: bool = True,
    retries: int = 3,
    retry_delay: float = 30.0,
) -> Any:
    """Reproduce and push the pipeline in `repo` if `data_stages` (default: convert) or their upstream changed."""
    logger = run_logger()
    targets = list(data_stages or DATA_STAGES)
    status = with_retries("data status", retries, retry_delay)
    state = status(["status", "--json", "--with-deps", *targets], repo, capture=True, return_state=True)
    if state.is_failed():
        return failed(state.result(raise_on_failure=False))
    changed: dict[str, Any] = json.loads("\n".join(state.result().stdout) or "{}")
    for stage, changes in changed.items():
        logger.info("%s changed: %s", stage, json.dumps(changes))
    if not changed and not force:
        logger.info("data unchanged (%s and upstream): nothing to retrain", ", ".join(targets))
        return {"changed": {}, "stages": {}, "pushed": False}
    state = pipeline(repo=repo, retries=retries, retry_delay=retry_delay, return_state=True)
    if state.is_failed():
        return failed(state.result(raise_on_failure=False))
    stages = state.result()
    if push:
        state = with_retries("push", retries, retry_delay)(["push"], repo, return_state=True)
        if state.is_failed():
            return failed(state.result(raise_on_failure=False))
    logger.info("retrained; record the lineage with `git add dvc.lock && git commit`")
    return {"changed": changed, "stages": stages, "pushed": push}


def deployment(
    cron: str,
    name: str = DEPLOYMENT,
    timezone: str = "UTC",
    parameters: dict[str, Any] | None = None,
) -> RunnerDeployment:
    """The retrain flow as a deployment on a cron schedule (Prefect `Cron`), one run at a time."""
    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError as err:
        raise FembError(f"--cron {cron!r} / --timezone {timezone!r}: {str(err).splitlines()[0]}") from None
    return retrain.to_deployment(
        name=name,
        schedules=[schedule],
        parameters=parameters or {},
        concurrency_limit=1,  # DVC allows one run per workspace; a late run waits for the previous one
        description="Retrain when the data changed (dvc status), reproduce the pipeline, dvc push.",
        tags=["femb"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.retrain [run] | serve --cron CRON`: retrain once, or serve on a schedule."""
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=("run", "serve"), default="run")
    add_run_arguments(parser)
    parser.add_argument(
        "--data-stage",
        action="append",
        dest="data_stages",
        help="a stage whose change (or its upstream's) triggers retraining; repeatable (default: convert)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even if the data did not change")
    parser.add_argument("--no-push", dest="push", action="store_false", help="do not `dvc push` afterwards")
    parser.add_argument("--cron", default="0 3 * * 1", help="serve: the schedule (default: Mondays 03:00)")
    parser.add_argument("--timezone", default="UTC", help="serve: the cron's time zone (default: UTC)")
    parser.add_argument(
        "--name", default=DEPLOYMENT, help=f"serve: the deployment name (default: {DEPLOYMENT})"
    )
    args = parser.parse_args(argv)
    parameters = {
        "repo": str(Path(args.repo).resolve()),
        "data_stages": args.data_stages,
        "force": args.force,
        "push": args.push,
        "retries": args.retries,
        "retry_delay": args.retry_delay,
    }
    if args.command == "run":
        return run_main(parser.prog, lambda: retrain(**parameters))

    def serve_schedule() -> None:
        if not PREFECT_API_URL.value():
            raise FembError(
                "PREFECT_API_URL is not set: schedules need a Prefect server; start one with "
                "`make prefect-server` and export PREFECT_API_URL=http://127.0.0.1:4200/api"
            )
        serve(deployment(args.cron, args.name, args.timezone, parameters))

    return run_main(parser.prog, serve_schedule)


if __name__ == "__main__":
    raise SystemExit(main())
