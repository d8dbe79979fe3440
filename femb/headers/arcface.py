"""ArcFace (Deng et al., CVPR 2019): an additive angular margin on the true class, cos(theta_y + m)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from femb.headers.base import EPS, MarginHead, check_range


def arc_margin(cos_y: Tensor, m: Tensor | float) -> Tensor:
    """cos(theta + m), continued past theta + m >= pi as cos(theta) - m sin(pi - m) so it keeps falling.

    The continuation is arcface_torch's (``easy_margin`` off): a straight line below cos(pi - m).
    ``m`` may be one margin or one per row (MagFace, ElasticFace).
    """
    m = torch.as_tensor(m, dtype=cos_y.dtype, device=cos_y.device)
    theta = cos_y.clamp(-1 + EPS, 1 - EPS).acos()
    fallback = cos_y - torch.sin(math.pi - m) * m
    return torch.where(theta + m < math.pi, (theta + m).cos(), fallback)


class ArcFace(MarginHead):
    """ArcFace: s * cos(theta_y + m) for the true class, s * cos(theta_j) for the others."""

    label = "arcface"

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(embedding_size, num_classes, s)
        self.m = check_range(self.label, "m", m, 0.0, math.pi / 2, high_text="pi/2")

    def target_logit(self, cos_y: Tensor, norms_y: Tensor) -> Tensor:
        """cos(theta_y + m), monotonic past pi - m."""
        return arc_margin(cos_y, self.m)

    def extra_repr(self) -> str:
        """Sizes, scale and margin."""
        return f"{super().extra_repr()}, m={self.m:g}"
