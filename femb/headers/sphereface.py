"""SphereFace / A-Softmax (Liu et al., CVPR 2017): a multiplicative angular margin psi(theta_y) = cos(m theta_y).

The true-class logit is ||x|| * (lambda cos(theta_y) + psi(theta_y)) / (1 + lambda), with the monotonic
psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi/m, (k+1) pi/m], and lambda annealed from
``base`` down to ``lambda_min`` as in the official A-Softmax layer (wy1iu/sphereface,
margin_inner_product_layer): lambda_t = max(lambda_min, base (1 + gamma t)^-power), t the training step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from femb.headers.base import EPS, MarginHead, check_int, check_positive, check_range


def chebyshev(cos: Tensor, m: int) -> Tensor:
    """cos(m theta) as the Chebyshev polynomial T_m(cos theta): exact, with finite gradients at +-1."""
    previous, current = torch.ones_like(cos), cos
    for _ in range(m - 1):
        previous, current = current, 2 * cos * current - previous
    return current if m > 0 else previous


class SphereFace(MarginHead):
    """A-Softmax: the annealed psi(theta_y) margin, scaled by the feature norm ||x|| (or a fixed s).

    The paper and the official code scale by each feature's own norm (weights are normalised,
    features are not): that is the default (``s=None``) and it trains. A fixed ``s`` (as the
    normalised-feature heads use) is accepted for experiments. With ||x|| = 1 and no s the logits
    would live in [-1, 1] and the softmax could not become confident, so that is not offered.
    """

    label = "sphereface"

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        m: int = 4,
        s: float | None = None,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
    ) -> None:
        super().__init__(embedding_size, num_classes, 1.0 if s is None else s)
        self.feature_scale = s is None
        self.m = check_int(self.label, "m", m, 1)
        self.base = check_positive(self.label, "base", base)
        self.gamma = check_range(self.label, "gamma", gamma, 0.0, math.inf)
        self.power = check_range(self.label, "power", power, 0.0, math.inf)
        self.lambda_min = check_range(self.label, "lambda_min", lambda_min, 0.0, math.inf)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def current_lambda(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """lambda_t = max(lambda_min, base (1 + gamma t)^-power) for the steps trained so far, in `dtype`."""
        decayed = self.base * (1.0 + self.gamma * self.iteration.to(dtype)) ** (-self.power)
        return decayed.clamp(min=self.lambda_min)

    def update_state(self, cos_y: Tensor, norms: Tensor) -> None:
        """Count one training step (as the official layer, before computing lambda)."""
        self.iteration += 1

    def target_logit(self, cos_y: Tensor, norms_y: Tensor) -> Tensor:
        """(lambda cos(theta_y) + psi(theta_y)) / (1 + lambda)."""
        with torch.no_grad():
            theta = cos_y.clamp(-1 + EPS, 1 - EPS).acos()
            k = (self.m * theta / math.pi).floor().clamp(0, self.m - 1)
        psi = (1 - 2 * (k % 2)) * chebyshev(cos_y, self.m) - 2 * k
        lam = self.current_lambda(cos_y.dtype)
        return (lam * cos_y + psi) / (1 + lam)

    def scale(self, norms: Tensor) -> Tensor | float:
        """||x|| per row (A-Softmax) unless a fixed s was given."""
        return norms if self.feature_scale else self.s

    def extra_repr(self) -> str:
        """Sizes, scale and the margin schedule."""
        scale = "s=||x||" if self.feature_scale else f"s={self.s:g}"
        return (
            f"{self.label}, embedding_size={self.embedding_size}, num_classes={self.num_classes}, {scale}, "
            f"m={self.m}, lambda=max({self.lambda_min:g}, {self.base:g}(1+{self.gamma:g}t)^-{self.power:g})"
        )
