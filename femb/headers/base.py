"""The shared margin-head machinery: class centres, cosines in at least float32, the target scatter, scale, loss.

Every margin head (SphereFace, CosFace, ArcFace, MagFace, ElasticFace, CurricularFace, AdaFace) is
``s * f(cos theta_y)`` for the true class and ``s * cos theta_j`` (or a re-weighting of it) for the
others, trained with cross-entropy. This base owns all of that; a head only says what ``f`` is
(docs/architecture.md "Heads").
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from femb.errors import FembError

# Cosines are clamped this far inside [-1, 1] before acos: d acos / dx is infinite at +-1.
EPS = 1e-7

# In labels, "this row's class is not among these centres" (arcface_torch partial FC's marker).
NO_TARGET = -1


def _number(head: str, name: str, value: object) -> float:
    """Return a hyper-parameter as a float, or say which one is not a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise FembError(f"head {head}: {name}={value!r} is not a finite number")
    return float(value)


def check_positive(head: str, name: str, value: object) -> float:
    """Return value if it is a finite number > 0, else raise FembError naming head and parameter."""
    number = _number(head, name, value)
    if number <= 0:
        raise FembError(f"head {head}: {name}={value!r} must be > 0")
    return number


def check_range(
    head: str,
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    high_text: str | None = None,
    include_high: bool = False,
) -> float:
    """Return value if low <= value < high (or <= high), else raise FembError naming head and range."""
    number = _number(head, name, value)
    inside = low <= number and (number <= high if include_high else number < high)
    if not inside:
        bracket = "]" if include_high else ")"
        raise FembError(
            f"head {head}: {name}={value!r} is outside [{low:g}, {high_text or f'{high:g}'}{bracket}"
        )
    return number


