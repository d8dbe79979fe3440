"""What the flows share: dvc commands with their output streamed into the Prefect run log, and failures
sorted into transient (retried with backoff) and permanent (not retried).

The rule (`classify_failure`): a failure is permanent when, and only when, the process was not killed
by a signal and its log shows an error that editing a file fixes; everything else is transient.

- Permanent: a femb user error, printed as one line by a stage (``stage train: params.yaml: ...``, see
  stages/common.py) or by the femb CLI (``femb convert: ...``), whatever else the log says (Lightning
  mentions CUDA on every GPU run); DVC refusing dvc.yaml, params.yaml, a ``-S`` override, its config
  (no remote) or its command line (parse errors, missing params, unknown stage). Waiting fixes none of these.
- Transient: dvc killed by a signal (a negative exit status: a preempted node), even after a user
  error line; a stage killed by one (the OOM killer: "exited with -9"); a stage preempted ("exited
  with 75", EX_TEMPFAIL: femb train saved its checkpoint on SIGTERM / SIGUSR1, and the retry resumes
  it, even after a user error line); DVC's workspace lock held by
  another run, CUDA / NCCL errors,
  memory exhaustion, network and I/O errors, a missing input (the mount that holds `data.source` may
  come back) and any other crash. Retries are few and bounded, so an unknown failure costs minutes,
  while giving up on a recoverable one costs the scheduled run.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import MissingContextError
from prefect.states import Failed, State
from prefect.tasks import exponential_backoff

from femb.errors import FembError

FailureKind = Literal["transient", "permanent"]

USER_ERROR_LINE = re.compile(r"^(?:stage [\w.-]+|femb(?: [\w-]+)?): \S")
DVC_CONFIG_ERROR = re.compile(
    r"failed to parse|' is invalid|not found inside|are missing from|Invalid `--set-param`|Could not override"
    r"|unable to read: '[^']*\.(?:yaml|yml|json|toml)'|not inside of a DVC repository|is not a DVC repository"
    r"|config file error|unrecognized arguments|the following arguments are required|invalid choice"
)
DVC_FOOTER = re.compile(r"^Having any troubles\?")
PREEMPTED_STATUS = 75  # femb.training.preemption.EXIT_PREEMPTED: checkpoint saved, run again to resume
PREEMPTED = re.compile(rf"exited with {PREEMPTED_STATUS}\b")
TAIL_LINES = 200


class DvcError(RuntimeError):
    """A dvc command that failed: the command, its exit status, its last stderr lines and the failure kind."""

    def __init__(self, command: Sequence[str], returncode: int, stderr: Sequence[str]):
        self.command = list(command)
        self.returncode = returncode
        self.stderr = list(stderr)
        self.kind: FailureKind = classify_failure(returncode, self.stderr)
        super().__init__(f"dvc {' '.join(self.command)}: {failure_reason(returncode, self.stderr)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.command, self.returncode, self.stderr)


@dataclass
class DvcResult:
    """What a successful dvc command printed: stdout (all of it when captured, else its tail) and stderr's tail."""

    stdout: list[str]
    stderr: list[str]


def classify_failure(returncode: int, stderr: Sequence[str]) -> FailureKind:
    """Transient (worth a retry) or permanent (a config or user error), by the rule in this module's docstring."""
    if returncode == PREEMPTED_STATUS or any(PREEMPTED.search(line) for line in stderr):
        return "transient"
    user = any(USER_ERROR_LINE.match(line) for line in stderr)
    text = "\n".join(
        line for line in stderr if not USER_ERROR_LINE.match(line)
    )  # a user error may say "CUDA"
    permanent = returncode >= 0 and (user or DVC_CONFIG_ERROR.search(text) is not None)
    return "permanent" if permanent else "transient"


def failure_reason(returncode: int, stderr: Sequence[str]) -> str:
    """One line on why a dvc command failed: a femb user error if printed, else the last error lines."""
    lines = [line.strip() for line in stderr if line.strip() and not DVC_FOOTER.match(line.strip())]
    user = [line for line in lines if USER_ERROR_LINE.match(line)]
    if user:
        return user[-1]
    errors = [line for line in lines if line.startswith("ERROR:")]
    before = lines[: lines.index(errors[0])] if errors else lines
    cause = before[-1:]  # e.g. the last line of a stage's traceback: the exception
    parts = cause + errors[:2]
    return "; ".join(parts) if parts else f"exited with status {returncode} and printed nothing on stderr"


