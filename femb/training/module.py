"""The LightningModule: a backbone trained through a margin head (the arcface_torch recipe)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from femb.backbones import create_backbone
from femb.errors import FembError
from femb.headers import build_header
from femb.training.partial_fc import PartialFC, shard_range
from femb.training.schedule import lr_factor

OPTIMIZERS = ("sgd", "adamw")


class FaceRecognitionModule(L.LightningModule):
    """Backbone + margin head, trained with the head's loss on identity labels.

    Defaults follow arcface_torch: SGD, momentum 0.9, weight decay 5e-4 on the backbone and on the
    class centres alike, linear warmup then polynomial decay, stepped per optimizer step.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "iresnet50",
        header: str = "arcface",
        embedding_size: int = 512,
        backbone_kwargs: dict[str, Any] | None = None,
        header_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: str = "poly",
        warmup_steps: int = 0,
        poly_power: float = 2.0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        channels_last: bool = False,
        compile: bool = False,
        partial_fc: bool = False,
        sample_rate: float = 1.0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise FembError(
                f"train.optimizer: '{optimizer}' is not supported; choose one of {', '.join(OPTIMIZERS)}"
            )
        if lr <= 0:
            raise FembError(f"train.lr: must be positive, got {lr}")
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone, num_features=embedding_size, **(backbone_kwargs or {}))
        self.header = build_header(header, embedding_size, num_classes, **(header_kwargs or {}))
        self.partial_fc: PartialFC | None = None
        self._first_bad: Tensor | None = None  # GPU runs: the first step whose loss was not finite
        self._bad_loss: Tensor | None = None
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        if compile:
            self.backbone.compile()  # in place: the state dict keeps the official key names

    def setup(self, stage: str) -> None:
        """With partial FC, keep only this rank's shard of the class centres, outside DDP's gradient sync."""
        hp = self.hparams
        if not hp.partial_fc or self.partial_fc is not None:
            return
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        if world_size > 1:
            start, end = shard_range(hp.num_classes, rank, world_size)
            self.header = build_header(hp.header, hp.embedding_size, end - start, **(hp.header_kwargs or {}))
        self.partial_fc = PartialFC(self.header, hp.num_classes, hp.sample_rate, rank, world_size)
        self._ddp_params_and_buffers_to_ignore = [
            f"header.{name}" for name, _ in [*self.header.named_parameters(), *self.header.named_buffers()]
        ]

    def forward(self, images: Tensor) -> Tensor:
        """Raw (unnormalised) embeddings of normalised RGB images."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        embeddings = self(images)
        if self.partial_fc is not None:
            loss = self.partial_fc.loss(embeddings, labels)
        else:
            loss = self.header.loss(embeddings, labels)
        self._watch_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def _watch_finite(self, loss: Tensor) -> None:
        """Stop on the first non-finite loss, before its update is applied; on a GPU, without a sync per step.

        On the CPU every step is checked at once. On a GPU the first bad step is recorded on the device
        and checked every `log_every_n_steps` steps and before every checkpoint, so no checkpoint ever
        holds the diverged weights.
        """
        if loss.device.type == "cpu":
            if not torch.isfinite(loss):
                raise FembError(self._nonfinite_message(float(loss), self.global_step))
            return
        step = torch.tensor(self.global_step, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, device=loss.device)
            self._bad_loss = torch.zeros((), device=loss.device)
        first = bad & (self._first_bad < 0)
        self._first_bad = torch.where(first, step, self._first_bad)
        self._bad_loss = torch.where(first, loss.detach().float(), self._bad_loss)
        interval = getattr(self.trainer, "log_every_n_steps", 50) if self._trainer is not None else 1
        if self.global_step % max(1, interval) == 0:
            self.check_diverged()

    def check_diverged(self) -> None:
        """Raise the divergence error if any step so far had a non-finite loss (a GPU run defers the check)."""
        if self._first_bad is not None and int(self._first_bad) >= 0:
            raise FembError(self._nonfinite_message(float(self._bad_loss), int(self._first_bad)))

    def _nonfinite_message(self, loss: float, step: int) -> str:
        precision = getattr(self.trainer, "precision", "32-true") if self._trainer is not None else "32-true"
        return (
            f"training diverged: the loss is {loss} at step {step} "
            f"(lr={self.hparams.lr}, precision={precision}); lower train.lr or add warmup, or use "
            "precision 32-true / bf16-mixed instead of 16-mixed; the last good checkpoint is kept"
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the backbone's gradient norm only, as arcface_torch does.

        The class centres stay out: with partial FC each rank holds other centres, and a norm over
        them would scale each replica's backbone gradient differently.
        """
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), gradient_clip_val)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        total_steps = int(total) if math.isfinite(total) else 0
        factor = partial(
            lr_factor,
            total_steps=total_steps,
            warmup_steps=hp.warmup_steps,
            schedule=hp.schedule,
            power=hp.poly_power,
            milestones=tuple(hp.milestones),
            gamma=hp.gamma,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _shard_file(self, step: int) -> Path:
        directory = Path(self.trainer.checkpoint_callback.dirpath or self.trainer.default_root_dir)
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        return directory / "partial_fc" / f"step{step:09d}-rank{rank}-of-{world_size}.pt"

    def _prune_shards(self, current: Path) -> None:
        """Keep this rank's shards of the steps last.ckpt and best.ckpt refer to; 175 MB each for MS1MV2."""
        keep = {self.global_step}
        for callback in self.trainer.callbacks:
            history = getattr(callback, "history", None)
            if history and "val/accuracy" in history[0]:
                keep.add(max(history, key=lambda h: h["val/accuracy"])["step"])
        suffix = current.name.split("-", 1)[1]  # rank<r>-of-<w>.pt
        for path in current.parent.glob(f"step*-{suffix}"):
            if int(path.name[4:13]) not in keep:
                path.unlink(missing_ok=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_diverged()  # never write the weights of a diverged run
        if self.partial_fc is not None and self.trainer.world_size > 1:
            # Each rank holds different class centres: every rank writes its own shard (PartialFC v2 style).
            path = self._shard_file(self.global_step)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(self.header.state_dict(), tmp)
            tmp.replace(path)
            self._prune_shards(path)
            checkpoint["femb_partial_fc"] = {"world_size": self.trainer.world_size, "step": self.global_step}
            for key in [k for k in checkpoint["state_dict"] if k.startswith("header.")]:
                del checkpoint["state_dict"][key]
        # Random margins (ElasticFace) and dropout draw from the global generator; keep it for exact resume.
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["femb_rng"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("num_classes", "embedding_size", "backbone", "header"):
            if key in saved and saved[key] != self.hparams[key]:
                raise FembError(
                    f"checkpoint: {key} is {saved[key]!r} in the checkpoint but {self.hparams[key]!r} in this run; "
                    "train from scratch or use data and params that match the checkpoint"
                )
        shards = checkpoint.get("femb_partial_fc")
        if shards is not None:
            if self._trainer is None or shards["world_size"] != self.trainer.world_size:
                raise FembError(
                    f"this checkpoint's class centres are split over {shards['world_size']} ranks; "
                    "resume it with the same number of devices x nodes"
                )
            path = self._shard_file(shards["step"])
            if not path.exists():
                raise FembError(f"{path}: the partial FC shard of this rank is missing")
            shard = torch.load(path, map_location="cpu", weights_only=True)
            checkpoint["state_dict"].update({f"header.{k}": v for k, v in shard.items()})
        state = checkpoint.get("femb_rng")
        if state is not None:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
