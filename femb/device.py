"""Choosing the torch device a command runs on."""

from __future__ import annotations

import torch

from femb.errors import FembError


def resolve_device(device: str | None) -> torch.device:
    """The device named (checked to exist), else CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as err:
        raise FembError(f"device '{device}' is not a torch device (e.g. cpu, cuda, cuda:1)") from err
    if target.type == "cuda" and not torch.cuda.is_available():
        raise FembError(f"device '{device}' requested but CUDA is not available")
    return target
