"""AdaFace (Kim et al., CVPR 2022): a margin that adapts to image quality, read off the feature norm.

With the norm standardised by EMA batch statistics and scaled by h, z = clip(h (||x|| - mu)/(sigma + eps), -1, 1),
the true-class logit is s (cos(clip(theta_y + g_angular, eps, pi - eps)) - g_additive), where
g_angular = -m z and g_additive = m z + m: high-quality (large-norm) samples get an ArcFace-like
margin, low-quality ones a CosFace-like one. The norm is detached and clipped to [0.001, 100];
mu and sigma start at 20 and 100 and follow the batch with momentum t_alpha, in training only
(mk-minchul/AdaFace, head.py). The official head also clamps every cosine to 1 - eps; here only the
true-class cosine is, since it is the only one that meets acos.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from femb.headers.base import MarginHead, check_positive, check_range

ADAFACE_EPS = 1e-3


class AdaFace(MarginHead):
    """AdaFace: s (cos(theta_y - m z) - (m + m z)) for the true class, z the standardised feature norm."""

    label = "adaface"

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
    ) -> None:
        super().__init__(embedding_size, num_classes, s)
        self.m = check_range(self.label, "m", m, 0.0, 1.0)
        self.h = check_range(self.label, "h", h, 0.0, math.inf)
        self.t_alpha = check_range(
            self.label, "t_alpha", check_positive(self.label, "t_alpha", t_alpha), 0, 1, include_high=True
        )
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @staticmethod
    def safe_norms(norms: Tensor) -> Tensor:
        """Feature norms without gradient, clipped to [0.001, 100] for stability."""
        return norms.detach().clamp(0.001, 100.0)

    def update_state(self, cos_y: Tensor, norms: Tensor) -> None:
        """EMA of the batch's norm mean and (unbiased) std; the std needs two rows or more."""
        safe = self.safe_norms(norms)
        if safe.numel():
            self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * safe.mean())
        if safe.numel() > 1:
            self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * safe.std())

    def target_logit(self, cos_y: Tensor, norms_y: Tensor) -> Tensor:
        """cos(clip(theta_y + g_angular, eps, pi - eps)) - g_additive."""
        z = ((self.safe_norms(norms_y) - self.batch_mean) / (self.batch_std + ADAFACE_EPS) * self.h).clamp(
            -1, 1
        )
        g_angular = -self.m * z
        g_additive = self.m + self.m * z
        theta = cos_y.clamp(-1 + ADAFACE_EPS, 1 - ADAFACE_EPS).acos()
        return (theta + g_angular).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS).cos() - g_additive

    def extra_repr(self) -> str:
        """Sizes, scale and AdaFace's knobs."""
        return f"{super().extra_repr()}, m={self.m:g}, h={self.h:g}, t_alpha={self.t_alpha:g}"