def dvc_env() -> dict[str, str]:
    """The environment for dvc: this Python's bin first on PATH (stages run `python -m stages.<name>`), offline, unbuffered."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        env["PATH"] = bindir + (os.pathsep + path if path else "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")  # stage output reaches the log as it is printed, not at exit
    return env


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task (terminal and UI), a plain logger elsewhere."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


def _stop_group(proc: subprocess.Popen, grace: float = 120.0) -> None:
    """SIGTERM to dvc's process group (a training stage then saves a checkpoint and exits 75), then SIGKILL.

    `proc.terminate()` alone reaches only dvc, which leaves its stage's command running.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def run_dvc(
    args: Sequence[str],
    repo: Path | str = ".",
    capture: bool = False,
) -> DvcResult:
    """Run `dvc <args>` in `repo`, logging each output line as it is printed; raise DvcError on failure.

    `capture` keeps all of stdout (for --json output), which is then not logged line by line.
    """
    logger = run_logger()
    cmd = [sys.executable, "-m", "dvc", *args]
    logger.info("$ dvc %s", " ".join(args))
    proc = subprocess.Popen(
        cmd,
        cwd=repo,
        env=dvc_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,  # universal newlines: a progress bar's \r ends a line too
        errors="replace",
        bufsize=1,
        start_new_session=True,  # its own process group: a cancel reaches the stage dvc runs, too
    )
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()

    def pump(stream: Any, name: str) -> None:
        for line in stream:
            lines.put((name, line.rstrip("\n")))
        lines.put((name, None))

    readers = [
        threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True),
    ]
    stdout: list[str] | deque[str] = [] if capture else deque(maxlen=TAIL_LINES)
    stderr: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        for reader in readers:
            reader.start()
        open_streams = 2
        while open_streams:
            name, line = lines.get()
            if line is None:
                open_streams -= 1
                continue
            (stdout if name == "stdout" else stderr).append(line)
            if line.strip() and not (capture and name == "stdout"):
                logger.info("%s", line)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted or cancelled: stop dvc and the stage it runs
            _stop_group(proc)
        for reader in readers:
            reader.join(timeout=5)
    if returncode != 0:
        error = DvcError(args, returncode, stderr)
        (logger.warning if error.kind == "transient" else logger.error)("%s failure: %s", error.kind, error)
        raise error
    return DvcResult(list(stdout), list(stderr))


def retry_if_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect `retry_condition_fn`: retry a transient DvcError; a permanent one or any other exception is final."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, DvcError) and error.kind == "transient"


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_if_transient)
def dvc_task(args: list[str], repo: str = ".", capture: bool = False) -> DvcResult:
    """One dvc command as a Prefect task: streamed to the run log, retried by `retry_if_transient`."""
    return run_dvc(args, repo, capture=capture)


def with_retries(name: str, retries: int, retry_delay: float) -> Task:
    """`dvc_task` named `name`, retried `retries` times after transient failures, delays `retry_delay` * 2**k s."""
    if retries < 0 or retry_delay < 0:
        raise FembError(f"retries ({retries}) and retry_delay ({retry_delay}) must not be negative")
    return dvc_task.with_options(
        name=name,
        task_run_name=name,
        retries=retries,
        retry_delay_seconds=exponential_backoff(retry_delay)(retries) if retries else 0,
    )


def failed(error: BaseException) -> State:
    """A Failed state carrying `error`: a flow returns it to fail with that one-line message, no traceback logged."""
    return Failed(message=str(error), data=error)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every flow command shares: the workspace, and how transient failures are retried."""
    parser.add_argument("--repo", default=".", help="the DVC workspace (default: .)")
    parser.add_argument(
        "--retries", type=int, default=3, help="retries after a transient failure (default: 3)"
    )
    parser.add_argument(
        "--retry-delay", type=float, default=30.0, help="first retry delay in s, doubling (default: 30)"
    )


def run_main(prog: str, call: Callable[[], Any]) -> int:
    """Run a flow for a `python -m flows.<name>` command: a failure prints one line and exits 1."""
    try:
        call()
    except (FembError, DvcError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    return 0
