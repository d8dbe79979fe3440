"""CosFace / LMCL (Wang et al., CVPR 2018): an additive cosine margin on the true class, cos(theta_y) - m."""

from __future__ import annotations

from torch import Tensor

from femb.headers.base import MarginHead, check_range


class CosFace(MarginHead):
    """CosFace: s * (cos(theta_y) - m) for the true class, s * cos(theta_j) for the others."""

    label = "cosface"

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35) -> None:
        super().__init__(embedding_size, num_classes, s)
        self.m = check_range(self.label, "m", m, 0.0, 1.0)

    def target_logit(self, cos_y: Tensor, norms_y: Tensor) -> Tensor:
        """cos(theta_y) - m."""
        return cos_y - self.m

    def extra_repr(self) -> str:
        """Sizes, scale and margin."""
        return f"{super().extra_repr()}, m={self.m:g}"
