"""Backbone registry in the manner of timm `create_model`: a name (or alias) and keyword arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from femb.backbones.iresnet import iresnet18, iresnet34, iresnet50, iresnet100, iresnet200, iresnet_tiny
from femb.backbones.mobilefacenet import mobilefacenet, mobilefacenet_large
from femb.backbones.vit import vit_b, vit_h, vit_l, vit_micro, vit_s, vit_t
from femb.errors import FembError

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": iresnet18,
    "iresnet34": iresnet34,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
    "iresnet200": iresnet200,
    "iresnet_tiny": iresnet_tiny,
    "mobilefacenet": mobilefacenet,
    "mobilefacenet_large": mobilefacenet_large,
    "vit_t": vit_t,
    "vit_s": vit_s,
    "vit_b": vit_b,
    "vit_l": vit_l,
    "vit_h": vit_h,
    "vit_micro": vit_micro,
}

# arcface_torch `get_model` names.
ALIASES: dict[str, str] = {
    "r18": "iresnet18",
    "r34": "iresnet34",
    "r50": "iresnet50",
    "r100": "iresnet100",
    "r200": "iresnet200",
    "mbf": "mobilefacenet",
    "mbf_large": "mobilefacenet_large",
}


def list_backbones(aliases: bool = False) -> list[str]:
    """Names `create_backbone` accepts: the canonical ones, plus the arcface_torch aliases if asked."""
    names = list(_FACTORIES)
    return names + list(ALIASES) if aliases else names


def canonical_backbone_name(name: str) -> str:
    """The canonical name of a backbone or alias (`r50` -> `iresnet50`); FembError if unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in _FACTORIES:
        choices = ", ".join(f"{alias} ({target})" if alias != target else alias for alias, target in _named())
        raise FembError(f"backbone '{name}' is not known; choose one of {choices}")
    return key


def _named() -> list[tuple[str, str]]:
    by_target = {target: alias for alias, target in ALIASES.items()}
    return [(by_target.get(name, name), name) for name in _FACTORIES]


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised backbone by name or alias; bad names/arguments raise FembError."""
    canonical = canonical_backbone_name(name)
    factory = _FACTORIES[canonical]
    parameters = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise FembError(
            f"backbone '{name}' takes no argument {', '.join(repr(k) for k in unknown)}; "
            f"its arguments are {', '.join(parameters)}"
        )
    try:
        return factory(**kwargs)
    except (ValueError, TypeError) as err:
        raise FembError(f"backbone '{name}': {err}") from err
