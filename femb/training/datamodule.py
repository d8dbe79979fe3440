"""LightningDataModule over the Parquet shards: per-epoch reshuffle, rank split, mid-epoch resume.

Batches are uint8 (pinned on CUDA); the LightningModule normalises them after the transfer to the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from femb.data.loader import DEFAULT_SHUFFLE_BUFFER, make_train_loader, read_num_classes


class ShardDataModule(L.LightningDataModule):
    """Training batches from `femb convert` shards; every rank gets the same number of batches.

    The loader's position (epoch, batches consumed, and the layout that counted them) goes into each
    checkpoint, so a run restarted from a mid-epoch checkpoint sees exactly the batches an
    uninterrupted run would have; restarted at another world size, it continues as many samples
    into the epoch.
    """

    def __init__(
        self,
        shards_dir: Path | str,
        batch_size: int,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> None:
        super().__init__()
        self.shards_dir = Path(shards_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self._resume: dict[str, int] | None = None
        self.skip_batches = 0  # a divergence rewind: batches of the resumed epoch to leave out
        self.position: int | None = None  # where a resumed loader starts in its epoch (LoaderPosition)

    @property
    def num_classes(self) -> int:
        """Identities in the shards (the manifest's count, checked against the labels)."""
        return read_num_classes(self.shards_dir)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        loader = make_train_loader(
            self.shards_dir,
            self.batch_size,
            self.num_workers,
            seed=self.seed,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            shuffle_buffer=self.shuffle_buffer,
            pin_memory=torch.cuda.is_available()
            and trainer.accelerator.__class__.__name__ == "CUDAAccelerator",
        )
        resume, self._resume = self._resume, None
        if resume is None:
            loader.dataset.set_epoch(trainer.current_epoch)
            return loader
        epoch, done = self._position(resume, trainer.world_size, len(loader))
        self.position = done
        if done >= len(loader):  # saved at (or skipped to) an epoch's end: the next epoch is whole
            loader.dataset.set_epoch(epoch + 1)
        else:
            loader.dataset.resume(epoch, done)
        return loader

    def _position(self, resume: dict[str, int], world_size: int, batches: int) -> tuple[int, int]:
        """(epoch, batches of it done) for this layout: the same number of samples into the epoch, then the skip.

        With the world size and loader workers it was saved with, the position is exact and the batches
        that follow are those an uninterrupted run would see. With others, the run continues as many
        samples into the epoch (rounded down to whole global batches); which rows those batches hold
        differs, so some rows of that epoch are seen twice and others not at all, from the next epoch on
        the order is the new layout's own.
        """
        epoch, done = int(resume["epoch"]), int(resume["batches_done"])
        saved_world = int(resume.get("world_size", world_size))
        saved_workers = int(resume.get("num_workers", self.num_workers))
        saved_batch = int(resume.get("batch_size", self.batch_size))
        if (saved_world, saved_workers, saved_batch) != (world_size, self.num_workers, self.batch_size):
            samples = done * saved_batch * saved_world
            done = min(batches, samples // (self.batch_size * world_size))
            rank_zero_info(
                f"Data position: {samples} samples into epoch {epoch}, saved with world size {saved_world} "
                f"and {saved_workers} loader worker(s), now {world_size} and {self.num_workers}: "
                f"{done} of {batches} batches per rank done; the order from here on differs from an "
                "uninterrupted run's"
            )
        if self.skip_batches:
            skipped = min(self.skip_batches, batches - done)
            rank_zero_info(f"Skipping {skipped} batch(es) of epoch {epoch} after batch {done}")
            done += skipped
            self.skip_batches = 0
        return epoch, done

    def state_dict(self) -> dict[str, Any]:
        # Saved from a batch-end hook: `ready` counts the batches of this epoch that have been trained on.
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {
            "epoch": self.trainer.current_epoch,
            "batches_done": int(progress.ready),
            "world_size": self.trainer.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)


class LoaderPosition(L.Callback):
    """Tells Lightning's epoch loop where the resumed loader really is, when that moved (world size, skip).

    Lightning restores its own count of the epoch's batches from the checkpoint; after a change of
    world size or a rewind's skip the loader starts elsewhere, and the next checkpoint must record that.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        position, data.position = getattr(data, "position", None), None
        if position is None:
            return
        current = trainer.fit_loop.epoch_loop.batch_progress.current
        shift = position - current.ready  # as restored: the saved count (completed one behind at batch end)
        current.ready += shift
        current.started += shift
        current.processed += shift
        current.completed += shift
