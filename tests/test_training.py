"""Training: outputs, exact resume after SIGKILL, divergence handling, DDP with partial FC on CPU.

Preemption, damaged checkpoints, other world sizes, rewinds and `dvc repro`: tests/test_resume.py.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from femb.config import ModelParams, OptimParams, PartialFCParams, parse_params
from femb.data.decode import normalize
from femb.errors import FembError
from femb.training.module import FaceRecognitionModule
from femb.training.run import build_module, train
from femb.weights import load_backbone

TINY = ModelParams(backbone="iresnet_tiny", embedding_size=64, head="arcface")


def small_params(shards: Path, out_dir: Path, **train_overrides) -> dict:
    train = {
        "out_dir": str(out_dir),
        "batch_size": 16,
        "num_workers": 0,
        "max_steps": 24,
        "max_epochs": 100,
        "checkpoint_every": 7,
        "val_every": 12,
        "lr": 0.05,
        "warmup_steps": 4,
        **train_overrides,
    }
    return {
        "backbone": "iresnet_tiny",
        "embedding_size": 64,
        "header": "arcface",
        "data": {"shards": str(shards)},
        "train": train,
    }


def test_training_writes_checkpoints_backbone_and_metrics(demo_shards, tmp_path):
    out = tmp_path / "run"
    summary = train(parse_params(small_params(demo_shards, out, max_steps=12)), progress=False)
    assert summary["steps"] == 12 and summary["images_per_sec"] > 0
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "checkpoints" / "best.ckpt").exists()
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {
        "train/loss",
        "train/lr",
        "train/images_per_sec",
        "val/accuracy",
        "val/demo_hard/accuracy",
    } <= columns
    accuracies = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies)
    # backbone.pth is a plain official-key state dict that arcface_torch's load_state_dict takes
    state = torch.load(out / "backbone.pth", weights_only=True)
    assert "fc.weight" in state and not any(k.startswith("backbone.") for k in state)
    assert load_backbone(out / "backbone.pth").fc.out_features == 64
    # last.ckpt says how it was trained (plain dicts), loads back as a module and as a backbone
    last = out / "checkpoints" / "last.ckpt"
    hparams = torch.load(last, weights_only=True, map_location="cpu")["hyper_parameters"]
    assert hparams["num_classes"] == 40 and hparams["model"]["head"] == "arcface"
    assert hparams["model"]["head_hparams"] == {"s": 64.0, "m": 0.5} and hparams["optim"]["lr"] == 0.05
    module = FaceRecognitionModule.load_from_checkpoint(last, map_location="cpu")
    assert module.model_params.backbone == "iresnet_tiny" and module.header.weight.shape == (40, 64)
    torch.testing.assert_close(load_backbone(last).state_dict(), module.backbone.state_dict())


_KILLABLE = textwrap.dedent(
    """
    import json, os, signal, sys
    import lightning as L
    from femb.config import parse_params
    from femb.training.run import train

    class KillAt(L.Callback):
        def __init__(self, step):
            self.step = step
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)

    params = parse_params(json.loads(sys.argv[1]))
    kill = int(sys.argv[2])
    train(params, callbacks=[KillAt(kill)] if kill >= 0 else [], progress=False)
    """
)


def _run(params: dict, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _KILLABLE, json.dumps(params), str(kill_at)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "every", "kill_at"), [(0, 7, 11), (2, 7, 11), (0, 10, 23)])
def test_killed_run_resumes_to_the_uninterrupted_weights(demo_shards, tmp_path, workers, every, kill_at):
    # 320 images / batch 16 = 20 batches per epoch: the checkpoint at step 7 is mid-epoch (with 2
    # workers, resuming 7 batches in also exercises the loader's reordering); the one at step 20 ends
    # epoch 0, so the resumed run must start epoch 1's order.
    whole = small_params(demo_shards, tmp_path / "whole", num_workers=workers, checkpoint_every=every)
    assert _run(whole, -1).returncode == 0
    cut = small_params(demo_shards, tmp_path / "cut", num_workers=workers, checkpoint_every=every)
    killed = _run(cut, kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _run(cut, -1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("last.ckpt") and summary["steps"] == 24
    a = torch.load(tmp_path / "whole" / "backbone.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "backbone.pth", weights_only=True)
    assert a.keys() == b.keys()
    # Same ops on the same inputs on one CPU: the resumed run reproduces the weights to float32 rounding.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


class _Poison(L.Callback):
    """Turns one backbone weight into NaN at a given step, as a diverging run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.backbone.fc.weight[0, 0] = float("nan")


