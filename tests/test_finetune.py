"""Fine-tuning: `train.init_weights` (strict backbone load, fresh head) and `train.freeze_backbone_steps`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from femb.backbones import create_backbone
from femb.config import parse_params
from femb.errors import FembError
from femb.training import run
from femb.training.run import build_module, train
from femb.weights import save_backbone

EMBEDDING = 64


def params_of(shards: Path, out_dir: Path, **train_overrides) -> dict:
    """A tiny run: iresnet_tiny, batch 16, no warmup (every step moves what it trains)."""
    train_section = {
        "out_dir": str(out_dir),
        "batch_size": 16,
        "num_workers": 0,
        "max_steps": 1,
        "max_epochs": 100,
        "checkpoint_every": 100,
        "val_every": 1000,
        "lr": 0.05,
        "warmup_steps": 0,
        **train_overrides,
    }
    return {
        "backbone": "iresnet_tiny",
        "embedding_size": EMBEDDING,
        "header": "arcface",
        "data": {"shards": str(shards)},
        "train": {k: str(v) if isinstance(v, Path) else v for k, v in train_section.items()},
    }


def backbone_weights(seed: int, name: str = "iresnet_tiny", features: int = EMBEDDING) -> dict:
    """A backbone state dict unlike a fresh one: seeded weights and non-default BatchNorm statistics."""
    torch.manual_seed(seed)
    net = create_backbone(name, num_features=features)
    with torch.no_grad():
        for key, buffer in net.state_dict().items():
            if key.endswith(("running_mean", "running_var")):
                buffer.add_(torch.rand_like(buffer))
    return net


def clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fresh_head(params: dict) -> torch.Tensor:
    """The head a run of `params` starts from: `train` seeds, then builds the module."""
    parsed = parse_params(params)
    L.seed_everything(parsed.train.seed, verbose=False)
    return build_module(parsed, num_classes=40).header.weight.detach().clone()


class Snapshots(L.Callback):
    """At the start of every batch (after the freeze is applied): backbone state, head, modes."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self.at[trainer.global_step] = {
            "backbone": clone(pl_module.backbone),
            "head": pl_module.header.weight.detach().clone(),
            "training": pl_module.backbone.training,
            "requires_grad": all(p.requires_grad for p in pl_module.backbone.parameters()),
        }

    def on_train_end(self, trainer, pl_module) -> None:
        self.at["end"] = {"backbone": clone(pl_module.backbone)}


class _Stop(Exception):
    pass


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise _Stop


@pytest.mark.parametrize("layout", ["femb", "arcface_torch"])
def test_backbone_file_starts_training_bitwise_with_a_fresh_head(demo_shards, tmp_path, layout):
    net = backbone_weights(seed=11)
    path = tmp_path / "backbone.pth"
    if layout == "femb":
        save_backbone(net, path, "iresnet_tiny")  # {"backbone": name, "state_dict": ...}
    else:
        torch.save(net.state_dict(), path)  # arcface_torch: plain official keys
        assert "layer1.0.conv1.weight" in torch.load(path, weights_only=True)
    params = params_of(demo_shards, tmp_path / "run", init_weights=path)
    snapshots = Snapshots()
    train(parse_params(params), callbacks=[snapshots], progress=False)
    first = snapshots.at[0]
    assert same(first["backbone"], clone(net))  # weights and BatchNorm statistics, bitwise
    assert torch.equal(first["head"], fresh_head(params))


def test_lightning_checkpoint_as_init_gives_its_backbone_and_a_fresh_head(demo_shards, tmp_path):
    source = params_of(demo_shards, tmp_path / "source")
    train(parse_params(source), progress=False)
    ckpt = tmp_path / "source" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    params = params_of(demo_shards, tmp_path / "run", init_weights=ckpt)
    snapshots = Snapshots()
    train(parse_params(params), callbacks=[snapshots], progress=False)
    first = snapshots.at[0]
    expected = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    assert same(first["backbone"], expected)
    assert not torch.equal(first["head"], state["header.weight"])
    assert torch.equal(first["head"], fresh_head(params))


def test_frozen_backbone_is_bitwise_unchanged_under_sgd_momentum_and_weight_decay(demo_shards, tmp_path):
    net = backbone_weights(seed=5)
    path = tmp_path / "init.pth"
    torch.save(net.state_dict(), path)
    params = parse_params(
        params_of(demo_shards, tmp_path / "run", init_weights=path, freeze_backbone_steps=3, max_steps=5)
    )
    assert (params.train.optimizer, params.train.momentum, params.train.weight_decay) == ("sgd", 0.9, 5e-4)
    snapshots = Snapshots()
    train(params, callbacks=[snapshots], progress=False)
    at = snapshots.at
    initial = clone(net)
    for step in (0, 1, 2, 3):  # after 0..3 optimizer steps, the first 3 frozen: weights and BN stats
        assert same(at[step]["backbone"], initial), step
    for step in (0, 1, 2):
        assert not at[step]["training"] and not at[step]["requires_grad"]
        assert not torch.equal(at[step + 1]["head"], at[step]["head"]), step  # the head trains
    assert at[3]["training"] and at[3]["requires_grad"]  # step 3 trains everything
    assert not same(at[4]["backbone"], initial) and not same(at["end"]["backbone"], at[4]["backbone"])


