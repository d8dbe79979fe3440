"""Preemption: SIGTERM or SIGUSR1 -> a verified checkpoint at the next step boundary -> exit status 75.

SLURM sends SIGTERM when it preempts or cancels a job (`scancel`, and then SIGKILL after KillWait),
and the signal of `--signal=USR1@90` shortly before the time limit; Prefect cancels a run with SIGTERM.
The training process finishes the step it is in, saves `last.ckpt`, and exits with 75 (EX_TEMPFAIL of
sysexits.h: "try again later"), which the flows retry as a transient failure. Under SLURM, SIGUSR1 also
requeues the job with `scontrol requeue`, as Lightning's SLURM auto-requeue does. Lightning's own
handler saves `hpc_ckpt_<n>.ckpt` from inside the signal handler, mid-step and unverified: femb turns it
off (`SLURMEnvironment(auto_requeue=False)`) and saves at the step boundary instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run stopped for an outside reason; the same command resumes it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_PID = "FEMB_LAUNCHER_PID"  # the process Lightning may start the other ranks from (they inherit it)


def mark_launcher() -> None:
    """Record this process as the one Lightning launches the other local ranks from (unless it is one)."""
    if "LOCAL_RANK" not in os.environ:
        os.environ[LAUNCHER_PID] = str(os.getpid())


def _wait_for_launcher(timeout: float = 60.0) -> None:
    """In a rank that Lightning started, wait for rank 0 (its parent) to exit before exiting 75 itself.

    Lightning's child-process watchdog SIGKILLs the launching process as soon as a child exits with a
    non-zero status; letting rank 0 go first keeps its exit status 75. Ranks that torchrun or srun
    started have another parent and do not wait.
    """
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or launcher != str(os.getppid()):
        return
    deadline = time.monotonic() + timeout
    while str(os.getppid()) == launcher and time.monotonic() < deadline:
        time.sleep(0.05)


class Preempted(SystemExit):
    """The run saved its checkpoint and stops on a preemption signal: exit status 75, resume by rerunning."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


def slurm_job_id() -> str | None:
    """The job to requeue: `<array job>_<task>` for an array task, else SLURM_JOB_ID (None outside SLURM)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job: str) -> str:
    """`scontrol requeue <job>` (what Lightning's SLURM auto-requeue runs); a sentence saying how it went."""
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"requeueing SLURM job {job} failed ({exc})"
    if result.returncode != 0:
        return f"requeueing SLURM job {job} failed: {result.stderr.strip() or f'status {result.returncode}'}"
    return f"SLURM job {job} requeued"


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1, save through `save(trainer)` at the next step boundary and raise Preempted.

    The handlers are installed when training starts (replacing Lightning's SIGTERM handler, which would
    stop the run without a checkpoint) and put back when it ends. On several ranks the ranks agree at
    every step end (one all-reduce), so all of them save at the same step whichever got the signal.
    """

    def __init__(self, save: Callable[[L.Trainer], Path], requeue: bool | None = None) -> None:
        self.save = save
        self.requeue = SLURMEnvironment.detect() if requeue is None else requeue
        self.received: int = 0
        self._previous: dict[int, Any] = {}
        self._step: int | None = None  # the optimizer step last checked

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread; nothing to install
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._step:  # mid gradient accumulation: not a step boundary
            return
        self._step = trainer.global_step  # every rank reaches each step once: the reduce below pairs up
        received = self.received
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([received], dtype=torch.int64, device=pl_module.device)
            dist.all_reduce(flag, dist.ReduceOp.MAX)
            received = int(flag.item())
        if not received:
            return
        path = self.save(trainer)
        name = signal.Signals(received).name
        message = f"Preempted by {name} at step {trainer.global_step}: saved {path}"
        if received == signal.SIGUSR1 and self.requeue and trainer.is_global_zero and (job := slurm_job_id()):
            message += f"; {requeue_slurm_job(job)}"
        message += f"; exiting with status {EXIT_PREEMPTED} (run the same command again to resume)"
        rank_zero_info(message)
        if not trainer.is_global_zero:
            _wait_for_launcher()
        raise Preempted(message)


__all__ = ["EXIT_PREEMPTED", "Preempted", "Preemption", "mark_launcher", "requeue_slurm_job", "slurm_job_id"]