def check_int(head: str, name: str, value: object, low: int) -> int:
    """Return value if it is an integer >= low, else raise FembError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise FembError(f"head {head}: {name}={value!r} must be an integer >= {low}")
    return int(value)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a head computes in: that of its inputs, promoted to at least float32 (never demoted)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


class MarginHead(nn.Module):
    """Cosine classifier with a per-head target-logit function, trained with cross-entropy.

    ``forward(emb, labels)`` returns ``s * logits`` of shape (B, C), where the true-class entry is
    ``target_logit(cos theta_y)`` and the rest are ``negative_logits(cos theta_j)`` (``cos theta_j``
    unless a head re-weights them). Everything is computed in the embeddings' and centres' dtype
    promoted to at least float32 (bf16 inputs: float32; a float64 head: float64), even under autocast.
    The feature norms ||x|| are computed once per pass and handed to the heads that use them.
    A label of -1 leaves its row without margin: partial FC passes a shard of the centres
    (``weight=``) with labels remapped to that shard and -1 where the class lives elsewhere.
    """

    label: ClassVar[str] = "margin"

    def __init__(self, embedding_size: int, num_classes: int, s: float) -> None:
        super().__init__()
        self.embedding_size = check_int(self.label, "embedding_size", embedding_size, 1)
        self.num_classes = check_int(self.label, "num_classes", num_classes, 1)
        self.s = check_positive(self.label, "s", s)
        # arcface_torch initialises class centres N(0, 0.01); only their direction matters here.
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size).normal_(0.0, 0.01))

    # ---- what a head overrides -------------------------------------------------------------------

    def target_logit(self, cos_y: Tensor, norms_y: Tensor) -> Tensor:
        """Margin-adjusted true-class cosine f(cos theta_y) per row (B',); identity for plain softmax."""
        return cos_y

    def negative_logits(self, cos: Tensor, rows: Tensor, cos_y: Tensor) -> Tensor:
        """Non-target logits before scaling; ``rows`` are the rows of ``cos`` whose true-class cosines are ``cos_y``."""
        return cos

    def scale(self, norms: Tensor) -> Tensor | float:
        """Logit scale: the fixed s (a head may use the feature norm instead)."""
        return self.s

    def update_state(self, cos_y: Tensor, norms: Tensor) -> None:
        """Update running statistics from one training batch (detached; called before the margins)."""

    def regulariser(self, norms: Tensor) -> Tensor:
        """Head-specific loss term added to cross-entropy (MagFace's lambda_g * g(a)); zero by default."""
        return norms.new_zeros(())

    def similarity(self, emb: Tensor, norms: Tensor, weight: Tensor) -> Tensor:
        """(B, C) cosines between embeddings (of feature norms ``norms``) and class centres."""
        unit = emb / norms.clamp_min(1e-12).unsqueeze(1)  # F.normalize, reusing the norms
        return (unit @ F.normalize(weight, dim=1).t()).clamp(-1.0, 1.0)

    # ---- the shared machinery --------------------------------------------------------------------

    def _check(self, emb: Tensor, labels: Tensor | None, weight: Tensor, allow_no_target: bool) -> None:
        """Refuse embeddings or labels that do not fit this head, naming both sizes."""
        if emb.dim() != 2:
            raise FembError(
                f"head {self.label}: embeddings must be (batch, {weight.shape[1]}), got shape {tuple(emb.shape)}"
            )
        if emb.shape[1] != weight.shape[1]:
            raise FembError(
                f"head {self.label}: embedding size {emb.shape[1]} does not match the head's "
                f"embedding_size {weight.shape[1]}"
            )
        if labels is None:
            return
        if labels.shape != (emb.shape[0],):
            raise FembError(
                f"head {self.label}: labels must have shape ({emb.shape[0]},) to match the embeddings, "
                f"got {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise FembError(f"head {self.label}: labels must be integer class indices, got {labels.dtype}")
        if labels.is_cuda:
            return  # a value check would stall the GPU every step; cross_entropy asserts on the device instead
        low = NO_TARGET if allow_no_target else 0
        bad = (labels < low) | (labels >= weight.shape[0])
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            allowed = f"[0, {weight.shape[0]}) or -1" if allow_no_target else f"[0, {weight.shape[0]})"
            raise FembError(
                f"head {self.label}: label {int(labels[row])} at row {row} is outside {allowed} "
                f"(num_classes={weight.shape[0]})"
            )

    def feature_norms(self, emb: Tensor) -> Tensor:
        """Per-row L2 norm of the raw embeddings, in at least float32 (MagFace's a, AdaFace's ||z||, SphereFace's s)."""
        self._check(emb, None, self.weight, True)
        return self._norms(emb)

    def _norms(self, emb: Tensor) -> Tensor:
        """feature_norms() for checked embeddings."""
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return emb.to(compute_dtype(emb, self.weight)).norm(dim=1)

    def cosine(self, emb: Tensor, weight: Tensor | None = None) -> Tensor:
        """(B, C) cosines to the centres (softmax: inner products), no margin or scale; for accuracy."""
        weight = self.weight if weight is None else weight
        self._check(emb, None, weight, True)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            dtype = compute_dtype(emb, weight)
            emb = emb.to(dtype)
            return self.similarity(emb, emb.norm(dim=1), weight.to(dtype))

    def forward(
        self, emb: Tensor, labels: Tensor, weight: Tensor | None = None, norms: Tensor | None = None
    ) -> Tensor:
        """Scaled, margin-adjusted logits (B, C); ``weight`` replaces the centres and ``norms`` the
        feature norms (partial FC passes both: a shard of the centres, the gathered norms)."""
        weight = self.weight if weight is None else weight
        self._check(emb, labels, weight, True)
        return self._logits(emb, labels.long(), weight, norms)

    def _logits(self, emb: Tensor, labels: Tensor, weight: Tensor, norms: Tensor | None = None) -> Tensor:
        """forward() for checked inputs."""
        with torch.autocast(device_type=emb.device.type, enabled=False):
            dtype = compute_dtype(emb, weight)
            emb = emb.to(dtype)
            norms = emb.norm(dim=1) if norms is None else norms.to(dtype)
            cos = self.similarity(emb, norms, weight.to(dtype))
            rows = (labels != NO_TARGET).nonzero().squeeze(1)
            cols = labels[rows]
            cos_y = cos[rows, cols]
            if self.training:
                with torch.no_grad():
                    self.update_state(cos_y.detach(), norms.detach())
            target = self.target_logit(cos_y, norms[rows])
            logits = self.negative_logits(cos, rows, cos_y).index_put((rows, cols), target)
            scale = self.scale(norms)
            return logits * (scale.unsqueeze(1) if isinstance(scale, Tensor) else scale)

    def extra_loss(self, emb: Tensor) -> Tensor:
        """The head-specific loss term for these embeddings alone (0 except MagFace)."""
        return self.regulariser(self.feature_norms(emb))

    def logits_and_loss(self, emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """One training pass: the logits and cross-entropy plus the head's extra term (norms and state once)."""
        self._check(emb, labels, self.weight, False)
        labels, norms = labels.long(), self._norms(emb)
        logits = self._logits(emb, labels, self.weight, norms)
        return logits, F.cross_entropy(logits, labels) + self.regulariser(norms)

    def loss(self, emb: Tensor, labels: Tensor) -> Tensor:
        """Scalar training loss: cross-entropy of the margin logits plus any head-specific term."""
        return self.logits_and_loss(emb, labels)[1]

    def extra_repr(self) -> str:
        """Printed by nn.Module: which head, its sizes and scale."""
        return f"{self.label}, embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s:g}"
