"""The LightningModule: a backbone trained through a margin head (the arcface_torch recipe)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from femb.backbones import create_backbone
from femb.config import ModelParams, OptimParams, PartialFCParams, as_section
from femb.data.decode import normalize
from femb.errors import FembError
from femb.headers import MarginHead, build_header
from femb.io import atomic_path
from femb.training.optim import build_optimizer
from femb.training.partial_fc import PartialFC, shard_range

Batch = tuple[Tensor, Tensor]
MATCHING = ("embedding_size", "backbone", "head")  # model keys a checkpoint must share with the run


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model takes its images in: that of its first floating parameter (float32 if none).

    Under a "-true" precision Lightning casts the parameters (64-true: float64, bf16-true: bfloat16,
    16-true: float16); under "-mixed" and "32-true" they stay float32 and autocast does the rest.
    """
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def prepare_batch(batch: Batch, dtype: torch.dtype) -> Batch:
    """Images as the model takes them: uint8 N x 3 x H x W normalised into `dtype`, float images as they come."""
    images, labels = batch
    if images.dtype == torch.uint8:
        images = normalize(images, dtype)
    return images, labels


class FaceRecognitionModule(L.LightningModule):
    """Backbone + margin head, trained with the head's loss on identity labels.

    Built from validated config sections: `model` (backbone, embedding size, head and its
    hyper-parameters, backbone options), `optim` (optimizer and LR schedule) and `partial_fc`; they
    are saved as plain dicts in the checkpoint's hyper-parameters, which `load_from_checkpoint` reads
    back. Defaults follow arcface_torch: SGD, momentum 0.9, weight decay 5e-4 on the backbone and on
    the class centres alike, linear warmup then polynomial decay, stepped per optimizer step.
    With partial FC the head is built in `setup`, once, at this rank's shard of the classes.
    What a checkpoint holds: docs/architecture.md "Checkpoints".
    """

    def __init__(
        self,
        num_classes: int,
        model: ModelParams | Mapping[str, Any],
        optim: OptimParams | Mapping[str, Any] | None = None,
        partial_fc: PartialFCParams | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model_params = as_section(ModelParams, model)
        self.optim = as_section(OptimParams, optim or {})
        self.partial_fc_params = as_section(PartialFCParams, partial_fc or {})
        self.num_classes = num_classes
        self.save_hyperparameters(
            {
                "num_classes": num_classes,
                "model": self.model_params.model_dump(mode="json"),
                "optim": self.optim.model_dump(mode="json"),
                "partial_fc": self.partial_fc_params.model_dump(mode="json"),
            }
        )
        m = self.model_params
        self.backbone = create_backbone(m.backbone, num_features=m.embedding_size, **m.backbone_kwargs())
        if m.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        if m.compile:
            self.backbone.compile()  # in place: the state dict keeps the official key names
        self.header: MarginHead | None = None
        self.partial_fc: PartialFC | None = None
        if not self.partial_fc_params.enabled:
            self.header = self._build_head(num_classes)
        self._first_bad: Tensor | None = None  # GPU runs: the first step whose loss was not finite
        self._bad_loss: Tensor | None = None

    def _build_head(self, num_classes: int) -> MarginHead:
        m = self.model_params
        return build_header(m.head, m.embedding_size, num_classes, **m.head_hparams)

    def build_partial_fc(self, rank: int = 0, world_size: int = 1) -> None:
        """Build this rank's shard of the head and its partial FC loss, kept outside DDP's gradient sync."""
        start, end = shard_range(self.num_classes, rank, world_size)
        self.header = self._build_head(end - start)
        self.partial_fc = PartialFC(
            self.header, self.num_classes, self.partial_fc_params.sample_rate, rank, world_size
        )
        self._ddp_params_and_buffers_to_ignore = [
            f"header.{name}" for name, _ in [*self.header.named_parameters(), *self.header.named_buffers()]
        ]

    def setup(self, stage: str) -> None:
        """With partial FC, build the head now that the rank and world size are known (before DDP wraps it)."""
        if self.partial_fc_params.enabled and self.partial_fc is None:
            self.build_partial_fc(self.trainer.global_rank, self.trainer.world_size)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Normalise uint8 images on the device, into the dtype the backbone takes; float images pass through."""
        return prepare_batch(batch, input_dtype(self.backbone))

    def forward(self, images: Tensor) -> Tensor:
        """Raw (unnormalised) embeddings of normalised RGB images."""
        if self.model_params.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The head's training loss (through partial FC when enabled)."""
        if self.partial_fc is not None:
            return self.partial_fc.loss(embeddings, labels)
        return self.header.loss(embeddings, labels)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, labels = batch
        loss = self.loss(self(images), labels)
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
            f"(lr={self.optim.lr}, precision={precision}); lower lr or add warmup_steps, or use "
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
        total = self.trainer.estimated_stepping_batches
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer, scheduler = build_optimizer(params, self.optim, int(total) if math.isfinite(total) else 0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
        """Write this rank's partial FC shard beside the checkpoint (multi-rank) and the RNG state into it."""
        self.check_diverged()  # never write the weights of a diverged run
        if self.partial_fc is not None and self.trainer.world_size > 1:
            # Each rank holds different class centres: every rank writes its own shard (PartialFC v2 style).
            path = self._shard_file(self.global_step)
            with atomic_path(path) as tmp:
                torch.save(self.header.state_dict(), tmp)
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
        """Refuse another run's checkpoint; put this rank's partial FC shard back; restore the RNG."""
        saved = checkpoint.get("hyper_parameters", {})
        model = saved.get("model", {})
        recorded = {"num_classes": saved.get("num_classes"), **{k: model.get(k) for k in MATCHING}}
        current = {"num_classes": self.num_classes, **{k: getattr(self.model_params, k) for k in MATCHING}}
        for key, value in recorded.items():
            if value is not None and value != current[key]:
                raise FembError(
                    f"checkpoint: {key} is {value!r} in the checkpoint but {current[key]!r} in this run; "
                    "train from scratch or use data and params that match the checkpoint"
                )
        shards = checkpoint.get("femb_partial_fc")
        if shards is None and self.partial_fc_params.enabled and self.partial_fc is None:
            self.build_partial_fc()  # load_from_checkpoint of a one-process run: the whole head
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
