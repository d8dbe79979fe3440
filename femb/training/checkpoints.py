"""Verified checkpoints (docs/architecture.md "Checkpoints"): atomic, checksummed, the last two kept.

Every checkpoint `X.ckpt` and every partial FC shard is written under a temporary name, hashed while it is
written, and renamed into place; the checkpoint's record `X.ckpt.json` (format, sha256, bytes, step,
run fingerprint, total steps, world size, loader position, the shards it needs and their sha256) is
written after it. Saving
`last.ckpt` first moves an intact older one to `previous.ckpt`. At resume the newest checkpoint whose
bytes and shards match its record is taken; a damaged one is named in one line and the previous one
used (or, with none left, the run starts afresh), and a checkpoint of another run (another fingerprint)
is refused, naming both fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from femb.errors import FembError
from femb.io import atomic_path, file_sha256, write_json

FORMAT = "femb-checkpoint/1"
LAST, PREVIOUS, BEST = "last.ckpt", "previous.ckpt", "best.ckpt"
SHARD_DIR = "partial_fc"


def record_path(path: Path | str) -> Path:
    """The record beside checkpoint `path`: `<name>.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (torch.save writes its archive in order)."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def save_verified(
    obj: Any, path: Path | str, before_rename: Callable[[], None] | None = None
) -> dict[str, Any]:
    """torch.save `obj` to `path` atomically; returns {"sha256", "bytes"} of what was written.

    `before_rename` runs once the temporary file is complete, just before it takes the name (rotation).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
        if before_rename is not None:
            before_rename()
    digest = {"sha256": writer.digest.hexdigest(), "bytes": writer.bytes}
    _remember(path, digest["sha256"])
    return digest


# sha256 of files this process wrote or hashed, by (device, inode, size, mtime): a rename keeps the key, so
# a rotated checkpoint is not hashed again.
_KNOWN: dict[tuple[int, int, int, int], str] = {}


def _key(path: Path) -> tuple[int, int, int, int]:
    stat = path.stat()
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _remember(path: Path, sha256: str) -> None:
    _KNOWN[_key(path)] = sha256


def cached_sha256(path: Path) -> str:
    """A file's sha256, hashed once per process while its inode, size and mtime stay the same."""
    key = _key(path)
    if key not in _KNOWN:
        _KNOWN[key] = file_sha256(path)
    return _KNOWN[key]


@dataclass(frozen=True)
class Checkpoint:
    """An intact checkpoint: its path, optimizer step, run fingerprint and record."""

    path: Path
    step: int
    fingerprint: str | None
    record: dict[str, Any]

    @property
    def total_steps(self) -> int | None:
        """The optimizer steps the run was set to last when it started (None if not recorded)."""
        total = self.record.get("total_steps")
        return total if isinstance(total, int) and total > 0 else None


class CheckpointDamaged(Exception):
    """Why a checkpoint cannot be trusted (its message completes "<path>: ...")."""


class OtherRunCheckpoint(FembError):
    """A checkpoint written by a run of another fingerprint (other params, code or data)."""

    def __init__(self, checkpoint: Checkpoint, fingerprint: str) -> None:
        self.checkpoint = checkpoint
        super().__init__(
            f"{checkpoint.path}: a checkpoint of run {checkpoint.fingerprint}, but this run's fingerprint is "
            f"{fingerprint} (its params, code or data differ); delete {checkpoint.path.parent} to start "
            "afresh or set train.out_dir elsewhere"
        )


def read_record(path: Path | str) -> dict[str, Any]:
    """The record of checkpoint `path`; CheckpointDamaged if it is missing or not a femb record."""
    record = record_path(path)
    try:
        data = json.loads(record.read_bytes())
    except FileNotFoundError:
        raise CheckpointDamaged(f"no checksum recorded ({record.name} is missing)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(
            f"its record {record.name} is unreadable ({exc.__class__.__name__})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("sha256"), str):
        raise CheckpointDamaged(f"its record {record.name} is not a {FORMAT} record")
    return data


def verify(path: Path | str) -> Checkpoint:
    """Check a checkpoint's bytes and partial FC shards against its record; CheckpointDamaged says what is wrong."""
    path = Path(path)
    record = read_record(path)
    if not path.is_file():
        raise CheckpointDamaged("is missing")
    size = path.stat().st_size
    if size != record.get("bytes"):
        raise CheckpointDamaged(
            f"is {size:,} bytes, its record says {record.get('bytes')!r} (truncated or replaced)"
        )
    if cached_sha256(path) != record["sha256"]:
        raise CheckpointDamaged("its sha256 does not match its record (corrupt or replaced)")
    shards = record.get("partial_fc") or {}
    for name, sha256 in shards.items():
        shard = path.parent / SHARD_DIR / name
        if not shard.is_file():
            raise CheckpointDamaged(f"its partial FC shard {shard} is missing")
        if cached_sha256(shard) != sha256:
            raise CheckpointDamaged(f"its partial FC shard {shard} does not match its recorded sha256")
    step = record.get("step")
    return Checkpoint(path, step if isinstance(step, int) else 0, record.get("fingerprint"), record)


def intact(path: Path | str) -> bool:
    """Whether checkpoint `path` exists and matches its record."""
    try:
        verify(path)
    except CheckpointDamaged:
        return False
    return True


def choose_resume(
    directory: Path | str, fingerprint: str, announce: Callable[[str], None] = lambda line: None
) -> Checkpoint | None:
    """The newest intact checkpoint in `directory` (last.ckpt, else previous.ckpt), or None to start afresh.

    A damaged one is announced in one line naming it and what is used instead. A checkpoint of another
    fingerprint raises OtherRunCheckpoint.
    """
    directory = Path(directory)
    problems: list[str] = []
    for name in (LAST, PREVIOUS):
        path = directory / name
        if not path.exists() and not record_path(path).exists():
            continue
        try:
            checkpoint = verify(path)
        except CheckpointDamaged as damage:
            problems.append(f"{path}: {damage}")
            continue
        if checkpoint.fingerprint != fingerprint:
            raise OtherRunCheckpoint(checkpoint, fingerprint)
        if problems:
            announce(
                f"{'; '.join(problems)}; resuming from the previous checkpoint {path} (step {checkpoint.step})"
            )
        return checkpoint
    if problems:
        announce(f"{'; '.join(problems)}; no intact checkpoint is left, so the run starts afresh")
    return None


def referenced_shards(directory: Path | str) -> set[str]:
    """The partial FC shard files that the checkpoints' records in `directory` need."""
    names: set[str] = set()
    for record in Path(directory).glob("*.ckpt.json"):
        try:
            names |= set(read_record(record.with_suffix(""))["partial_fc"] or {})
        except (CheckpointDamaged, KeyError, TypeError):
            continue
    return names


class VerifiedCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O, atomic and checksummed; saving `last.ckpt` keeps the intact one before it.

    Reads with `torch.load(..., weights_only=True)`. After each save, partial FC shards that no
    checkpoint's record needs any more are deleted (rank 0 saves; every rank's shards are written by then).
    """

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        run = checkpoint.get("femb_run") or {}
        shards = (checkpoint.get("femb_partial_fc") or {}).get("files") or {}
        record = {
            "format": FORMAT,
            "file": path.name,
            "step": int(checkpoint.get("global_step", 0)),
            "epoch": int(checkpoint.get("epoch", 0)),
            "fingerprint": run.get("fingerprint", self.fingerprint),
            "total_steps": run.get("total_steps"),
            "world_size": run.get("world_size"),
            "data": run.get("data") or {},
            "partial_fc": dict(shards),
        }

        def rotate() -> None:
            # Keep the checkpoint before this one as previous.ckpt, unless it is damaged (a good previous.ckpt
            # is then worth more) or of this very step (the end-of-run save repeats the last periodic one).
            if path.name != LAST or not path.exists() or not intact(path):
                return
            if read_record(path).get("step") == record["step"]:
                return
            previous = path.with_name(PREVIOUS)
            os.replace(path, previous)
            os.replace(record_path(path), record_path(previous))

        record.update(save_verified(checkpoint, path, before_rename=rotate))
        write_json(record_path(path), record)
        self._prune_shards(path.parent)

    @staticmethod
    def _prune_shards(directory: Path) -> None:
        shard_dir = directory / SHARD_DIR
        if not shard_dir.is_dir():
            return
        keep = referenced_shards(directory)
        for shard in shard_dir.glob("step*-rank*-of-*.pt"):
            if shard.name not in keep:
                shard.unlink(missing_ok=True)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
        record_path(path).unlink(missing_ok=True)


class RunRecord(L.Callback):
    """Writes the run's fingerprint, its length in optimizer steps, the world size and the loader's position.

    The length is fixed when a run starts (`max_steps`, or the steps `max_epochs` give at that world
    size); a resumed run keeps it, so the step counter and LR schedule continue at another world size.
    """

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        total = trainer.estimated_stepping_batches
        data = trainer.datamodule.state_dict() if trainer.datamodule is not None else {}
        checkpoint["femb_run"] = {
            "fingerprint": self.fingerprint,
            "total_steps": int(total) if total != float("inf") else None,
            "world_size": trainer.world_size,
            "data": {k: data[k] for k in ("epoch", "batches_done") if k in data},
        }


def remove_run(out_dir: Path | str, names: Iterable[str]) -> list[Path]:
    """Delete the named entries of a run directory (files or directories); returns what was removed."""
    removed = []
    for name in names:
        target = Path(out_dir) / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            continue
        removed.append(target)
    return removed


__all__ = [
    "BEST",
    "LAST",
    "PREVIOUS",
    "Checkpoint",
    "CheckpointDamaged",
    "OtherRunCheckpoint",
    "RunRecord",
    "VerifiedCheckpointIO",
    "choose_resume",
    "file_sha256",
    "intact",
    "read_record",
    "record_path",
    "referenced_shards",
    "remove_run",
    "save_verified",
    "verify",
]
