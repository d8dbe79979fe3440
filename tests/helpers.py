"""Helpers several test files share: a small calibrated backbone, and a runnable copy of this checkout."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch
import yaml
from torch import nn

from femb.backbones import create_backbone

REPO = Path(__file__).resolve().parents[1]
MBF_TINY = {"blocks": (1, 1, 1, 1), "scale": 1}  # MobileFaceNet, one block per stage, half width: fast
# Outputs of earlier runs and DVC's own state: a copy makes its own.
_PRODUCED = ("dvc.lock", "metrics/", "plots/", "models/", "reports/", "data/")


def calibrated_tiny_mbf(seed: int = 0) -> nn.Module:
    """A tiny MobileFaceNet whose BatchNorm statistics come from one random batch, in eval mode."""
    torch.manual_seed(seed)
    net = create_backbone("mbf", **MBF_TINY)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(8, 3, 112, 112) * 2 - 1)
    return net.eval()


def copy_checkout(dest: Path) -> None:
    """This checkout's sources, committed or not (what git does not ignore), without outputs of runs."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if name.startswith(_PRODUCED) or not source.is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name)


def shrink_demo(repo: Path, **extra: object) -> None:
    """A demo that trains in seconds: 24 people x 6 images, 40 pairs per set, a 4-subject IJB set, 4 steps of 32."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["data"]["synth"] = {
        "identities": 24,
        "images_per_identity": 6,
        "pairs": 40,
        "seed": 3,
        "loose_identities": 2,
        "loose_images_per_identity": 2,
        "ijb_subjects": 4,
    }
    params["train"].update(max_steps=4, batch_size=32, num_workers=0, warmup_steps=0, val_every=2)
    params["evaluate"]["batch_size"] = 64
    params.update(extra)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
