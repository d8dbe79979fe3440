"""Run a training job from validated params: the Trainer, its callbacks, logger, and automatic resume."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import DDPStrategy

from femb.config import Params
from femb.data.layout import data_fingerprint, pair_set_files
from femb.errors import FembError, argument_names
from femb.io import write_json
from femb.training.callbacks import BackboneExport, FreezeBackbone, PeriodicVerification, Throughput
from femb.training.datamodule import ShardDataModule
from femb.training.module import FaceRecognitionModule
from femb.weights import load_backbone_weights

# The loader is resumable through the data module's state, which Lightning's check does not see.
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
# The module's on_after_batch_transfer (uint8 -> normalised images) is meant for the data module's batches.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer` in `LightningModule`.*")

# The library arguments that training errors name, and the params keys they come from.
_TRAIN_KEYS = {name: f"train.{name}" for name in ("lr", "warmup_steps", "num_workers")}


def default_val_sets(shards: Path) -> list[Path]:
    """The pair sets `femb convert` wrote next to the shards (every `<name>.parquet` but the shards)."""
    return pair_set_files(shards)


def _fingerprint(params: Params) -> str:
    """What must not change for a run to be resumed: the data, the model, the head and the optimisation.

    Hardware, logging and evaluation knobs may change (devices and loader workers are checked
    separately when the data position is restored); so may other heads' hyper-parameters. Init
    weights count by their content (sha256), not their path. Fine-tuning keys at their defaults are
    left out, so runs from before they existed keep their fingerprint.
    """
    relevant = params.model_dump(mode="json", include={"backbone", "embedding_size", "header", "train"})
    init = params.train.init_weights
    relevant["train"]["init_weights"] = _init_weights_sha256(init) if init is not None else None
    for key, default in (("init_weights", None), ("freeze_backbone_steps", 0)):
        if relevant["train"][key] == default:
            del relevant["train"][key]
    for key in ("devices", "num_nodes", "accelerator", "strategy", "num_workers", "checkpoint_every"):
        relevant["train"].pop(key, None)
    for key in ("val_every", "val_sets", "out_dir"):
        relevant["train"].pop(key, None)
    relevant["header_hparams"] = params.header_hparams()
    relevant["data"] = data_fingerprint(params.data.shards)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _init_weights_sha256(path: Path) -> str:
    if not path.is_file():
        raise FembError(f"train.init_weights: {path}: no such weights file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def init_backbone(module: FaceRecognitionModule, params: Params) -> None:
    """Start `module`'s backbone from `train.init_weights` (a strict load; the head stays fresh)."""
    try:
        load_backbone_weights(
            module.backbone, params.train.init_weights, params.backbone, params.embedding_size
        )
    except FembError as err:
        raise FembError(f"train.init_weights: {err}") from None


def build_module(params: Params, num_classes: int) -> FaceRecognitionModule:
    """The LightningModule of `params` for a dataset of `num_classes` identities."""
    return FaceRecognitionModule(num_classes, params.model_section(), params.train, params.train.partial_fc)


def _resume_checkpoint(out_dir: Path, fingerprint: str) -> Path | None:
    last = out_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None
    stamp = out_dir / "run.json"
    recorded = json.loads(stamp.read_text()).get("fingerprint") if stamp.exists() else None
    if recorded != fingerprint:
        raise FembError(
            f"{out_dir}: holds a checkpoint of another configuration; delete it or set train.out_dir elsewhere"
        )
    return last


def resuming(params: Params) -> bool:
    """Whether `train(params)` will continue a cut-short run (its out_dir holds a last.ckpt)."""
    return (params.train.out_dir / "checkpoints" / "last.ckpt").exists()


