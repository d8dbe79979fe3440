"""MagFace (Meng et al., CVPR 2021): a margin that grows with the feature norm, plus a norm regulariser.

For a = ||x|| clipped to [l_a, u_a]: the true-class logit is s cos(theta_y + m(a)) with m(a) linear
from l_m at l_a to u_m at u_a, and the loss adds lambda_g * mean g(a), g(a) = 1/a + a/u_a^2, so the
norm learns to encode face quality. Margins follow the official code (IrvingMeng/MagFace, MagLinear),
whose default is the "easy margin": rows with cos(theta_y) <= 0 keep cos(theta_y).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from femb.errors import FembError
from femb.headers.arcface import arc_margin
from femb.headers.base import EPS, MarginHead, check_positive, check_range


def min_lambda_g(s: float, l_a: float, u_a: float, l_m: float, u_m: float) -> float:
    """Smallest lambda_g for which MagFace's loss has its optimum a* inside [l_a, u_a].

    MagFace (Sec. 3.3 and supplementary; checked by the official run/trainer.py) needs the pull of
    lambda_g g'(a) at l_a to beat the push of the margin: the cross-entropy gradient in a is at most
    s m'(a) = s k, k = (u_m - l_m)/(u_a - l_a), and |g'(l_a)| = 1/l_a^2 - 1/u_a^2, so
    lambda_g >= s k u_a^2 l_a^2 / (u_a^2 - l_a^2). With the defaults this is 22.6 (< 35).
    """
    k = (u_m - l_m) / (u_a - l_a)
    return s * k * u_a**2 * l_a**2 / (u_a**2 - l_a**2)


class MagFace(MarginHead):
    """MagFace: s cos(theta_y + m(a)) for the true class, loss += lambda_g * mean(1/a + a/u_a^2)."""

    label = "magface"

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
    ) -> None:
        super().__init__(embedding_size, num_classes, s)
        self.l_a = check_positive(self.label, "l_a", l_a)
        self.u_a = check_positive(self.label, "u_a", u_a)
        if self.l_a >= self.u_a:
            raise FembError(
                f"head {self.label}: l_a={l_a!r} must be below u_a={u_a!r} (the feature-norm range)"
            )
        self.l_m = check_range(self.label, "l_m", l_m, 0.0, math.pi / 2, high_text="pi/2")
        self.u_m = check_range(self.label, "u_m", u_m, 0.0, math.pi / 2, high_text="pi/2")
        if self.l_m >= self.u_m:
            raise FembError(f"head {self.label}: l_m={l_m!r} must be below u_m={u_m!r} (the margin range)")
        self.lambda_g = check_positive(self.label, "lambda_g", lambda_g)
        bound = min_lambda_g(self.s, self.l_a, self.u_a, self.l_m, self.u_m)
        if self.lambda_g < bound:
            raise FembError(
                f"head {self.label}: lambda_g={lambda_g!r} is below the MagFace bound "
                f"s*k*u_a^2*l_a^2/(u_a^2-l_a^2) = {bound:.4g} (k=(u_m-l_m)/(u_a-l_a)); raise lambda_g"
            )
        if not isinstance(easy_margin, bool):
            raise FembError(f"head {self.label}: easy_margin={easy_margin!r} must be true or false")
        self.easy_margin = easy_margin

    def margin(self, a: Tensor) -> Tensor:
        """m(a) = l_m + (u_m - l_m)(a - l_a)/(u_a - l_a) for a clipped norm a."""
        return self.l_m + (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a)

    def target_logit(self, cos_y: Tensor, norms_y: Tensor) -> Tensor:
        """cos(theta_y + m(a)); easy margin keeps cos(theta_y) where it is <= 0."""
        m = self.margin(norms_y.clamp(self.l_a, self.u_a))
        if not self.easy_margin:
            return arc_margin(cos_y, m)
        shifted = (cos_y.clamp(-1 + EPS, 1 - EPS).acos() + m).cos()
        return torch.where(cos_y > 0, shifted, cos_y)

    def regulariser(self, norms: Tensor) -> Tensor:
        """lambda_g * mean over the batch of g(a) = 1/a + a/u_a^2."""
        a = norms.clamp(self.l_a, self.u_a)
        return self.lambda_g * (1.0 / a + a / self.u_a**2).mean()

    def extra_repr(self) -> str:
        """Sizes, scale and the MagFace ranges."""
        return (
            f"{super().extra_repr()}, a=[{self.l_a:g}, {self.u_a:g}], m=[{self.l_m:g}, {self.u_m:g}], "
            f"lambda_g={self.lambda_g:g}, easy_margin={self.easy_margin}"
        )
