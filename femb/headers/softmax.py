"""Plain softmax: a bias-free linear classifier W x trained with cross-entropy, the baseline of the margin papers."""

from __future__ import annotations

from torch import Tensor

from femb.headers.base import MarginHead


class Softmax(MarginHead):
    """Softmax loss on un-normalised logits W_j . x (no margin, no scale, no bias).

    The "Softmax" baseline of SphereFace (Liu et al., CVPR 2017) and ArcFace (Deng et al., CVPR 2019).
    No bias, so ``weight`` is the only parameter and partial FC can shard it like the other heads.
    """

    label = "softmax"

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__(embedding_size, num_classes, 1.0)

    def similarity(self, emb: Tensor, norms: Tensor, weight: Tensor) -> Tensor:
        """Inner products W_j . x, neither side normalised."""
        return emb @ weight.t()