def train(
    params: Params,
    callbacks: Sequence[L.Callback] = (),
    progress: bool | None = None,
    loggers: Sequence[Logger] | None = None,
) -> dict[str, Any]:
    """Train `params.backbone` with the head `params.header` on `params.data.shards`; resume a cut-short run.

    Writes under `train.out_dir`: `checkpoints/last.ckpt` (every `checkpoint_every` steps and at
    the end), `checkpoints/best.ckpt` (by mean verification accuracy), `backbone.pth` (official
    key names) and `summary.json`; metrics go to `loggers` (default: CSV under `logs/`; the DVC
    stage passes DVCLive). Returns the summary on rank 0 and {} on the other ranks.

    Fine-tuning: a fresh run starts its backbone from `train.init_weights` (a resumed one does not:
    the checkpoint holds the weights), and only the head trains for `train.freeze_backbone_steps`.
    """
    t = params.train
    out_dir = t.out_dir
    shards = params.data.shards
    data = ShardDataModule(shards, t.batch_size, t.num_workers, seed=t.seed, shuffle_buffer=t.shuffle_buffer)
    num_classes = data.num_classes
    val_sets = [Path(s) for s in t.val_sets] or default_val_sets(shards)
    fingerprint = _fingerprint(params)
    resume = _resume_checkpoint(out_dir, fingerprint)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "run.json", {"fingerprint": fingerprint, "params": params.model_dump(mode="json")})

    L.seed_everything(t.seed, workers=True, verbose=False)
    module = build_module(params, num_classes)
    if resume is None and t.init_weights is not None:
        init_backbone(module, params)
    verification = PeriodicVerification(val_sets, t.val_every, batch_size=params.evaluate.batch_size)
    throughput = Throughput(t.batch_size)
    checkpoints = out_dir / "checkpoints"
    every = [
        throughput,  # first, so that its step time excludes the verification below
        verification,
        BackboneExport(out_dir / "backbone.pth", params.backbone),
        ModelCheckpoint(
            dirpath=checkpoints, every_n_train_steps=t.checkpoint_every, save_last=True, save_top_k=0
        ),
        *callbacks,
    ]
    if t.freeze_backbone_steps:
        every.insert(0, FreezeBackbone(t.freeze_backbone_steps))
    if val_sets:
        every.append(
            ModelCheckpoint(
                dirpath=checkpoints,
                filename="best",
                monitor="val/accuracy",
                mode="max",
                save_top_k=1,
                every_n_train_steps=t.val_every,
                enable_version_counter=False,
            )
        )
    show = sys.stderr.isatty() if progress is None else progress
    if show:
        every.append(RichProgressBar())
    if loggers is None:
        loggers = [CSVLogger(out_dir, name="logs", version="")]
    strategy = t.strategy
    if t.freeze_backbone_steps and strategy == "ddp":
        strategy = "ddp_find_unused_parameters_true"  # the frozen backbone's parameters get no gradient
    trainer = L.Trainer(
        default_root_dir=out_dir,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        precision=t.precision,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        gradient_clip_val=t.gradient_clip or None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        callbacks=every,
        logger=list(loggers),
        log_every_n_steps=10,
        enable_progress_bar=show,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
        benchmark=True,  # fixed 112x112 inputs: let cuDNN pick the fastest kernels (no effect on CPU)
    )
    if t.freeze_backbone_steps and strategy == "auto" and isinstance(trainer.strategy, DDPStrategy):
        raise FembError(
            "train.freeze_backbone_steps on several devices needs train.strategy=ddp "
            "(which then lets DDP skip the frozen backbone's parameters)"
        )
    started = time.perf_counter()
    with argument_names(_TRAIN_KEYS, anywhere=True):  # the module speaks of its arguments, the user set keys
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    trainer.save_checkpoint(checkpoints / "last.ckpt")  # the end state, whatever step the last save was at
    summary = {
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "seconds": round(time.perf_counter() - started, 2),
        "images_per_sec": round(throughput.mean_images_per_sec, 1),
        "resumed_from": str(resume) if resume else None,
        "num_classes": num_classes,
        "backbone": params.backbone,
        "header": params.header,
        "val": verification.history[-1] if verification.history else {},
        "best_val_accuracy": max((h["val/accuracy"] for h in verification.history), default=None),
    }
    if not trainer.is_global_zero:
        return {}
    write_json(out_dir / "summary.json", summary)
    return summary


__all__ = ["build_module", "default_val_sets", "init_backbone", "resuming", "train"]
