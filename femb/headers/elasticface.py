"""ElasticFace (Boutros et al., CVPRW 2022): ArcFace / CosFace with a margin drawn from N(m, sigma) per sample.

In training every row draws its own margin; in evaluation the margin is its mean m. The "+" variants
(ElasticFace-Arc+ / -Cos+) sort each batch's draws so the row closest to its centre (largest
cos theta_y) gets the smallest margin and the farthest the largest, as the paper states. The official
code (fdbtrs/ElasticFace, losses.py) indexes the sorted draws with the cosine order itself
(``margin[argsort]``) rather than its inverse, which matches the paper only for some orders; we
follow the paper. The arc variant uses ArcFace's monotonic continuation past theta + m >= pi.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from femb.errors import FembError
from femb.headers.arcface import arc_margin
from femb.headers.base import MarginHead, check_range


class _ElasticMargin(MarginHead):
    """Shared: draw N(m, sigma) margins per row in training (sorted by cos theta_y for "+")."""

    base_label = "elasticface"

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float,
        m: float,
        sigma: float,
        plus: bool,
        generator: torch.Generator | None,
        m_high: float,
        m_high_text: str,
    ) -> None:
        if not isinstance(plus, bool):
            raise FembError(f"head {self.base_label}: plus={plus!r} must be true or false")
        self.label = f"{self.base_label}-plus" if plus else self.base_label
        super().__init__(embedding_size, num_classes, s)
        self.m = check_range(self.label, "m", m, 0.0, m_high, high_text=m_high_text)
        self.sigma = check_range(self.label, "sigma", sigma, 0.0, math.inf)
        self.plus = plus
        self.generator = generator

    def margins(self, cos_y: Tensor) -> Tensor:
        """Per-row margins: m + sigma * N(0, 1) in training (rows in order), m in evaluation."""
        if not self.training:
            return torch.full_like(cos_y, self.m)
        device = self.generator.device if self.generator is not None else cos_y.device
        noise = torch.randn(cos_y.shape, generator=self.generator, device=device, dtype=torch.float32)
        drawn = self.m + self.sigma * noise.to(cos_y)  # drawn in float32 whatever the dtype: same stream
        if not self.plus:
            return drawn
        by_closeness = cos_y.detach().argsort(descending=True)
        return torch.empty_like(drawn).index_copy(0, by_closeness, drawn.sort().values)

    def extra_repr(self) -> str:
        """Sizes, scale and the margin distribution."""
        return f"{super().extra_repr()}, m={self.m:g}, sigma={self.sigma:g}"


class ElasticArcFace(_ElasticMargin):
    """ElasticFace-Arc: s cos(theta_y + m_i), m_i ~ N(m, sigma) per row in training."""

    base_label = "elasticface-arc"

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        sigma: float = 0.05,
        plus: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(embedding_size, num_classes, s, m, sigma, plus, generator, math.pi / 2, "pi/2")

    def target_logit(self, cos_y: Tensor, norms_y: Tensor) -> Tensor:
        """cos(theta_y + m_i)."""
        return arc_margin(cos_y, self.margins(cos_y))


class ElasticCosFace(_ElasticMargin):
    """ElasticFace-Cos: s (cos(theta_y) - m_i), m_i ~ N(m, sigma) per row in training."""

    base_label = "elasticface-cos"

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.35,
        sigma: float = 0.05,
        plus: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(embedding_size, num_classes, s, m, sigma, plus, generator, 1.0, "1")

    def target_logit(self, cos_y: Tensor, norms_y: Tensor) -> Tensor:
        """cos(theta_y) - m_i."""
        return cos_y - self.margins(cos_y)
