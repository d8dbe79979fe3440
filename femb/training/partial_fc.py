"""Partial FC (An et al., "Killing Two Birds with One Stone", CVPR 2022; InsightFace PartialFC v2).

The class-centre matrix is split across ranks; every rank scores the embeddings of the whole global
batch against its own shard, keeping every positive centre and a random `sample_rate` fraction of the
negatives, and the softmax is normalised across ranks. With `sample_rate=1` the loss and gradients are
those of the full classifier. It also runs as one process (world size 1), where only sampling remains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from femb.headers.base import NO_TARGET, MarginHead, compute_dtype


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the classes held by `rank`: the first `num_classes % world_size` ranks hold one more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's tensor; the backward returns this rank's slice of the summed gradient.

    The slice is multiplied by the world size because DDP then averages the backbone gradients over
    ranks while every rank's loss is already the mean over the whole global batch.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        world_size = dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows] * world_size


def _gather_labels(labels: Tensor) -> Tensor:
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)


class _DistSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits whose classes are split across ranks (label -1: class held elsewhere)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, distributed: bool) -> Tensor:  # type: ignore[override]
        logits = logits.to(compute_dtype(logits))
        row_max = logits.max(dim=1, keepdim=True).values
        if distributed:
            dist.all_reduce(row_max, dist.ReduceOp.MAX)
        row_sum = (logits - row_max).exp().sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(row_sum)
        log_z = row_max + row_sum.log()
        rows = (labels != NO_TARGET).nonzero().squeeze(1)
        target = logits.new_zeros(logits.shape[0])
        target[rows] = logits[rows, labels[rows]]
        if distributed:
            dist.all_reduce(target)
        ctx.save_for_backward((logits - log_z).exp(), labels, rows)
        return (log_z.squeeze(1) - target).mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        probs, labels, rows = ctx.saved_tensors
        grad_logits = probs.clone()
        grad_logits[rows, labels[rows]] -= 1.0
        return grad_logits * (grad / probs.shape[0]), None, None


class PartialFC:
    """The margin-head loss over a rank's shard of class centres, with sampled negatives.

    `head` holds only this rank's shard: ``build_header(name, D, end - start)`` for ``shard_range``. Call it with the
    rank's own embeddings and global labels; it gathers the global batch itself. Not an nn.Module:
    the head's parameters stay where they are (kept out of DDP's gradient sync by the caller).
    """

    def __init__(
        self,
        head: MarginHead,
        num_classes: int,
        sample_rate: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.head = head
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.rank, self.world_size = rank, world_size
        self.class_start, class_end = shard_range(num_classes, rank, world_size)
        if head.weight.shape[0] != class_end - self.class_start:
            raise ValueError(
                f"rank {rank} of {world_size} must hold {class_end - self.class_start} of "
                f"{num_classes} class centres, the head holds {head.weight.shape[0]}"
            )

    def sample(self, local_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Indices of the centres to score (every positive, then random negatives) and remapped labels."""
        num_local = self.head.weight.shape[0]
        num_sample = int(self.sample_rate * num_local)
        if num_sample >= num_local or not self.head.training:
            return torch.arange(num_local, device=local_labels.device), local_labels
        positives = torch.unique(local_labels[local_labels != NO_TARGET])
        score = torch.rand(num_local, device=local_labels.device)
        score[positives] = 2.0
        index = score.topk(max(num_sample, positives.numel())).indices.sort().values
        remapped = torch.full_like(local_labels, NO_TARGET)
        held = local_labels != NO_TARGET
        remapped[held] = torch.searchsorted(index, local_labels[held])
        return index, remapped

    def loss(self, emb: Tensor, labels: Tensor) -> Tensor:
        """Distributed cross-entropy of the margin logits plus the head's own term on this rank's rows.

        The feature norms are computed once, on this rank's rows, and gathered with the embeddings;
        the head's own term (MagFace's regulariser) uses the local norms, outside the gather.
        """
        distributed = _distributed(self.world_size)
        norms = self.head.feature_norms(emb)
        all_emb = _AllGather.apply(emb) if distributed else emb
        all_norms = _AllGather.apply(norms) if distributed else norms
        all_labels = _gather_labels(labels) if distributed else labels
        local = all_labels - self.class_start
        local[(local < 0) | (local >= self.head.weight.shape[0])] = NO_TARGET
        index, remapped = self.sample(local)
        weight = self.head.weight if index.numel() == self.head.weight.shape[0] else self.head.weight[index]
        logits = self.head(all_emb, remapped, weight=weight, norms=all_norms)
        return _DistSoftmaxCrossEntropy.apply(logits, remapped, distributed) + self.head.regulariser(norms)


def optimizer_indices(named_parameters: Iterable[tuple[str, Tensor]], optimizer: Optimizer) -> dict[str, int]:
    """Where each named parameter sits in `optimizer.state_dict()["state"]`: torch numbers them in group order."""
    position = {
        id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])
    }
    return {name: position[id(p)] for name, p in named_parameters if id(p) in position}


def take_rows(blocks: Sequence[tuple[int, int, Mapping[str, Any]]], start: int, end: int) -> dict[str, Any]:
    """Classes [start, end) from consecutive ranks' shards `(first class, end class, state)`, re-partitioned.

    A 2-D tensor with a row per class of its shard is per class (`weight`, its SGD momentum, AdamW's
    moments): those rows are cut and joined in class order, bit for bit. Anything else (AdamW's step count, CurricularFace's t, AdaFace's
    statistics, all equal on every rank) comes from the first shard.
    """
    blocks = [block for block in blocks if block[0] < end and block[1] > start] or list(blocks[:1])
    first_start, first_end, first = blocks[0]
    merged: dict[str, Any] = {}
    for key, value in first.items():
        if not (isinstance(value, Tensor) and value.dim() == 2 and value.shape[0] == first_end - first_start):
            merged[key] = value
            continue
        parts = [state[key][max(start, lo) - lo : min(end, hi) - lo] for lo, hi, state in blocks]
        merged[key] = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
    return merged
