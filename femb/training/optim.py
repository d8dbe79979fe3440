"""The optimiser and its per-step LR schedule from an `OptimParams` section: one builder for training and benchmarks."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from femb.config import OptimParams
from femb.training.schedule import lr_factor


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that modules of `model` exempt from weight decay.

    A module declares them, relative to itself, with a `no_weight_decay()` method (timm's convention;
    femb's ViT names its position embedding and mask token); the names come back prefixed with the
    module's path in `model`, as `model.named_parameters()` spells them.
    """
    names: set[str] = set()
    for path, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names.update(f"{path}.{name}" if path else name for name in declared())
    return names


def build_optimizer(
    params: Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
    optim: OptimParams,
    total_steps: int,
    no_weight_decay: Collection[str] = (),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (arcface_torch: momentum 0.9, weight decay 5e-4) or AdamW over `params`, and its LR schedule.

    `params` are parameters or `(name, parameter)` pairs (`named_parameters()`); named parameters in
    `no_weight_decay` go to a second group with weight decay 0 (arcface_torch decays everything; the
    ViT recipe here leaves the position embedding and mask token out, as timm and DeiT do). Without
    such a parameter there is one group, as before. The schedule (warmup, then poly / cosine / step /
    constant) is a multiplier of `optim.lr` stepped once per optimizer step; the decay spans
    `total_steps` steps.
    """
    named = [item if isinstance(item, tuple) else (None, item) for item in params]
    exempt = set(no_weight_decay)
    decay = [p for name, p in named if name not in exempt]
    kept = [p for name, p in named if name in exempt]
    groups: list[dict[str, Any]] = [{"params": decay}]
    if kept:
        groups.append({"params": kept, "weight_decay": 0.0})
    if optim.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
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
