"""Run a training job from validated params: the Trainer, its callbacks, logger, and automatic resume."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from femb.config import Params
from femb.data.layout import data_fingerprint, pair_set_files
from femb.errors import FembError, argument_names
from femb.io import remove_temps, write_json
from femb.training.callbacks import BackboneExport, FreezeBackbone, PeriodicVerification, Rewinds, Throughput
from femb.training.checkpoints import (
    LAST,
    SHARD_DIR,
    Checkpoint,
    CheckpointDamaged,
    OtherRunCheckpoint,
    RunRecord,
    VerifiedCheckpointIO,
    cached_sha256,
    choose_resume,
    read_record,
    remove_run,
)
from femb.training.datamodule import LoaderPosition, ShardDataModule
from femb.training.module import Diverged, FaceRecognitionModule
from femb.training.preemption import EXIT_PREEMPTED, Preempted, Preemption, mark_launcher
from femb.training.preflight import preflight
from femb.weights import load_backbone_weights

# The loader is resumable through the data module's state, which Lightning's check does not see.
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
# The module's on_after_batch_transfer (uint8 -> normalised images) is meant for the data module's batches.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer` in `LightningModule`.*")

# The library arguments that training errors name, and the params keys they come from.
_TRAIN_KEYS = {
    name: f"train.{name}"
    for name in ("lr", "warmup_steps", "num_workers", "on_divergence", "max_rewinds", "checkpoint_every")
}
CHECKPOINTS, RUN_JSON = "checkpoints", "run.json"
# What a run writes in train.out_dir: deleted when the DVC stage replaces another run's (other_run="replace").
RUN_OUTPUTS = (CHECKPOINTS, "logs", "dvclive", "backbone.pth", "summary.json", RUN_JSON)
# The code whose edits make another run (with the params and the data): what shapes the weights.
_TRAINING_CODE = ("training", "backbones", "headers", "data/loader.py", "data/decode.py")
# Knobs a run may change and still resume: hardware, logging, evaluation, divergence handling.
_NOT_FINGERPRINTED = (
    "devices",
    "num_nodes",
    "accelerator",
    "strategy",
    "num_workers",
    "checkpoint_every",
    "val_every",
    "val_sets",
    "out_dir",
    "on_divergence",
    "rewind_lr_factor",
    "max_rewinds",
    "rewind_skip_batches",
)
OtherRun = Literal["refuse", "replace"]


def default_val_sets(shards: Path) -> list[Path]:
    """The pair sets `femb convert` wrote next to the shards (every `<name>.parquet` but the shards)."""
    return pair_set_files(shards)


def _code_sha256() -> str:
    """sha256 of the training code: the femb modules that shape the weights (`_TRAINING_CODE`)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for entry in _TRAINING_CODE:
        path = root / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f"{file.relative_to(root).as_posix()}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _fingerprint(params: Params) -> str:
    """What must not change for a run to be resumed: the data, the code, the model, the head, the optimisation.

    Hardware, logging, evaluation and divergence-rewind knobs may change (a run resumes at another
    world size, or with `on_divergence=rewind` after a stop); so may other heads' hyper-parameters.
    Init weights count by their content (sha256), not their path; the code by the sha256 of the
    training modules (`_TRAINING_CODE`). Fine-tuning and ViT keys at their defaults are left out.
    """
    relevant = params.model_dump(mode="json", include={"backbone", "embedding_size", "header", "train"})
    init = params.train.init_weights
    relevant["train"]["init_weights"] = _init_weights_sha256(init) if init is not None else None
    for key, default in (
        ("init_weights", None),
        ("freeze_backbone_steps", 0),
        ("drop_path_rate", None),
        ("mask_ratio", None),
    ):
        if relevant["train"][key] == default:
            del relevant["train"][key]
    for key in _NOT_FINGERPRINTED:
        relevant["train"].pop(key, None)
    relevant["header_hparams"] = params.header_hparams()
    relevant["data"] = data_fingerprint(params.data.shards)
    relevant["code"] = _code_sha256()
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_fingerprint(params: Params) -> str:
    """The run fingerprint of `params` (its data, code, model and optimisation; see `_fingerprint`)."""
    return _fingerprint(params)