def test_run_resumed_mid_freeze_keeps_freezing_and_does_not_reload_init_weights(
    demo_shards, tmp_path, monkeypatch
):
    net = backbone_weights(seed=6)
    path = tmp_path / "init.pth"
    save_backbone(net, path, "iresnet_tiny", plain=True)
    overrides = {"init_weights": path, "freeze_backbone_steps": 4, "max_steps": 6, "checkpoint_every": 2}
    params = parse_params(params_of(demo_shards, tmp_path / "run", **overrides))
    with pytest.raises(_Stop):
        train(params, callbacks=[StopAt(3)], progress=False)  # last.ckpt holds step 2
    # On resume the checkpoint supplies the weights: loading the init file again would be a bug.
    monkeypatch.setattr(run, "init_backbone", lambda *a: pytest.fail("init_weights reloaded on resume"))
    snapshots = Snapshots()
    summary = train(params, callbacks=[snapshots], progress=False)
    assert summary["resumed_from"].endswith("last.ckpt") and summary["steps"] == 6
    at = snapshots.at
    assert sorted(k for k in at if k != "end") == [2, 3, 4, 5]
    for step in (2, 3, 4):
        assert same(at[step]["backbone"], clone(net)), step
    assert not at[3]["training"] and at[4]["training"]
    assert not same(at[5]["backbone"], clone(net))


def _error(params: dict) -> str:
    with pytest.raises(FembError) as info:
        train(parse_params(params), progress=False)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_weights_of_another_architecture_are_refused_naming_the_file_and_both_sides(demo_shards, tmp_path):
    path = tmp_path / "mbf.pth"
    torch.save(backbone_weights(seed=0, name="mbf").state_dict(), path)
    message = _error(params_of(demo_shards, tmp_path / "run", init_weights=path))
    assert message.startswith(f"train.init_weights: {path}: holds mobilefacenet weights of embedding size 64")
    assert "backbone is 'iresnet_tiny' with embedding_size 64" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_weights_of_another_embedding_size_are_refused_naming_both(demo_shards, tmp_path):
    path = tmp_path / "wide.pth"
    save_backbone(backbone_weights(seed=0, features=128), path, "iresnet_tiny")
    message = _error(params_of(demo_shards, tmp_path / "run", init_weights=path))
    assert message.startswith(f"train.init_weights: {path}: holds iresnet_tiny weights of embedding size 128")
    assert message.endswith("backbone is 'iresnet_tiny' with embedding_size 64; set both to match the file")


def test_missing_or_unrecognised_init_weights_are_refused_naming_the_file(demo_shards, tmp_path):
    missing = tmp_path / "nowhere" / "backbone.pth"
    message = _error(params_of(demo_shards, tmp_path / "run", init_weights=missing))
    assert message == f"train.init_weights: {missing}: no such weights file"
    odd = tmp_path / "odd.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, odd)
    message = _error(params_of(demo_shards, tmp_path / "run", init_weights=odd))
    assert message.startswith(f"train.init_weights: {odd}: weights do not fit backbone 'iresnet_tiny'")


def test_freeze_on_several_devices_with_the_auto_strategy_asks_for_ddp(demo_shards, tmp_path):
    overrides = {"freeze_backbone_steps": 2, "accelerator": "cpu", "devices": 2}
    message = _error(params_of(demo_shards, tmp_path / "run", **overrides))
    assert message.startswith("train.freeze_backbone_steps on several devices needs train.strategy=ddp")


def test_fingerprint_follows_the_init_weights_content_and_the_freeze(demo_shards, tmp_path):
    def fingerprint(**overrides) -> str:
        return run._fingerprint(parse_params(params_of(demo_shards, tmp_path / "run", **overrides)))

    a, b, a_copy = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "copy" / "a.pth"
    torch.save(backbone_weights(seed=1).state_dict(), a)
    torch.save(backbone_weights(seed=2).state_dict(), b)
    a_copy.parent.mkdir()
    a_copy.write_bytes(a.read_bytes())
    scratch, from_a = fingerprint(), fingerprint(init_weights=a)
    assert len({scratch, from_a, fingerprint(init_weights=b)}) == 3
    assert fingerprint(init_weights=a_copy) == from_a  # the content counts, not the path
    assert fingerprint(freeze_backbone_steps=10) != scratch
    torch.save(backbone_weights(seed=3).state_dict(), a)  # the same path, changed weights
    assert fingerprint(init_weights=a) != from_a
