"""Training callbacks: periodic verification, throughput, the exported backbone, a frozen backbone, rewinds."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from femb.errors import FembError
from femb.evaluation.pairsets import load_pair_set, verify_pair_set
from femb.weights import save_backbone


class PeriodicVerification(L.Callback):
    """Every `every_n_steps` optimizer steps and at the last one, run the InsightFace protocol on each set.

    Logs `val/<set>/accuracy`, `.../tar_at_far_1e-03` (and the other FARs), `.../xnorm`, and
    `val/accuracy`, the mean over sets, which the best checkpoint is chosen by. Rank 0 evaluates and
    broadcasts the numbers so every rank logs the same values.
    """

    def __init__(self, sets: Sequence[Path | str], every_n_steps: int, batch_size: int = 128) -> None:
        self.sets = [Path(s) for s in sets]
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.history: list[dict[str, Any]] = []
        self._last_step = -1

    def _is_last_step(self, trainer: L.Trainer) -> bool:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        last_epoch = max_epochs > 0 and trainer.current_epoch >= max_epochs - 1
        return bool(last_epoch and trainer.is_last_batch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not self.sets or step == self._last_step or step == 0:
            return
        if step % self.every_n_steps and not self._is_last_step(trainer):
            return
        self._last_step = step
        pl_module.check_diverged()  # a diverged GPU run: say so, not "embeddings contain NaN"
        metrics = self.evaluate(pl_module) if trainer.is_global_zero else {}
        metrics = trainer.strategy.broadcast(metrics, src=0)
        for key, value in metrics.items():  # for ModelCheckpoint(monitor=...) and the progress bar
            pl_module.log(
                key, value, on_step=True, on_epoch=False, logger=False, prog_bar=key == "val/accuracy"
            )
        for logger in trainer.loggers:  # now, not at the next logging interval (it may never come)
            logger.log_metrics(metrics, step=step)
        self.history.append({"step": step, **metrics})

    def evaluate(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Flat metrics of every set (and their mean accuracy) for the current backbone."""
        metrics: dict[str, float] = {}
        accuracies = []
        for path in self.sets:
            pair_set = load_pair_set(path, progress=False)
            result = verify_pair_set(pl_module.backbone, pair_set, batch_size=self.batch_size, progress=False)
            prefix = f"val/{pair_set.name}"
            metrics[f"{prefix}/accuracy"] = result["accuracy"]
            for far, tar in result["tar_at_far"].items():
                metrics[f"{prefix}/tar_at_far_{far}"] = tar
            metrics[f"{prefix}/xnorm"] = result["xnorm"]
            accuracies.append(result["accuracy"])
        metrics["val/accuracy"] = float(sum(accuracies) / len(accuracies))
        return metrics


class Throughput(L.Callback):
    """Logs `train/images_per_sec`: images of the global batch over the wall time of each step."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._start = 0.0
        self.images = 0
        self.seconds = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        elapsed = time.perf_counter() - self._start
        images = self.batch_size * trainer.world_size
        self.images += images
        self.seconds += elapsed
        if elapsed > 0:
            pl_module.log("train/images_per_sec", images / elapsed, on_step=True, on_epoch=False)

    @property
    def mean_images_per_sec(self) -> float:
        """Images per second over every step so far (data loading between steps excluded)."""
        return self.images / self.seconds if self.seconds else math.nan


class BackboneExport(L.Callback):
    """At the end of training, rank 0 writes `backbone.pth`: a plain state dict with official key names."""

    def __init__(self, path: Path | str, backbone: str) -> None:
        self.path = Path(path)
        self.backbone = backbone

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.check_diverged()  # never export the weights of a diverged run
        if trainer.is_global_zero:
            with torch.no_grad():
                save_backbone(pl_module.backbone, self.path, self.backbone, plain=True)


class FreezeBackbone(L.Callback):
    """Train only the head for the first `steps` optimizer steps, then the whole model (fine-tuning).

    While frozen, the backbone's parameters do not require grad: they get no gradient at all (None),
    which SGD and AdamW skip, so weight decay and momentum do not move them either and they stay
    bitwise unchanged. The backbone is also in eval mode, so its BatchNorm running statistics (and
    dropout) are frozen too. The state follows `trainer.global_step` at the start of every batch, so a
    run resumed mid-freeze keeps freezing up to the same step. Under DDP the frozen parameters are
    unused: the strategy must find unused parameters (`ddp_find_unused_parameters_true`).
    """

    def __init__(self, steps: int) -> None:
        if steps < 0:
            raise FembError(f"steps must be at least 0, not {steps}")
        self.steps = steps

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        frozen = trainer.global_step < self.steps
        backbone = pl_module.backbone
        for p in backbone.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            backbone.eval()  # again every batch: Lightning and the verification set modes in between
        elif not backbone.training and pl_module.training:
            backbone.train()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for p in pl_module.backbone.parameters():  # a run shorter than the freeze leaves a trainable model
            p.requires_grad_(True)


class Rewinds(L.Callback):
    """Counts divergence rewinds and scales the LR schedule by the factors of the rewinds so far.

    Its state (count, and the LR scale the checkpoint's scheduler was saved with) is checkpointed, so
    `max_rewinds` and the lowered LR hold across restarts. `lower_lr(factor)` before a rewound fit
    scales the schedule's base LRs when training starts again, relative to the checkpoint it starts
    from: two rewinds to the same checkpoint with factor 0.5 leave a quarter of the LR.
    """

    def __init__(self) -> None:
        self.count = 0
        self.scale = 1.0  # the LR multiplier the run trains with now
        self._restored_scale = 1.0  # the one the restored scheduler's base LRs hold

    def lower_lr(self, factor: float) -> None:
        """Count one more rewind and multiply the LR by `factor` from the rewound fit's start."""
        self.count += 1
        self.scale *= factor

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "scale": self.scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        count, scale = int(state_dict.get("count", 0)), float(state_dict.get("scale", 1.0))
        self._restored_scale = scale
        if self.count <= count:  # a restart: the checkpoint knows best; else a rewind to an older one
            self.count, self.scale = count, scale

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        factor, self._restored_scale = self.scale / self._restored_scale, self.scale
        if factor == 1.0:
            return
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
            lambdas = getattr(scheduler, "lr_lambdas", None)
            groups = scheduler.optimizer.param_groups
            for i, (group, base) in enumerate(zip(groups, scheduler.base_lrs)):
                group["initial_lr"] = base
                # LambdaLR sets lr = base * lambda(step) at each step; set the current step's the same way.
                group["lr"] = base * lambdas[i](scheduler.last_epoch) if lambdas else group["lr"] * factor
            scheduler._last_lr = [group["lr"] for group in groups]
