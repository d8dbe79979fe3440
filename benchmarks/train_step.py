"""Lightning's training step against a plain PyTorch loop doing the same work, on CPU; prints JSON.

    python benchmarks/train_step.py                              # iresnet_tiny + arcface, batch 64, 1 thread
    python benchmarks/train_step.py --backbone r18 --batch-size 32 --precision bf16-mixed --rounds 3
    python benchmarks/train_step.py --breakdown                  # also Lightning without each per-step extra

Both sides train the same backbone and head (deep copies of one FaceRecognitionModule), on the same
pre-built in-memory batches (--uint8: pixels, normalised each step by the module's prepare_batch), with
the optimizer and LR schedule of femb.training.optim.build_optimizer (SGD, momentum 0.9, weight decay
5e-4) stepped per step, norm gradient clipping as `femb train` sets it (train.gradient_clip, 5.0) and the
same precision. Lightning runs FaceRecognitionModule under a Trainer with no logger, checkpointing,
progress bar or model summary; the plain loop is forward, loss, zero_grad, backward, clip, step,
scheduler step. Each round runs both, in alternating order, as a fresh Trainer / optimizer: the
first --warmup steps are left out and the time runs from the end of the last warm-up step to the
end of the last step, on the wall clock and on this process's CPU clock (which other processes
on a shared machine disturb far less; with one torch thread, `cpu_share` = CPU / wall seconds shows
how much of a core the run got). Rates are medians over rounds; `ratio` is the median of the
per-round ratios lightning/plain on the wall clock (paired, so load from other processes hits both
alike), `ratio_cpu_time` the same on the CPU clock. Target: >= 0.95.
With --breakdown, two more Lightning runs join the rounds: `lightning_bare`, a module whose
training_step returns the loss alone (no isfinite check, no self.log), so what is left is the cost
of Lightning's loop itself; and `lightning_timed`, the module's training_step with each extra (the
isfinite check, self.log of the loss, self.log of the lr via self.optimizers()) timed on its own.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial
from itertools import chain
from typing import Any

import lightning as L
import torch
from torch import Tensor

from femb.config import ModelParams, OptimParams
from femb.data.synth import DEFAULT_IDENTITIES
from femb.training.module import FaceRecognitionModule, input_dtype, prepare_batch
from femb.training.optim import build_optimizer

Batch = tuple[Tensor, Tensor]
PRECISIONS = ("32-true", "bf16-mixed")


class Batches:
    """`length` batches drawn in turn from a small pool of tensors: no copies, no workers, no collation."""

    def __init__(self, pool: list[Batch], length: int) -> None:
        self.pool = pool
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.length):
            yield self.pool[i % len(self.pool)]


def make_pool(
    size: int, batch_size: int, num_classes: int, image_size: int, seed: int, uint8: bool = False
) -> list[Batch]:
    """Distinct random batches of normalised-looking float images (or uint8 pixels, as the loader gives) and labels."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, image_size, image_size)
    return [
        (
            torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
            if uint8
            else torch.randn(shape, generator=generator).clamp_(-1, 1),
            torch.randint(0, num_classes, (batch_size,), generator=generator),
        )
        for _ in range(size)
    ]


def _now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    return time.perf_counter(), time.process_time()


