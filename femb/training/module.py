"""The LightningModule: a backbone trained through a margin head (the arcface_torch recipe)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from femb.backbones import create_backbone
from femb.config import ModelParams, OptimParams, PartialFCParams, as_section
from femb.data.decode import normalize
from femb.errors import FembError
from femb.headers import MarginHead, build_header
from femb.training.checkpoints import SHARD_DIR, save_verified
from femb.training.optim import build_optimizer, no_weight_decay_names
from femb.training.partial_fc import PartialFC, optimizer_indices, shard_range, take_rows

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


class Diverged(FembError):
    """The loss was not finite at optimizer step `step` (on some rank); no checkpoint holds what followed."""

    def __init__(self, loss: float, step: int, describe: Callable[[float, int], str]) -> None:
        super().__init__(describe(loss, step))
        self.loss, self.step = loss, step


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
        self.checkpoint_dir: Path | None = (
            None  # where partial FC shards go (default: the checkpoint callback's)
        )
        self._header_optimizer_state: dict[str, dict[str, Any]] | None = None  # applied in on_train_start

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
        holds the diverged weights. On several ranks the check is collective: every rank stops at the
        same step, whichever rank's loss went bad.
        """
        if loss.device.type == "cpu":
            value = float(loss.detach())
            bad = not math.isfinite(value)
            if self._distributed():  # another rank's bad loss: report it as nan
                flag = torch.tensor([float(bad)])
                dist.all_reduce(flag, dist.ReduceOp.MAX)
                bad, value = bool(flag[0]), value if bad else float("nan")
            if bad:
                raise Diverged(value, self.global_step, self._nonfinite_message)
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

    def _distributed(self) -> bool:
        return (
            self._trainer is not None
            and self.trainer.world_size > 1
            and dist.is_available()
            and dist.is_initialized()
        )

    def check_diverged(self) -> None:
        """Raise Diverged if any step so far had a non-finite loss on any rank (a GPU run defers the check)."""
        if self._first_bad is None:
            return
        first, loss = self._first_bad, self._bad_loss
        if self._distributed():  # the earliest bad step of any rank, on every rank
            never = torch.iinfo(torch.int64).max
            earliest = torch.where(first < 0, torch.full_like(first, never), first).to(torch.int64)
            dist.all_reduce(earliest, dist.ReduceOp.MIN)
            first = torch.where(earliest == never, torch.full_like(earliest, -1), earliest)
        if int(first) >= 0:
            value = float(loss) if int(self._first_bad) == int(first) else float("nan")  # another rank's
            raise Diverged(value, int(first), self._nonfinite_message)

    def _nonfinite_message(self, loss: float, step: int) -> str:
        precision = getattr(self.trainer, "precision", "32-true") if self._trainer is not None else "32-true"
        return (
            f"training diverged: the loss is {loss} at step {step} "
            f"(lr={self.optim.lr}, precision={precision}); lower lr or add warmup_steps, or use "
            "precision 32-true / bf16-mixed instead of 16-mixed, or set on_divergence=rewind; "
            "the last good checkpoint is kept"
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
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        steps = int(total) if math.isfinite(total) else 0
        optimizer, scheduler = build_optimizer(params, self.optim, steps, no_weight_decay_names(self))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _shard_dir(self) -> Path:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir) / SHARD_DIR
        return Path(self.trainer.checkpoint_callback.dirpath or self.trainer.default_root_dir) / SHARD_DIR

    @staticmethod
    def _shard_name(step: int, rank: int, world_size: int) -> str:
        return f"step{step:09d}-rank{rank}-of-{world_size}.pt"

    def _header_indices(self) -> dict[str, int]:
        """Where the head's parameters sit in the optimizer's saved state (none without an optimizer)."""
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if not optimizers:
            return {}
        return optimizer_indices(
            [(f"header.{n}", p) for n, p in self.header.named_parameters()], optimizers[0]
        )

    def _save_partial_fc(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Partial FC's part of a checkpoint: on several ranks, each rank's centres and momentum in its own shard.

        One process keeps the whole head in the checkpoint (its optimizer state where Lightning puts
        it); on several, the head and its optimizer state leave the checkpoint and every rank writes
        `partial_fc/step<9 digits>-rank<r>-of-<w>.pt` atomically (175 MB of centres for MS1MV2, and as much
        momentum), its sha256 gathered into the checkpoint's record.
        """
        trainer = self.trainer
        world_size, rank, step = trainer.world_size, trainer.global_rank, self.global_step
        indices = self._header_indices()
        meta: dict[str, Any] = {
            "num_classes": self.num_classes,
            "world_size": world_size,
            "step": step,
            "optimizer_index": indices,
            "files": {},
        }
        if world_size == 1:
            return meta
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        start, end = shard_range(self.num_classes, rank, world_size)
        shard = {
            "classes": [start, end],
            "header": {k: v.detach() for k, v in self.header.state_dict().items()},
            "optimizer": {
                name: dict(optimizer.state[p])
                for name, p in self.header.named_parameters()
                if optimizer is not None and p in optimizer.state
            },
        }
        path = self._shard_dir() / self._shard_name(step, rank, world_size)
        digest = save_verified(shard, path)["sha256"]
        files: list[Any] = [None] * world_size
        dist.all_gather_object(files, (path.name, digest))
        meta["files"] = dict(files)
        for key in [k for k in checkpoint["state_dict"] if k.startswith("header.")]:
            del checkpoint["state_dict"][key]
        for states in checkpoint.get("optimizer_states") or []:  # rank 0's: its own centres' momentum
            for index in indices.values():
                states.get("state", {}).pop(index, None)
        return meta

    def _restore_partial_fc(self, checkpoint: dict[str, Any], meta: Mapping[str, Any]) -> None:
        """Put this rank's classes of the saved head (and their optimizer state) back, from any world size.

        The centres and momentum of classes `shard_range(C, rank, world_size)` are cut from the saved
        shards (or the one-process checkpoint's whole head), bit for bit, so a run saved on 8 GPUs
        resumes on 4 or 1, and back. The optimizer state is applied in `on_train_start`, after
        Lightning has restored the rest of the optimizer.
        """
        attached = self._trainer is not None
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if attached else (0, 1)
        saved_world = int(meta["world_size"])
        if saved_world == world_size == 1:
            return
        num_classes = int(meta.get("num_classes", self.num_classes))
        indices = dict(meta.get("optimizer_index") or {})
        states = checkpoint.get("optimizer_states") or []
        if saved_world == 1:
            header = {
                k[len("header.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("header.")
            }
            saved_state = states[0].get("state", {}) if states else {}
            optim = {n[len("header.") :]: saved_state[i] for n, i in indices.items() if i in saved_state}
            blocks = [(0, num_classes, {"header": header, "optimizer": optim})]
        else:
            if not attached:
                raise FembError(
                    f"this checkpoint's class centres are in partial FC shards of {saved_world} ranks beside it; "
                    "resume it with `femb train` (any number of devices)"
                )
            start, end = shard_range(num_classes, rank, world_size)
            blocks = []
            for r in range(saved_world):
                lo, hi = shard_range(num_classes, r, saved_world)
                if hi <= start or lo >= end:
                    continue
                path = self._shard_dir() / self._shard_name(int(meta["step"]), r, saved_world)
                if not path.is_file():
                    raise FembError(f"{path}: a partial FC shard of this checkpoint is missing")
                blocks.append((lo, hi, torch.load(path, map_location="cpu", weights_only=True)))
        start, end = shard_range(num_classes, rank, world_size)
        header = take_rows([(lo, hi, b["header"]) for lo, hi, b in blocks], start, end)
        for key in [k for k in checkpoint["state_dict"] if k.startswith("header.")]:
            del checkpoint["state_dict"][key]
        checkpoint["state_dict"].update({f"header.{k}": v for k, v in header.items()})
        names = sorted({name for _, _, b in blocks for name in b["optimizer"]})
        self._header_optimizer_state = {
            name: take_rows(
                [(lo, hi, b["optimizer"][name]) for lo, hi, b in blocks if name in b["optimizer"]], start, end
            )
            for name in names
        }
        for saved in states:  # Lightning restores the rest; the head's part is applied in on_train_start
            for index in indices.values():
                saved.get("state", {}).pop(index, None)

    def on_train_start(self) -> None:
        """Apply the head's re-partitioned optimizer state (momentum), now that Lightning has restored the rest."""
        pending, self._header_optimizer_state = self._header_optimizer_state, None
        if not pending or not self.trainer.optimizers:
            return
        optimizer = self.trainer.optimizers[0]
        for name, param in self.header.named_parameters():
            if name in pending:
                optimizer.state[param] = {
                    key: value.to(param.device)
                    if isinstance(value, Tensor) and value.shape == param.shape
                    else value
                    for key, value in pending[name].items()
                }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Partial FC's shards and metadata, and the RNG state, into the checkpoint (never a diverged one)."""
        self.check_diverged()  # never write the weights of a diverged run
        if self.partial_fc is not None:
            checkpoint["femb_partial_fc"] = self._save_partial_fc(checkpoint)
        # Random margins (ElasticFace) and dropout draw from the global generator; keep it for exact resume.
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["femb_rng"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another model's checkpoint; put this rank's partial FC classes back; restore the RNG."""
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
        if self.partial_fc_params.enabled and self.partial_fc is None:
            self.build_partial_fc()  # load_from_checkpoint: the whole head, as one process trains it
        meta = checkpoint.get("femb_partial_fc")
        if self.partial_fc is not None and meta is not None:
            self._restore_partial_fc(checkpoint, meta)
        state = checkpoint.get("femb_rng")
        if state is not None:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
