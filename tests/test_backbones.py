"""Backbones: official arcface_torch layout, forward behaviour, registry."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from femb.backbones import IBasicBlock, IResNet, create_backbone, list_backbones
from femb.errors import FembError

OFFICIAL_KEYS = Path(__file__).parent / "fixtures" / "official_keys"


def official_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) in state_dict order, as written by tests/fixtures/official_keys/make_official_keys.py."""
    rows = []
    for line in (OFFICIAL_KEYS / f"{name}.txt").read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(d) for d in shape.split(",")) if shape else ()))
    return rows


def layout(name: str, **kwargs) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = create_backbone(name, **kwargs)
    return [(key, tuple(t.shape)) for key, t in model.state_dict().items()]


def calibrated(model: nn.Module, seed: int = 0) -> nn.Module:
    """Set BatchNorm running stats from one random batch so eval outputs are O(1), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 112, 112, generator=gen))
    return model.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "ours, official", [("iresnet50", "r50"), ("iresnet100", "r100"), ("r18", "r18"), ("mbf", "mbf")]
)
def test_state_dict_keys_and_shapes_equal_official_layout(ours, official):
    assert layout(ours) == official_layout(official)


def test_r200_has_official_block_counts_and_key_count():
    keys = [k for k, _ in layout("r200")]
    blocks = [len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    assert blocks == [6, 26, 60, 6]
    # 18 entries per block, 6 per stage projection, 19 for stem and head (see make_official_keys.py)
    assert len(keys) == 18 * sum(blocks) + 6 * 4 + 19


def test_num_features_sets_fc_and_features_shapes():
    shapes = dict(layout("r34", num_features=128))
    assert shapes["fc.weight"] == (128, 512 * 7 * 7)
    assert shapes["features.running_mean"] == (128,)
    assert dict(layout("mbf", num_features=128))["features.layers.2.weight"] == (128, 512)


def test_every_batchnorm_uses_official_eps():
    model = create_backbone("r18")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2 + 3 * 8 + 4 + 1
    assert all(m.eps == 1e-5 and m.momentum == 0.1 for m in norms)


def test_first_block_of_each_stage_strides_two_with_projection():
    model = create_backbone("r34")
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        first, *rest = stage
        assert first.conv2.stride == (2, 2) and first.conv1.stride == (1, 1)
        assert first.downsample[0].stride == (2, 2) and first.downsample[0].kernel_size == (1, 1)
        assert all(b.conv2.stride == (1, 1) and b.downsample is None for b in rest)


def test_features_batchnorm_weight_is_fixed_to_one():
    model = create_backbone("r18")
    assert torch.equal(model.features.weight, torch.ones(512))
    assert not model.features.weight.requires_grad
    assert model.features.bias.requires_grad
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.features.weight) not in trainable


@pytest.fixture(scope="module")
def r18() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A calibrated IResNet-18 (64-d), a batch of two images and its float32 eval output."""
    model = calibrated(create_backbone("r18", num_features=64))
    x = images(2)
    with torch.no_grad():
        return model, x, model(x)


def test_iresnet_output_is_n_by_num_features_at_112_and_deterministic(r18):
    model, x, expected = r18
    assert expected.shape == (2, 64) and expected.dtype == torch.float32 and torch.isfinite(expected).all()
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_mobilefacenet_output_is_n_by_512_at_112():
    model = calibrated(create_backbone("mbf"))
    with torch.no_grad():
        out = model(images(2))
    assert out.shape == (2, 512) and torch.isfinite(out).all()


def test_dropout_follows_flattened_bn2_in_training_only(r18):
    model = copy.deepcopy(r18[0])
    model.dropout.p = 0.5
    seen = {}
    model.bn2.register_forward_hook(lambda m, args, out: seen.update(bn2=out.flatten(1)))
    model.fc.register_forward_pre_hook(lambda m, args: seen.update(fc=args[0]))
    with torch.no_grad():
        assert torch.equal(model(r18[1]), r18[2])  # eval: dropout is the identity
        model.train()(r18[1])
    kept = seen["fc"] != 0
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(seen["fc"][kept], 2 * seen["bn2"][kept])


def test_channels_last_gives_the_same_output(r18):
    model, x, expected = r18
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = model(x.contiguous(memory_format=torch.channels_last))
    # Other kernels, other float32 summation orders through 18 layers: seen up to 5e-4 on one of 128.
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_bfloat16_autocast_runs_and_stays_close_to_float32(r18):
    model, x, expected = r18
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.float(), expected).min() > 0.99


@pytest.mark.slow
def test_gradient_checkpointing_gives_same_output_grads_and_running_stats():
    plain = create_backbone("r18", num_features=16)
    ckpt = create_backbone("r18", num_features=16, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    ckpt.layer2[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = images(2)
    outputs = []
    for model in (plain, ckpt):
        model.train()
        out = model(x)
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        outputs.append(out.detach())
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing really ran
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), f"{name} differs: the recomputation updated running stats again"


def test_zero_init_residual_makes_blocks_identity():
    model = create_backbone("r18", zero_init_residual=True).eval()
    block = model.layer1[1]
    assert isinstance(block, IBasicBlock)
    x = torch.randn(2, 64, 56, 56)
    with torch.no_grad():
        assert torch.equal(block(x), x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_autocast_and_channels_last_on_cuda_match_float32():
    model = calibrated(create_backbone("r50")).cuda()
    x = images(4).cuda()
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16):
            got = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.float(), expected).min() > 0.999


def test_strict_load_of_state_dict_with_official_keys():
    gen = torch.Generator().manual_seed(0)
    state = {key: torch.rand(shape, generator=gen) + 0.5 for key, shape in official_layout("r18")}
    for key in state:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
    model = create_backbone("r18")
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.features.running_var, state["features.running_var"])


def test_aliases_build_the_same_architecture():
    assert layout("r50") == layout("iresnet50")
    assert layout("mbf") == layout("mobilefacenet")
    assert isinstance(create_backbone("R18"), IResNet)


def test_list_backbones_names_every_depth_and_mobilefacenet():
    names = list_backbones()
    assert names[:5] == ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200"]
    assert "mobilefacenet" in names and "r100" not in names
    assert {"r18", "r34", "r50", "r100", "r200", "mbf"} <= set(list_backbones(aliases=True))


def test_unknown_backbone_error_lists_valid_names():
    with pytest.raises(FembError, match=r"backbone 'r51' is not known; choose one of r18 \(iresnet18\).*mbf"):
        create_backbone("r51")


def test_unknown_argument_error_names_it_and_the_valid_ones():
    with pytest.raises(
        FembError, match=r"takes no argument 'dropot'; its arguments are num_features, dropout"
    ):
        create_backbone("r50", dropot=0.1)


def test_iresnet_tiny_keeps_official_block_names_and_embeds_112px_faces():
    model = create_backbone("iresnet_tiny", num_features=128).eval()
    names = {k.split(".")[0] for k in model.state_dict()}
    assert names == {
        "conv1",
        "bn1",
        "prelu",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "bn2",
        "dropout",
        "fc",
        "features",
    } - {"dropout"}
    assert model.fc.in_features == 128 * 4 * 4  # 112 -> 56 (stem) -> 28 -> 14 -> 7 -> 4
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 128)