def _window(ends: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Wall and CPU seconds from the end of the last warm-up step to the end of the last step."""
    return ends[-1][0] - ends[warmup - 1][0], ends[-1][1] - ends[warmup - 1][1]


class StepClock(L.Callback):
    """Wall and CPU clocks at the end of every training batch (after the optimizer and scheduler step)."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(_now())


class _Bare(FaceRecognitionModule):
    """FaceRecognitionModule whose training_step is the loss alone: no isfinite check, no self.log."""

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, labels = batch
        return self.header.loss(self(images), labels)


class _Timed(FaceRecognitionModule):
    """FaceRecognitionModule.training_step (no partial FC) with each per-step extra timed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_seconds: dict[str, list[float]] = {"isfinite_check": [], "log_loss": [], "log_lr": []}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, labels = batch
        loss = self.header.loss(self(images), labels)
        t0 = time.perf_counter()
        if not torch.isfinite(loss):
            raise RuntimeError(self._nonfinite_message(float(loss), self.global_step))
        t1 = time.perf_counter()
        self.log("train/loss", loss, prog_bar=True)
        t2 = time.perf_counter()
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        t3 = time.perf_counter()
        for name, seconds in zip(self.extra_seconds, (t1 - t0, t2 - t1, t3 - t2)):
            self.extra_seconds[name].append(seconds)
        return loss


def build_module(
    args: argparse.Namespace, kind: type[FaceRecognitionModule] = FaceRecognitionModule
) -> FaceRecognitionModule:
    """The module under test, seeded, so that every kind starts from the same weights."""
    torch.manual_seed(args.seed)
    model = ModelParams(backbone=args.backbone, embedding_size=args.embedding_size, head=args.header)
    return kind(args.num_classes, model, OptimParams(lr=args.lr, warmup_steps=args.lr_warmup))


def lightning_round(
    module: FaceRecognitionModule, pool: list[Batch], args: argparse.Namespace
) -> tuple[float, float]:
    """Wall and CPU seconds for the measured steps of one fresh Trainer.fit (warm-up steps excluded)."""
    clock = StepClock()
    total = args.warmup + args.steps
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total,
        precision=args.precision,
        gradient_clip_val=args.gradient_clip or None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=args.log_every_n_steps,
        callbacks=[clock],
        deterministic=False,
    )
    trainer.fit(module, train_dataloaders=Batches(pool, total))
    if len(clock.ends) != total:
        raise RuntimeError(f"Lightning ran {len(clock.ends)} steps, expected {total}")
    return _window(clock.ends, args.warmup)


class PlainLoop:
    """The same training step without Lightning: a backbone and head copied from the module."""

    def __init__(self, module: FaceRecognitionModule, args: argparse.Namespace) -> None:
        self.backbone = copy.deepcopy(module.backbone)
        self.header = copy.deepcopy(module.header)
        self.optim = module.optim
        self.args = args

    def round(self, pool: list[Batch]) -> tuple[float, float]:
        """Wall and CPU seconds for the measured steps of a fresh optimizer and schedule (warm-up steps excluded)."""
        args = self.args
        total = args.warmup + args.steps
        params = [p for p in chain(self.backbone.parameters(), self.header.parameters()) if p.requires_grad]
        optimizer, scheduler = build_optimizer(params, self.optim, total)
        dtype = input_dtype(self.backbone)
        autocast: Callable[[], Any] = (
            partial(torch.autocast, "cpu", dtype=torch.bfloat16)
            if args.precision == "bf16-mixed"
            else nullcontext
        )
        self.backbone.train()
        self.header.train()
        ends = []
        for batch in Batches(pool, total):
            images, labels = prepare_batch(batch, dtype)  # as FaceRecognitionModule.on_after_batch_transfer
            with autocast():
                loss = self.header.loss(self.backbone(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.gradient_clip:
                torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), args.gradient_clip)  # as femb
            optimizer.step()
            scheduler.step()
            ends.append(_now())
        return _window(ends, args.warmup)


def measure(
    runs: dict[str, Callable[[], tuple[float, float]]], rounds: int, images: int
) -> dict[str, dict[str, list[float]]]:
    """Images per wall second and per CPU second of each run, round by round, the order rotated each round."""
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall_s, cpu_s = runs[name]()
            wall[name].append(images / wall_s)
            cpu[name].append(images / cpu_s)
            print(
                f"round {r + 1}/{rounds} {name}: {images / wall_s:.1f} images/s, "
                f"{images / cpu_s:.1f} images/CPU-s",
                file=sys.stderr,
            )
    return {"wall": wall, "cpu": cpu}


def _summary(rates: dict[str, list[float]], batch_size: int, unit: str) -> dict[str, Any]:
    """Median rates, ms per step, and each Lightning run's ratio to the plain loop (paired by round)."""
    medians = {name: statistics.median(values) for name, values in rates.items()}
    step_ms = {name: 1000 * batch_size / rate for name, rate in medians.items()}
    ratios = {}
    for name in rates:
        if name != "plain":
            paired = [a / b for a, b in zip(rates[name], rates["plain"])]
            ratios[name] = {
                "median_of_round_ratios": round(statistics.median(paired), 4),
                "ratio_of_medians": round(medians[name] / medians["plain"], 4),
                "min": round(min(paired), 4),
                "max": round(max(paired), 4),
            }
    return {
        "ratio": ratios["lightning"]["median_of_round_ratios"],
        unit: {name: round(value, 1) for name, value in medians.items()},
        "ms_per_step": {name: round(value, 2) for name, value in step_ms.items()},
        "overhead_ms_per_step": {
            name: round(step_ms[name] - step_ms["plain"], 2) for name in rates if name != "plain"
        },
        "ratios": ratios,
        "per_round": {name: [round(v, 1) for v in values] for name, values in rates.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbone", default="iresnet_tiny", help="backbone name or alias (r18, r50, mbf, ...)"
    )
    parser.add_argument("--header", default="arcface", help="margin head (arcface, cosface, magface, ...)")
    parser.add_argument("--num-classes", type=int, default=DEFAULT_IDENTITIES, help="identities (demo: 400)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="steps per round left out of the timing")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each side, interleaved")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument("--gradient-clip", type=float, default=5.0, help="clip-by-norm value; 0 disables")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--lr-warmup", type=int, default=0, help="LR warmup steps of the schedule")
    parser.add_argument("--log-every-n-steps", type=int, default=10, help="Trainer's (femb train uses 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--pool", type=int, default=4, help="distinct batches, used in turn")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--uint8", action="store_true", help="uint8 image batches, normalised per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true", help="also time Lightning without each extra")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="lightning")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    load_before = os.getloadavg()
    pool = make_pool(args.pool, args.batch_size, args.num_classes, args.image_size, args.seed, args.uint8)
    module = build_module(args)
    plain = PlainLoop(module, args)
    runs: dict[str, Callable[[], tuple[float, float]]] = {
        "lightning": partial(lightning_round, module, pool, args),
        "plain": partial(plain.round, pool),
    }
    timed = build_module(args, _Timed) if args.breakdown else None
    if timed is not None:
        runs["lightning_bare"] = partial(lightning_round, build_module(args, _Bare), pool, args)
        runs["lightning_timed"] = partial(lightning_round, timed, pool, args)
    images = args.steps * args.batch_size
    started = time.perf_counter()
    measured = measure(runs, args.rounds, images)
    summary = {
        "wall": _summary(measured["wall"], args.batch_size, "images_per_sec"),
        "cpu": _summary(measured["cpu"], args.batch_size, "images_per_cpu_sec"),
    }
    share = {
        name: round(
            statistics.median(c / w for c, w in zip(measured["wall"][name], measured["cpu"][name])), 3
        )
        for name in runs
    }
    wall_ratio, cpu_ratio = summary["wall"]["ratio"], summary["cpu"]["ratio"]
    result: dict[str, Any] = {
        "benchmark": "train_step",
        "backbone": args.backbone,
        "header": args.header,
        "num_classes": args.num_classes,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "uint8_batches": args.uint8,
        "gradient_clip": args.gradient_clip,
        "steps_per_round": args.steps,
        "warmup_steps_per_round": args.warmup,
        "rounds": args.rounds,
        "ratio": wall_ratio,
        "ratio_cpu_time": cpu_ratio,
        "target": 0.95,
        "target_met": wall_ratio >= 0.95,
        "target_met_cpu_time": cpu_ratio >= 0.95,
        "wall": summary["wall"],
        "cpu_time": summary["cpu"],
        "cpu_share": share,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
    }
    if timed is not None:
        extras = {name: 1000 * statistics.median(values) for name, values in timed.extra_seconds.items()}
        result["training_step_extras_ms"] = {name: round(value, 3) for name, value in extras.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
