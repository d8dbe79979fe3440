"""CurricularFace (Huang et al., CVPR 2020): ArcFace whose hard negatives weigh more as training matures.

A negative is hard when cos(theta_j) > cos(theta_y + m), the margin-adjusted positive cosine taken
before ArcFace's fallback past theta_y + m >= pi (as the official code: ``mask = cos_theta >
cos_theta_m`` ahead of ``torch.where(target > th, ...)``); its logit becomes cos(theta_j)(t + cos(theta_j)),
where t is an EMA (momentum t_alpha) of the batch's mean positive cosine: about 0 early (hard negatives
damped: easy samples first), rising as the model learns. t is a buffer, updated in training only,
outside the graph (HuangYG123/CurricularFace, head/metrics.py; TFace, curricularface.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from femb.headers.arcface import arc_margin
from femb.headers.base import EPS, MarginHead, check_positive, check_range


class CurricularFace(MarginHead):
    """CurricularFace: s cos(theta_y + m) for the true class, s cos(theta_j)(t + cos(theta_j)) for hard negatives."""

    label = "curricularface"

    def __init__(
        self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5, t_alpha: float = 0.01
    ) -> None:
        super().__init__(embedding_size, num_classes, s)
        self.m = check_range(self.label, "m", m, 0.0, math.pi / 2, high_text="pi/2")
        self.t_alpha = check_range(
            self.label, "t_alpha", check_positive(self.label, "t_alpha", t_alpha), 0, 1, include_high=True
        )
        self.register_buffer("t", torch.zeros(()))

    def update_state(self, cos_y: Tensor, norms: Tensor) -> None:
        """t <- t_alpha * mean(cos theta_y) + (1 - t_alpha) * t, over the rows whose class is here."""
        if cos_y.numel():
            self.t.mul_(1 - self.t_alpha).add_(self.t_alpha * cos_y.mean())

    def target_logit(self, cos_y: Tensor, norms_y: Tensor) -> Tensor:
        """cos(theta_y + m), monotonic past pi - m (as ArcFace)."""
        return arc_margin(cos_y, self.m)

    def negative_logits(self, cos: Tensor, rows: Tensor, cos_y: Tensor) -> Tensor:
        """cos(theta_j)(t + cos(theta_j)) where cos(theta_j) > cos(theta_y + m), else cos(theta_j)."""
        cos_theta_m = (cos_y.detach().clamp(-1 + EPS, 1 - EPS).acos() + self.m).cos()  # before the fallback
        hard = torch.zeros_like(cos, dtype=torch.bool)
        hard[rows] = cos[rows] > cos_theta_m.unsqueeze(1)
        return torch.where(hard, cos * (self.t + cos), cos)

    def extra_repr(self) -> str:
        """Sizes, scale, margin and the current t."""
        return f"{super().extra_repr()}, m={self.m:g}, t_alpha={self.t_alpha:g}"