def _init_weights_sha256(path: Path) -> str:
    if not path.is_file():
        raise FembError(f"train.init_weights: {path}: no such weights file")
    return cached_sha256(path)  # hashed once per process: the fingerprint is asked for more than once


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


def _run_record(out_dir: Path, announce: Callable[[str], None]) -> dict[str, Any] | None:
    """`run.json` of an earlier run in `out_dir`, or None; an unreadable one is announced and ignored."""
    path = out_dir / RUN_JSON
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        announce(f"{path}: not a run record ({exc.__class__.__name__}); ignored and written anew")
        return None
    if not isinstance(record, dict):
        announce(f"{path}: not a run record (a JSON {type(record).__name__}); ignored and written anew")
        return None
    return record


def _resume_point(
    params: Params, fingerprint: str, other_run: OtherRun, announce: Callable[[str], None] = lambda line: None
) -> Checkpoint | None:
    """The checkpoint `train(params)` continues from (None: a fresh run); see docs/architecture.md "Checkpoints".

    A run of another fingerprint in `train.out_dir` is refused (`other_run="refuse"`, `femb train`) or
    its outputs are deleted first (`"replace"`, the DVC stage, whose out DVC keeps with `persist`).
    """
    out_dir = params.train.out_dir
    record = _run_record(out_dir, announce)
    try:
        checkpoint = choose_resume(out_dir / CHECKPOINTS, fingerprint, announce)
    except OtherRunCheckpoint as other:
        if other_run == "refuse":
            raise
        recorded, checkpoint = other.checkpoint.fingerprint, None
    else:
        recorded = (record or {}).get("fingerprint", fingerprint) if checkpoint is None else fingerprint
    if other_run == "replace" and recorded != fingerprint:
        removed = remove_run(out_dir, RUN_OUTPUTS)
        if removed:
            announce(
                f"{out_dir}: replacing run {recorded} with run {fingerprint} (params, code or data changed)"
            )
    return checkpoint


def resuming(params: Params, other_run: OtherRun = "refuse") -> bool:
    """Whether `train(params, other_run=...)` will continue a cut-short run (an intact checkpoint of this run)."""
    return _resume_point_quiet(params, other_run) is not None


def _resume_point_quiet(params: Params, other_run: OtherRun) -> Checkpoint | None:
    try:
        return choose_resume(params.train.out_dir / CHECKPOINTS, _fingerprint(params))
    except OtherRunCheckpoint:
        if other_run == "refuse":
            raise
        return None


def _say(line: str) -> None:
    rank_zero_info(line)