def test_nan_loss_stops_training_naming_the_step_and_keeps_the_last_checkpoint(demo_shards, tmp_path):
    out = tmp_path / "run"
    params = parse_params(small_params(demo_shards, out, checkpoint_every=5))
    # The module names its own arguments (lr, warmup_steps); train(params) says which params keys they are.
    with pytest.raises(
        FembError,
        match=r"loss is nan at step 9 .*train\.lr=0.05.*precision.*lower train\.lr or add train\.warmup_steps",
    ):
        train(params, callbacks=[_Poison(9)], progress=False)
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 5
    assert torch.isfinite(last["state_dict"]["backbone.fc.weight"]).all()


def test_rerun_with_another_configuration_is_refused(demo_shards, tmp_path):
    out = tmp_path / "run"
    train(parse_params(small_params(demo_shards, out, max_steps=4)), progress=False)
    other = parse_params({**small_params(demo_shards, out, max_steps=4), "header": "cosface"})
    with pytest.raises(
        FembError, match=r"last\.ckpt: a checkpoint of run \w{16}, but this run's fingerprint is \w{16}"
    ):
        train(other, progress=False)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_with_partial_fc_saves_a_shard_per_rank(demo_shards, tmp_path):
    out = tmp_path / "ddp"
    sets = [
        f"--set=data.shards={demo_shards}",
        f"--set=train.out_dir={out}",
        "--set=backbone=iresnet_tiny",
        "--set=train.batch_size=16",
        "--set=train.max_steps=6",
        "--set=train.checkpoint_every=3",
        "--set=train.val_every=6",
        "--set=train.num_workers=0",
        "--set=train.accelerator=cpu",
        "--set=train.devices=2",
        "--set=train.strategy=ddp",
        "--set=train.partial_fc.enabled=true",
        "--set=train.partial_fc.sample_rate=0.5",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "femb", "train", "--params", str(tmp_path / "none.yaml"), *sets],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6
    shards = sorted(p.name for p in (out / "checkpoints" / "partial_fc").iterdir())
    # step 6 is the last and the best checkpoint, step 3 the previous one: their shards stay, no others
    assert shards == [f"step{step:09d}-rank{r}-of-2.pt" for step in (3, 6) for r in (0, 1)]
    # 40 classes over 2 ranks: 20 centres each (and their momentum), and each rank's shard differs
    rank0, rank1 = (
        torch.load(out / "checkpoints" / "partial_fc" / name, weights_only=True) for name in shards[2:]
    )
    assert rank0["classes"] == [0, 20] and rank1["classes"] == [20, 40]
    assert rank0["header"]["weight"].shape == rank1["header"]["weight"].shape == (20, 512)
    assert not torch.equal(rank0["header"]["weight"], rank1["header"]["weight"])
    assert rank0["optimizer"]["weight"]["momentum_buffer"].shape == (20, 512)


def test_checkpoint_of_another_class_count_or_model_is_refused_naming_both():
    module = FaceRecognitionModule(40, TINY)
    checkpoint = {"hyper_parameters": {**module.hparams, "num_classes": 93431}, "state_dict": {}}
    with pytest.raises(FembError, match="num_classes is 93431 in the checkpoint but 40 in this run"):
        module.on_load_checkpoint(checkpoint)
    other = {**module.hparams, "model": {**module.hparams["model"], "head": "cosface"}}
    with pytest.raises(FembError, match="head is 'cosface' in the checkpoint but 'arcface' in this run"):
        module.on_load_checkpoint({"hyper_parameters": other, "state_dict": {}})


