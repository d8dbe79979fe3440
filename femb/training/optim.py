"""The optimiser and its per-step LR schedule from an `OptimParams` section: one builder for training and benchmarks."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from femb.config import OptimParams
from femb.training.schedule import lr_factor


def build_optimizer(
    params: Iterable[nn.Parameter], optim: OptimParams, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (arcface_torch: momentum 0.9, weight decay 5e-4) or AdamW over `params`, and its LR schedule.

    The schedule (warmup, then poly / cosine / step / constant) is a multiplier of `optim.lr` stepped
    once per optimizer step; the decay spans `total_steps` steps.
    """
    params = list(params)
    if optim.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    factor = partial(
        lr_factor,
        total_steps=total_steps,
        warmup_steps=optim.warmup_steps,
        schedule=optim.schedule,
        power=optim.poly_power,
        milestones=tuple(optim.milestones),
        gamma=optim.gamma,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
