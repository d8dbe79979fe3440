"""LightningDataModule over the Parquet shards: per-epoch reshuffle, rank split, exact mid-epoch resume.

Batches are uint8 (pinned on CUDA); the LightningModule normalises them after the transfer to the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from femb.data.loader import DEFAULT_SHUFFLE_BUFFER, make_train_loader, read_num_classes
from femb.errors import FembError


class ShardDataModule(L.LightningDataModule):
    """Training batches from `femb convert` shards; every rank gets the same number of batches.

    The loader's position (epoch, batches consumed) goes into each checkpoint, so a run restarted
    from a mid-epoch checkpoint sees exactly the batches an uninterrupted run would have.
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
        layout = {"world_size": trainer.world_size, "num_workers": self.num_workers}
        saved = {key: resume.get(key, value) for key, value in layout.items()}
        if saved != layout:
            raise FembError(
                f"checkpoint: its data order was made with {saved}, this run has {layout}; "
                "resume with the same world size (devices x nodes) and num_workers"
            )
        if resume["batches_done"] >= len(loader):  # saved at an epoch's last batch: the next epoch is whole
            loader.dataset.set_epoch(resume["epoch"] + 1)
        else:
            loader.dataset.resume(resume["epoch"], resume["batches_done"])
        return loader

    def state_dict(self) -> dict[str, Any]:
        # Saved from a batch-end hook: `ready` counts the batches of this epoch that have been trained on.
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {
            "epoch": self.trainer.current_epoch,
            "batches_done": int(progress.ready),
            "world_size": self.trainer.world_size,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)
