"""Partial FC: sharded, sampled class centres give the full classifier's loss and gradients."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from femb.headers import build_header
from femb.training.partial_fc import PartialFC, optimizer_indices, shard_range, take_rows

EMB, CLASSES, BATCH = 16, 11, 6


def make_inputs(seed: int, world_size: int):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(world_size * BATCH, EMB, generator=gen)
    labels = torch.randint(0, CLASSES, (world_size * BATCH,), generator=gen)
    weight = torch.randn(CLASSES, EMB, generator=gen) * 0.1
    return emb, labels, weight


def full_reference(name: str, emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor):
    head = build_header(name, EMB, CLASSES)
    head.weight.data.copy_(weight)
    emb = emb.clone().requires_grad_(True)
    loss = head.loss(emb, labels)
    loss.backward()
    return loss.detach(), emb.grad, head.weight.grad


def test_shard_range_splits_every_class_once():
    for world_size in (1, 2, 3, 7):
        ranges = [shard_range(CLASSES, r, world_size) for r in range(world_size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == CLASSES
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [end - start for start, end in ranges]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("name", ["arcface", "cosface", "magface"])
def test_single_process_with_rate_one_equals_full_classifier(name):
    emb, labels, weight = make_inputs(0, 1)
    ref_loss, ref_emb_grad, ref_weight_grad = full_reference(name, emb, labels, weight)
    head = build_header(name, EMB, CLASSES)
    head.weight.data.copy_(weight)
    emb = emb.clone().requires_grad_(True)
    loss = PartialFC(head, CLASSES, sample_rate=1.0).loss(emb, labels)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(emb.grad, ref_emb_grad)
    torch.testing.assert_close(head.weight.grad, ref_weight_grad)


def test_sampling_keeps_every_positive_and_only_updates_sampled_centres():
    torch.manual_seed(0)
    head = build_header("arcface", EMB, 100)
    pfc = PartialFC(head, 100, sample_rate=0.2)
    labels = torch.tensor([3, 3, 50, 97, 12, 0])
    emb = torch.randn(6, EMB, requires_grad=True)
    loss = pfc.loss(emb, labels)
    loss.backward()
    touched = head.weight.grad.abs().sum(dim=1) > 0
    assert int(touched.sum()) == 20
    assert touched[labels].all()
    assert torch.isfinite(loss) and emb.grad.abs().sum() > 0


def test_sampling_is_off_in_eval_mode():
    head = build_header("cosface", EMB, 100).eval()
    index, remapped = PartialFC(head, 100, sample_rate=0.1).sample(torch.tensor([5, 7]))
    assert index.numel() == 100 and remapped.tolist() == [5, 7]


def test_invalid_sample_rate_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\], got 0.0"):
        PartialFC(build_header("arcface", EMB, CLASSES), CLASSES, sample_rate=0.0)


def test_head_of_the_wrong_shard_size_is_refused():
    with pytest.raises(ValueError, match="must hold 6 of 11"):
        PartialFC(build_header("arcface", EMB, CLASSES), CLASSES, rank=0, world_size=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world_size: int, port: int, name: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        emb, labels, weight = make_inputs(0, world_size)
        start, end = shard_range(CLASSES, rank, world_size)
        head = build_header(name, EMB, end - start)
        head.weight.data.copy_(weight[start:end])
        local = slice(rank * BATCH, (rank + 1) * BATCH)
        local_emb = emb[local].clone().requires_grad_(True)
        loss = PartialFC(head, CLASSES, 1.0, rank, world_size).loss(local_emb, labels[local])
        loss.backward()
        torch.save(
            {"loss": loss.detach(), "emb_grad": local_emb.grad, "weight_grad": head.weight.grad},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["arcface", "magface"])
def test_two_gloo_ranks_equal_the_full_classifier(tmp_path, name):
    world_size = 2
    mp.spawn(_rank_worker, args=(world_size, _free_port(), name, str(tmp_path)), nprocs=world_size)
    emb, labels, weight = make_inputs(0, world_size)
    # DDP averages each rank's loss; the reference is one process over the whole global batch.
    # Tolerances allow for float32 sums taken in another order across the two shards.
    ce_only = full_reference(name, emb, labels, weight)
    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        start, end = shard_range(CLASSES, rank, world_size)
        local = slice(rank * BATCH, (rank + 1) * BATCH)
        head = build_header(name, EMB, CLASSES)
        extra_local = head.extra_loss(emb[local])
        extra_global = head.extra_loss(emb)
        # Each rank adds the head's own term for its rows; the cross-entropy part is the global mean.
        torch.testing.assert_close(got["loss"] - extra_local, ce_only[0] - extra_global, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["weight_grad"], ce_only[2][start:end], rtol=1e-4, atol=1e-5)
        # Gradients are scaled by the world size so that DDP's average over ranks gives the full gradient.
        ref_local = ce_only[1][local]
        ddp_average = got["emb_grad"] / world_size
        if name == "magface":
            # the regulariser term is per-rank (DDP averages it); remove it from both sides
            e = emb[local].clone().requires_grad_(True)
            head.extra_loss(e).backward()
            e2 = emb.clone().requires_grad_(True)
            head.extra_loss(e2).backward()
            ddp_average = (got["emb_grad"] - e.grad) / world_size
            ref_local = ref_local - e2.grad[local]
        torch.testing.assert_close(ddp_average, ref_local, rtol=1e-4, atol=1e-5)


def _shards(state: dict, world_size: int) -> list[tuple[int, int, dict]]:
    """`state` (per-class 2-D tensors and a scalar) split as `world_size` ranks hold it."""
    blocks = []
    for rank in range(world_size):
        start, end = shard_range(CLASSES, rank, world_size)
        blocks.append((start, end, {k: v[start:end] if v.dim() == 2 else v for k, v in state.items()}))
    return blocks


@pytest.mark.parametrize(("saved", "now"), [(2, 1), (1, 2), (3, 2), (2, 3), (4, 4), (1, 7)])
def test_repartitioned_centres_and_optimizer_state_are_the_full_matrix_bit_for_bit(saved, now):
    gen = torch.Generator().manual_seed(saved * 10 + now)
    full = {
        "exp_avg": torch.randn(CLASSES, EMB, generator=gen),
        "exp_avg_sq": torch.rand(CLASSES, EMB, generator=gen),
        "step": torch.tensor(17.0),  # AdamW's step count: the same on every rank, not cut
    }
    blocks = _shards(full, saved)
    parts = [take_rows(blocks, *shard_range(CLASSES, rank, now)) for rank in range(now)]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(torch.cat([p[key] for p in parts]), full[key])
    for rank, part in enumerate(parts):
        start, end = shard_range(CLASSES, rank, now)
        assert part["exp_avg"].shape == (end - start, EMB) and part["step"] is full["step"]


def test_optimizer_indices_follow_torch_numbering_across_parameter_groups():
    head = build_header("arcface", EMB, CLASSES)
    other = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(
        [{"params": [other.weight]}, {"params": [head.weight, other.bias], "weight_decay": 0.0}], lr=0.1
    )
    indices = optimizer_indices([("header.weight", head.weight), ("bias", other.bias)], optimizer)
    assert indices == {"header.weight": 1, "bias": 2}
    assert sorted(optimizer.state_dict()["param_groups"][1]["params"]) == [1, 2]