def test_module_takes_the_validated_sections_of_params(demo_shards, tmp_path):
    params = parse_params(small_params(demo_shards, tmp_path, dropout=0.2, momentum=0.8))
    module = build_module(params, num_classes=40)
    assert module.model_params == params.model_section()
    assert module.model_params.dropout == 0.2 and module.backbone.dropout.p == 0.2
    assert module.optim == OptimParams(**{k: getattr(params.train, k) for k in OptimParams.model_fields})
    assert set(module.hparams) == {"num_classes", "model", "optim", "partial_fc"}
    json.dumps(dict(module.hparams))  # plain JSON: a checkpoint loads with weights_only


def test_partial_fc_builds_the_head_once_at_this_ranks_shard_size():
    module = FaceRecognitionModule(41, TINY, partial_fc=PartialFCParams(enabled=True, sample_rate=0.5))
    assert module.header is None  # no full 41 x 64 head: the world size is not known yet
    module.build_partial_fc(rank=1, world_size=3)
    assert module.header.weight.shape == (14, 64) and module.partial_fc.class_start == 14
    assert module._ddp_params_and_buffers_to_ignore == ["header.weight"]


def test_partial_fc_on_one_process_trains_and_resumes(demo_shards, tmp_path):
    out = tmp_path / "pfc"
    overrides = {"partial_fc": {"enabled": True, "sample_rate": 0.5}, "max_steps": 3}
    train(parse_params(small_params(demo_shards, out, **overrides)), progress=False)
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["state_dict"]["header.weight"].shape == (40, 64)
    summary = train(parse_params(small_params(demo_shards, out, **overrides)), progress=False)
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("last.ckpt")  # restored, nothing left
    module = FaceRecognitionModule.load_from_checkpoint(last, map_location="cpu")
    assert module.header.weight.shape == (40, 64)


def test_uint8_batches_are_normalised_after_transfer_in_the_backbones_dtype():
    module = FaceRecognitionModule(40, TINY)
    pixels = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    labels = torch.tensor([1, 2])
    images, same = module.on_after_batch_transfer((pixels, labels), 0)
    assert images.dtype == torch.float32 and same is labels
    torch.testing.assert_close(images, normalize(pixels))
    floats = torch.rand(2, 3, 112, 112)
    assert module.on_after_batch_transfer((floats, labels), 0)[0] is floats  # already normalised
    module.double()  # as Lightning leaves a "64-true" module
    assert module.on_after_batch_transfer((pixels, labels), 0)[0].dtype == torch.float64


def test_gradient_clipping_bounds_the_backbone_and_leaves_the_class_centres():
    module = FaceRecognitionModule(40, TINY)
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(None, gradient_clip_val=1.0)
    backbone_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in module.backbone.parameters()])
    )
    assert backbone_norm == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(module.header.weight.grad, torch.full_like(module.header.weight, 3.0))


@pytest.mark.parametrize(
    ("saved", "workers", "expected"),
    [
        ({"world_size": 1, "num_workers": 0}, 0, 3),  # the same layout: exactly where it was
        ({"world_size": 1, "num_workers": 2}, 0, 3),  # other workers: 48 samples in, 3 batches of 16
        ({"world_size": 2, "num_workers": 0}, 0, 6),  # 2 ranks x 3 batches: 96 samples, 6 batches here
        ({"world_size": 2, "num_workers": 0, "batches_done": 19}, 0, 20),  # past this epoch's 20: the next
    ],
)
def test_resume_on_another_layout_continues_as_many_samples_into_the_epoch(
    demo_shards, saved, workers, expected
):
    from femb.training.datamodule import ShardDataModule

    data = ShardDataModule(demo_shards, 16, num_workers=workers)
    data.load_state_dict({"epoch": 1, "batches_done": 3, "batch_size": 16, **saved})
    data.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    loader = data.train_dataloader()
    assert data.position == expected
    if expected < len(loader):
        assert loader.dataset.batches_skipped(1) == expected and loader.dataset.epoch == 1
    else:
        assert loader.dataset.epoch == 2 and loader.dataset.batches_skipped(2) == 0
