"""A run's checkpoints mirrored outside DVC's outputs, so that `dvc exp run` resumes a killed run too.

`dvc repro` keeps a persisted `train.out_dir`, but `dvc exp run` first checks out the outputs of its
baseline commit, which removes a half-trained `out_dir` the baseline does not hold (or replaces it with
the baseline's finished one). The train stage therefore keeps hard links of `out_dir/checkpoints` in a
stash keyed by the run fingerprint (`.femb-cache/runs/<fingerprint>/`, docs/architecture.md
"Checkpoints"), puts them back when `out_dir` has no checkpoint of its own, and drops the stash when
the run is complete. Hard links cost no copy and no disk: a checkpoint is replaced by a rename, so the
stash keeps pointing at the last one mirrored until the next mirror.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L

from femb.io import TEMP_NAME, atomic_path
from femb.training.checkpoints import LAST, record_path


def _files(directory: Path) -> dict[str, os.stat_result]:
    """Relative posix path -> stat of every finished file under `directory` (temporaries left out)."""
    found: dict[str, os.stat_result] = {}
    for path in directory.rglob("*"):
        if path.is_file() and not TEMP_NAME.fullmatch(path.name):
            found[path.relative_to(directory).as_posix()] = path.stat()
    return found


def mirror(source: Path | str, target: Path | str) -> None:
    """Make `target` hold the files of `source` (hard links where they can be, else copies); drop the rest.

    The record `X.ckpt.json` goes last, after the checkpoint and shards it describes, so that an
    interrupted mirror never leaves a record whose checkpoint is missing.
    """
    source, target = Path(source), Path(target)
    if not source.is_dir():
        return
    wanted, present = _files(source), _files(target) if target.is_dir() else {}
    for name in sorted(wanted, key=lambda n: n.endswith(".ckpt.json")):
        have = present.get(name)
        if have is not None and (have.st_ino, have.st_dev) == (wanted[name].st_ino, wanted[name].st_dev):
            continue
        with atomic_path(target / name, sync=False) as staging:
            try:
                os.link(source / name, staging)
            except OSError:  # another file system, or no hard links there
                shutil.copy2(source / name, staging)
    for name in set(present) - set(wanted):
        (target / name).unlink(missing_ok=True)


def restore(stash: Path | str, checkpoints: Path | str) -> bool:
    """Make `checkpoints` the stashed run's (whatever it held); whether the stash had a checkpoint to restore.

    For a directory with no intact checkpoint of the stash's run: empty, damaged, or another run's.
    """
    stash, checkpoints = Path(stash), Path(checkpoints)
    if not record_path(stash / LAST).exists():
        return False
    mirror(stash, checkpoints)
    return True


class StashCheckpoints(L.Callback):
    """After each checkpoint save (seen as a new `last.ckpt.json`), mirror the checkpoint directory into `stash`."""

    def __init__(self, checkpoints: Path | str, stash: Path | str) -> None:
        self.checkpoints, self.stash = Path(checkpoints), Path(stash)
        self._seen: int | None = None

    def _sync(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        record = record_path(self.checkpoints / LAST)
        try:
            stamp = record.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if stamp != self._seen:
            mirror(self.checkpoints, self.stash)
            self._seen = stamp

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._sync(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(trainer)


__all__ = ["StashCheckpoints", "mirror", "restore"]