def train(
    params: Params,
    callbacks: Sequence[L.Callback] = (),
    progress: bool | None = None,
    loggers: Sequence[Logger] | None = None,
    other_run: OtherRun = "refuse",
) -> dict[str, Any]:
    """Train `params.backbone` with the head `params.header` on `params.data.shards`; resume a cut-short run.

    Writes under `train.out_dir`: `checkpoints/last.ckpt` (every `checkpoint_every` steps and at
    the end; the one before is kept as `previous.ckpt`), `checkpoints/best.ckpt` (by mean
    verification accuracy), `backbone.pth` (official key names) and `summary.json`; metrics go to
    `loggers` (default: CSV under `logs/`; the DVC stage passes DVCLive). Returns the summary on
    rank 0 and {} on the other ranks. Every checkpoint is verified and belongs to this run's
    fingerprint (`other_run`: what to do with another run's, see `_resume_point`).

    SIGTERM / SIGUSR1 save `last.ckpt` at the next step boundary and raise `Preempted` (exit status
    75). A non-finite loss raises `Diverged`, or with `train.on_divergence=rewind` goes back to the
    last good checkpoint, skips the batches since, lowers the LR and carries on (`train.max_rewinds`).
    Fine-tuning: a fresh run starts its backbone from `train.init_weights` (a resumed one does not:
    the checkpoint holds the weights), and only the head trains for `train.freeze_backbone_steps`.
    """
    t = params.train
    out_dir = t.out_dir
    shards = params.data.shards
    data = _data_module(params)
    num_classes = data.num_classes
    preflight(params, num_classes)
    val_sets = [Path(s) for s in t.val_sets] or default_val_sets(shards)
    fingerprint = _fingerprint(params)
    resume = _resume_point(params, fingerprint, other_run, _say)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RUN_JSON, {"fingerprint": fingerprint, "params": params.model_dump(mode="json")})
    checkpoints = out_dir / CHECKPOINTS
    remove_temps(checkpoints)
    remove_temps(checkpoints / SHARD_DIR)

    L.seed_everything(t.seed, workers=True, verbose=False)
    verification = PeriodicVerification(val_sets, t.val_every, batch_size=params.evaluate.batch_size)
    throughput = Throughput(t.batch_size)
    rewinds = Rewinds()
    show = sys.stderr.isatty() if progress is None else progress
    if loggers is None:
        loggers = [CSVLogger(out_dir, name="logs", version="")]
    resumed_from = resume
    mark_launcher()
    started = time.perf_counter()
    with argument_names(_TRAIN_KEYS, anywhere=True):  # the module speaks of its arguments, the user set keys
        while True:
            module = build_module(params, num_classes)
            module.checkpoint_dir = checkpoints
            if resume is None and t.init_weights is not None:
                init_backbone(module, params)
            every = [
                throughput,  # first, so that its step time excludes the verification below
                verification,
                BackboneExport(out_dir / "backbone.pth", params.backbone),
                ModelCheckpoint(
                    dirpath=checkpoints,
                    every_n_train_steps=t.checkpoint_every,
                    save_last=True,
                    save_top_k=0,
                    enable_version_counter=False,  # always last.ckpt: the I/O plugin keeps the one before
                ),
                RunRecord(fingerprint),
                rewinds,
                LoaderPosition(),
                *callbacks,
                Preemption(lambda trainer: _save_last(trainer, checkpoints)),  # after every other save
            ]
            trainer = _trainer(params, fingerprint, resume, every, loggers, show, bool(val_sets))
            if resume is not None:
                _say(f"Resuming run {fingerprint} from step {resume.step}: {resume.path}")
            try:
                trainer.fit(module, datamodule=data, ckpt_path=resume.path if resume else None)
                break
            except Diverged as diverged:
                resume, skip = _rewind(diverged, trainer, params, fingerprint, rewinds, verification)
                data = _data_module(params)
                data.skip_batches = skip
            except SIGTERMException:  # Lightning's handler, before femb's took over: nothing trained yet
                since = f"since {resume.path} (step {resume.step})" if resume else "yet"
                message = (
                    f"Preempted by SIGTERM before the first step: nothing to save {since}; exiting with status "
                    f"{EXIT_PREEMPTED} (run the same command again to resume)"
                )
                _say(message)
                raise Preempted(message) from None
        trainer.save_checkpoint(checkpoints / LAST, weights_only=False)  # the end state, whatever step
    summary = {
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "seconds": round(time.perf_counter() - started, 2),
        "images_per_sec": round(throughput.mean_images_per_sec, 1),
        "resumed_from": str(resumed_from.path) if resumed_from else None,
        "rewinds": rewinds.count,
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


def _data_module(params: Params) -> ShardDataModule:
    t = params.train
    return ShardDataModule(
        params.data.shards, t.batch_size, t.num_workers, seed=t.seed, shuffle_buffer=t.shuffle_buffer
    )


def _trainer(
    params: Params,
    fingerprint: str,
    resume: Checkpoint | None,
    callbacks: list[L.Callback],
    loggers: Sequence[Logger],
    show: bool,
    validate: bool,
) -> L.Trainer:
    """The Trainer of one fit. A resumed run keeps the length in steps it started with (any world size)."""
    t = params.train
    checkpoints = t.out_dir / CHECKPOINTS
    if validate:
        callbacks.append(
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
    if t.freeze_backbone_steps:
        callbacks.insert(0, FreezeBackbone(t.freeze_backbone_steps))
    if show:
        callbacks.append(RichProgressBar())
    strategy = t.strategy
    if t.freeze_backbone_steps and strategy == "ddp":
        strategy = "ddp_find_unused_parameters_true"  # the frozen backbone's parameters get no gradient
    plugins: list[Any] = [VerifiedCheckpointIO(fingerprint)]
    if (
        SLURMEnvironment.detect()
    ):  # femb saves and requeues at a step boundary itself (femb/training/preemption.py)
        plugins.append(SLURMEnvironment(auto_requeue=False))
    total = resume.total_steps if resume is not None else None
    trainer = L.Trainer(
        default_root_dir=t.out_dir,
        max_epochs=-1 if total else t.max_epochs,
        max_steps=total or t.max_steps,
        precision=t.precision,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        plugins=plugins,
        gradient_clip_val=t.gradient_clip or None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        callbacks=callbacks,
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
    return trainer


def _save_last(trainer: L.Trainer, checkpoints: Path) -> Path:
    """Save `last.ckpt` now (a preemption), unless the periodic checkpoint of this very step just did."""
    path = checkpoints / LAST
    try:
        saved = read_record(path).get("step") == trainer.global_step
    except CheckpointDamaged:
        saved = False
    if not saved:
        trainer.save_checkpoint(path, weights_only=False)  # the full state: optimizer, loops
    return path


def _rewind(
    diverged: Diverged,
    trainer: L.Trainer,
    params: Params,
    fingerprint: str,
    rewinds: Rewinds,
    verification: PeriodicVerification,
) -> tuple[Checkpoint, int]:
    """Where a diverged run goes back to (`train.on_divergence=rewind`) and how many batches it skips.

    The window skipped is the batches from the last good checkpoint's position through the one where
    the loss was seen not to be finite (at least `train.rewind_skip_batches`; at most the rest of the
    checkpoint's epoch); the LR is multiplied by `train.rewind_lr_factor`. Otherwise (`stop`,
    `max_rewinds` reached, nothing to go back to) the divergence stands.
    """
    t = params.train
    if t.on_divergence != "rewind":
        raise diverged
    if rewinds.count >= t.max_rewinds:
        raise FembError(f"{diverged}; gave up after {rewinds.count} rewind(s) (max_rewinds={t.max_rewinds})")
    good = choose_resume(t.out_dir / CHECKPOINTS, fingerprint, _say)
    if good is None:
        raise FembError(f"{diverged}; no checkpoint to rewind to yet (checkpoint_every={t.checkpoint_every})")
    saved = good.record.get("data") or {}
    seen = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches of this epoch, the bad one too
    if saved.get("epoch") == trainer.current_epoch and isinstance(saved.get("batches_done"), int):
        skip = max(seen - saved["batches_done"], t.rewind_skip_batches)
        what = f"{skip} batch(es)"
    else:  # it diverged in a later epoch than the checkpoint's: skip what is left of that one
        skip, what = sys.maxsize, f"the rest of epoch {saved.get('epoch')}"
    rewinds.lower_lr(t.rewind_lr_factor)
    _say(
        f"Training diverged at step {diverged.step} (loss {diverged.loss}); rewind {rewinds.count} of "
        f"{t.max_rewinds}: back to step {good.step} ({good.path}), skipping {what}, "
        f"learning rate x{t.rewind_lr_factor}"
    )
    verification.history[:] = [h for h in verification.history if h["step"] <= good.step]
    return good, skip


__all__ = ["build_module", "default_val_sets", "init_backbone", "resuming", "run_fingerprint", "train"]
