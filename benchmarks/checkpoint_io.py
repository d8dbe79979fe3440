"""Time a checkpoint save through femb's VerifiedCheckpointIO against Lightning's TorchCheckpointIO; print JSON.

The baseline is Lightning's default (torch.save into memory, then one write). femb's adds what integrity
costs: hashing while writing, an fsync, the rename, the record, and at resume the verification of a
checkpoint this process did not write (a full read and sha256). The checkpoint is a dict shaped like a
training one: a backbone-sized tensor, an optimizer's momentum of it, and a small state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from femb.training import checkpoints
from femb.training.checkpoints import VerifiedCheckpointIO, verify


def make_checkpoint(megabytes: int) -> dict:
    """Weights and their momentum of `megabytes` MB together, plus step counters."""
    numel = megabytes * (1 << 20) // 8  # two float32 tensors
    weights = torch.randn(numel)
    return {
        "global_step": 1000,
        "epoch": 0,
        "state_dict": {"backbone.weight": weights},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.randn(numel)}}, "param_groups": []}],
    }


def time_it(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=256, help="checkpoint size (default 256 MB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    checkpoint = make_checkpoint(args.megabytes)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        lightning_io, femb_io = TorchCheckpointIO(), VerifiedCheckpointIO("benchmark")
        # Interleaved, each first run untimed: the page cache and allocator warm for both alike.
        lightning_io.save_checkpoint(checkpoint, root / "lightning.ckpt")
        femb_io.save_checkpoint(checkpoint, root / "last.ckpt")
        baseline, verified = [], []
        for _ in range(args.repeats):
            baseline.append(
                time_it(lambda: lightning_io.save_checkpoint(checkpoint, root / "lightning.ckpt"), 1)
            )
            verified.append(time_it(lambda: femb_io.save_checkpoint(checkpoint, root / "last.ckpt"), 1))

        def cold_verify() -> None:
            checkpoints._KNOWN.clear()  # as in a new process: read and hash the whole file
            verify(root / "last.ckpt")

        check = time_it(cold_verify, args.repeats)
        size = (root / "last.ckpt").stat().st_size
    lightning_s, femb_s = statistics.median(baseline), statistics.median(verified)
    print(
        json.dumps(
            {
                "checkpoint_mb": round(size / 1e6, 1),
                "lightning_save_s": round(lightning_s, 3),
                "femb_save_s": round(femb_s, 3),
                "femb_over_lightning": round(femb_s / lightning_s, 2),
                "verify_at_resume_s": round(check, 3),
                "verify_mb_per_s": round(size / 1e6 / check, 1),
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
