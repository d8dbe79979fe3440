"""Choosing the torch device a command runs on, and finding the one a model is on."""

from __future__ import annotations

import torch
from torch import nn

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


def model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which float type a model computes: its first floating tensor's (CPU float32 without one).

    An ONNX backbone (`femb.weights.OnnxBackbone`) has no tensors, so it gets float32 CPU input.
    """
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32
