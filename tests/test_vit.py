"""Vision Transformers: official arcface_torch layout and embeddings, masking, SDPA, weights, recipe, export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from femb.backbones import VIT_LAYOUTS, VisionTransformer, create_backbone
from femb.backbones.vit import Attention, explicit_attention, vit_forward_flops
from femb.config import OptimParams, parse_params
from femb.errors import FembError
from femb.training.optim import build_optimizer, no_weight_decay_names
from femb.weights import infer_backbone, load_backbone, save_backbone
from tests.test_backbones import layout, official_layout

TOKENS = 144  # (112 // 9) ** 2
HEADS = 8


def official_state_dict(name: str, seed: int = 0) -> dict[str, Tensor]:
    """Random weights under the official keys/shapes (fixture file, not our model), O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_layout(name):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("running_mean") or key.endswith("bias"):
            state[key] = torch.randn(shape, generator=gen) * 0.1
        elif "norm" in key or key.startswith(("feature.1.", "feature.3.")):
            state[key] = 1 + torch.randn(shape, generator=gen) * 0.1  # LayerNorm / BatchNorm scales
        else:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if len(shape) >= 2 else 1
            std = 0.02 if key in ("pos_embed", "mask_token") else fan_in**-0.5
            state[key] = torch.randn(shape, generator=gen) * std
    return state


def reference_embedding(state: dict[str, Tensor], x: Tensor, heads: int = HEADS) -> Tensor:
    """The official eval forward, written out from arcface_torch vit.py with plain functional ops.

    conv 9x9/9 -> flatten(2).transpose(1, 2) + pos_embed; per block x += proj(attn(LN1 x)),
    x += fc2(relu6(fc1(LN2 x))), the qkv output split as reshape(B, L, 3, heads, d).permute(2, 0, 3, 1, 4);
    LN; reshape(B, L * D); Linear, BN (eps 2e-5), Linear, BN.
    """
    s = {k: v.to(x.dtype) for k, v in state.items()}
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=9)
    t = t.flatten(2).transpose(1, 2) + s["pos_embed"]
    batch, length, dim = t.shape
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (dim,), s[p + "norm1.weight"], s[p + "norm1.bias"])
        qkv = (h @ s[p + "attn.qkv.weight"].T).reshape(batch, length, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        t = t + mixed @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        h = F.layer_norm(t, (dim,), s[p + "norm2.weight"], s[p + "norm2.bias"])
        h = torch.clamp(h @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"], 0, 6)
        t = t + h @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
    t = F.layer_norm(t, (dim,), s["norm.weight"], s["norm.bias"]).reshape(batch, length * dim)
    for linear, bn in (("feature.0", "feature.1"), ("feature.2", "feature.3")):
        t = t @ s[f"{linear}.weight"].T
        t = (t - s[f"{bn}.running_mean"]) / torch.sqrt(s[f"{bn}.running_var"] + 2e-5)
        t = t * s[f"{bn}.weight"] + s[f"{bn}.bias"]
    return t


def images(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    return (torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


def micro(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return create_backbone("vit_micro", num_features=32, **kwargs)


# ---------------------------------------------------------------- official structure


@pytest.mark.parametrize("name", list(VIT_LAYOUTS))
def test_state_dict_keys_and_shapes_equal_official_layout(name):
    assert layout(name) == official_layout(name)


def test_structure_is_patch9_relu6_mlp_biasless_qkv_and_official_norms():
    with torch.device("meta"):
        model = create_backbone("vit_b")
    assert model.patch_embed.proj.kernel_size == (9, 9) and model.patch_embed.proj.stride == (9, 9)
    assert model.num_patches == TOKENS and len(model.blocks) == 24
    block = model.blocks[0]
    assert block.attn.num_heads == HEADS and block.attn.qkv.bias is None
    assert isinstance(block.mlp.act, nn.ReLU6) and block.mlp.fc1.out_features == 4 * 512
    assert all(m.eps == 2e-5 for m in model.feature if isinstance(m, nn.BatchNorm1d))
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))


@pytest.mark.parametrize(
    "name, drop_path, mask",
    [
        ("vit_t", 0.1, 0.1),
        ("vit_s", 0.1, 0.1),
        ("vit_b", 0.1, 0.1),
        ("vit_l", 0.05, 0.05),
        ("vit_h", 0.1, 0.0),
    ],
)
def test_registry_defaults_are_get_models_and_stochastic_depth_rises_linearly(name, drop_path, mask):
    with torch.device("meta"):
        model = create_backbone(name)
        webface = create_backbone(name, drop_path_rate=0.05, mask_ratio=0.0)  # e.g. vit_t_dp005_mask0
    assert model.mask_ratio == mask and webface.mask_ratio == 0.0
    rates = [getattr(b.drop_path, "p", 0.0) for b in model.blocks]
    expected = torch.linspace(0, drop_path, len(model.blocks)).tolist()
    assert rates == pytest.approx(expected) and rates[0] == 0.0 and rates[-1] == pytest.approx(drop_path)
    assert getattr(webface.blocks[-1].drop_path, "p", None) == pytest.approx(0.05)


def test_bad_constructor_arguments_are_refused_naming_them():
    with pytest.raises(FembError, match="mask_ratio must be in"):
        create_backbone("vit_t", mask_ratio=1.0)
    with pytest.raises(FembError, match="takes no argument 'drop_path_rate'"):
        create_backbone("iresnet_tiny", drop_path_rate=0.1)


def test_wrong_image_size_is_refused():
    with pytest.raises(ValueError, match="96x96 pixels, the model takes 112x112"):
        micro().eval()(torch.zeros(1, 3, 96, 96))


# ---------------------------------------------------------------- official embeddings


def test_official_vit_t_file_loads_strictly_by_inference_and_gives_the_official_embeddings(tmp_path):
    state = official_state_dict("vit_t")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "model.pt")  # saved under DDP
    model = load_backbone(tmp_path / "model.pt")
    assert isinstance(model, VisionTransformer) and model.embed_dim == 256 and not model.training
    loaded = model.state_dict()
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    x = images(2)
    with torch.no_grad():
        got, expected = model(x), reference_embedding(state, x)
    assert got.shape == (2, 512) and expected.abs().max() > 0.5
    # float32 (vit_t in float64 is slow on a CPU); the float64 equality of the formula is tested below
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


# ---------------------------------------------------------------- attention


def test_sdpa_attention_equals_the_explicit_formula_in_float64():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, HEADS, TOKENS, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v), explicit_attention(q, k, v), rtol=0, atol=1e-6
    )
    fused = Attention(256).double()
    plain = copy.deepcopy(fused)
    plain.fused = False
    x = torch.randn(3, TOKENS, 256, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=1e-6)


def test_whole_model_with_explicit_attention_gives_the_same_embeddings():
    model = micro().double().eval()
    explicit = copy.deepcopy(model)
    for block in explicit.blocks:
        block.attn.fused = False
    x = images(3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), explicit(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- masking and drop path


@pytest.mark.parametrize("ratio", [0.1, 0.05, 0.3])
def test_masking_keeps_int_l_times_one_minus_ratio_distinct_tokens(ratio):
    model = micro(mask_ratio=ratio)
    x = torch.randn(4, TOKENS, 64)
    kept, restore = model.random_masking(x, generator=torch.Generator().manual_seed(0))
    keep = int(TOKENS * (1 - ratio))
    assert kept.shape == (4, keep, 64)
    for sample in range(4):
        assert sorted(restore[sample].tolist()) == list(range(TOKENS))  # a permutation
        rows = {tuple(r.tolist()) for r in kept[sample]}
        assert len(rows) == keep and rows <= {tuple(r.tolist()) for r in x[sample]}
    assert not torch.equal(restore[0], restore[1])  # per-sample shuffles


def _final_tokens(model: VisionTransformer, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.forward_features(x).reshape(len(x), TOKENS, model.embed_dim)


def test_masking_is_active_in_training_only_and_fills_masked_tokens_with_mask_token():
    model = micro(mask_ratio=0.25)
    x = images(3)
    model.eval()
    state = torch.get_rng_state()
    eval_tokens = _final_tokens(model, x)
    assert torch.equal(torch.get_rng_state(), state)  # eval draws no noise
    assert not (eval_tokens == model.mask_token[0]).all(-1).any()
    model.train()
    masked = (_final_tokens(model, x) == model.mask_token[0]).all(-1)
    assert masked.sum(1).tolist() == [TOKENS - int(TOKENS * 0.75)] * 3
    unmasked = micro(mask_ratio=0.0).train()
    assert not (_final_tokens(unmasked, x) == unmasked.mask_token[0]).all(-1).any()


def test_masking_follows_the_global_seed():
    model = micro(mask_ratio=0.1).train()
    x = images(4)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(model(x))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_every_trainable_parameter_gets_a_gradient_and_mask_token_trains_only_with_masking(ratio):
    model = micro(mask_ratio=ratio, drop_path_rate=0.1).train()
    model(images(4)).square().sum().backward()
    assert model.mask_token.requires_grad == (ratio > 0)  # DDP then finds no unused parameter
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_drop_path_is_per_sample_and_only_in_training():
    model = micro(drop_path_rate=0.5)
    drop = model.blocks[-1].drop_path
    assert drop.p == pytest.approx(0.5)
    x = torch.ones(64, TOKENS, 8)
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(0)
    out = drop.train()(x)
    per_sample = out.flatten(1)
    assert (
        (per_sample == 0).all(1) | (per_sample == 2).all(1)
    ).all()  # dropped, or kept and scaled by 1/keep
    assert 0.2 < (per_sample[:, 0] == 0).float().mean() < 0.8


def test_gradient_checkpointing_gives_the_same_output_and_gradients_under_masking_and_drop_path():
    plain = micro(mask_ratio=0.1, drop_path_rate=0.2).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = True
    x = images(4)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_analytic_flops_equal_the_flop_counter_with_explicit_attention():
    from torch.utils.flop_counter import FlopCounterMode

    model = micro(fused_attention=False).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images(2))
    assert counter.get_total_flops() == vit_forward_flops(model, batch=2)


@pytest.mark.parametrize("name, gmacs", [("vit_t", 1.5), ("vit_s", 5.7), ("vit_b", 11.4), ("vit_l", 25.3)])
def test_multiply_adds_match_the_arcface_torch_readme_table(name, gmacs):
    with torch.device("meta"):
        model = create_backbone(name)
    assert vit_forward_flops(model) / 2e9 == pytest.approx(gmacs, abs=0.05)


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("name", list(VIT_LAYOUTS))
def test_inference_identifies_each_official_size_from_its_shapes(name):
    state = {k: torch.empty(shape, device="meta") for k, shape in official_layout(name)}
    assert infer_backbone(state) == (name, {"num_features": 512})
    state["feature.2.weight"] = torch.empty(128, VIT_LAYOUTS[name][0], device="meta")
    assert infer_backbone(state) == (name, {"num_features": 128})


def test_inference_rejects_an_unknown_vit_size():
    state = {k: torch.empty(shape, device="meta") for k, shape in official_layout("vit_s")}
    state = {k: v for k, v in state.items() if not k.startswith("blocks.11.")}
    with pytest.raises(FembError, match="a ViT of width 512 and depth 11 is not one of vit_t 256x12"):
        infer_backbone(state)


@pytest.mark.parametrize("wrap", ["plain", "module.", "compiled", "module.compiled"])
def test_checkpoints_of_wrapped_or_compiled_vits_load_strictly(tmp_path, wrap):
    model = micro().eval()
    state = model.state_dict()
    if "compiled" in wrap:  # the keys torch.compile's wrapper gives: `_orig_mod.<key>`
        state = torch.compile(model).state_dict()
        assert next(iter(state)).startswith("_orig_mod.")
    if wrap.startswith("module."):
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "model.pt")
    loaded = load_backbone(tmp_path / "model.pt")
    assert isinstance(loaded, VisionTransformer) and loaded.embed_dim == 64 and len(loaded.blocks) == 4
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_save_backbone_round_trip_and_a_mismatch_names_both(tmp_path):
    model = micro().eval()
    save_backbone(model, tmp_path / "backbone.pth", "vit_micro", plain=True)
    loaded = load_backbone(tmp_path / "backbone.pth")
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(FembError, match=r"backbone.pth: weights do not fit backbone 'iresnet_tiny'"):
        load_backbone(tmp_path / "backbone.pth", "iresnet_tiny")


# ---------------------------------------------------------------- recipe


def test_position_embedding_and_mask_token_are_not_decayed_by_adamw():
    holder = nn.Module()
    holder.backbone = micro()
    holder.head = nn.Linear(4, 4)
    names = no_weight_decay_names(holder)
    assert names == {"backbone.pos_embed", "backbone.mask_token"}
    optim = OptimParams(optimizer="adamw", lr=1e-3, weight_decay=0.1, warmup_steps=0, schedule="constant")
    optimizer, _ = build_optimizer(holder.named_parameters(), optim, 10, names)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    before = {n: p.detach().clone() for n, p in holder.named_parameters()}
    for p in holder.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only decoupled weight decay moves a parameter
    after = dict(holder.named_parameters())
    for name in names:
        assert torch.equal(after[name], before[name]), name
    decayed = "backbone.blocks.0.attn.qkv.weight"
    torch.testing.assert_close(after[decayed], before[decayed] * (1 - 1e-3 * 0.1))
    plain, _ = build_optimizer(holder.parameters(), optim, 10)  # unnamed: one group, as before
    assert len(plain.param_groups) == 1


def test_params_pass_drop_path_and_mask_ratio_to_the_vit():
    params = parse_params({"backbone": "vit_s", "train": {"drop_path_rate": 0.05, "mask_ratio": 0.0}})
    assert params.model_section().backbone_kwargs() == {"drop_path_rate": 0.05, "mask_ratio": 0.0}
    assert parse_params({"backbone": "vit_s"}).model_section().backbone_kwargs() == {}
    with pytest.raises(FembError, match=r"train\.mask_ratio"):
        parse_params({"backbone": "vit_s", "train": {"mask_ratio": 1.5}})


VIT_STEPS = 40


def _vit_params(shards: Path, out_dir: Path) -> dict:
    """arcface_torch's ViT recipe (AdamW, wd 0.1, warmup then cosine, CosFace m=0.4, masking and drop path)
    at demo scale: lr 2e-3 for 40 steps of 32, float32 on the CPU."""
    return parse_params(
        {
            "backbone": "vit_micro",
            "embedding_size": 64,
            "header": "cosface",
            "headers": {"cosface": {"m": 0.4}},
            "data": {"shards": str(shards)},
            "train": {
                "out_dir": str(out_dir),
                "batch_size": 32,
                "num_workers": 0,
                "max_steps": VIT_STEPS,
                "max_epochs": 1000,
                "checkpoint_every": 1000,
                "val_every": 1000,
                "val_sets": [],
                "optimizer": "adamw",
                "lr": 2e-3,
                "weight_decay": 0.1,
                "warmup_steps": 4,
                "schedule": "cosine",
                "drop_path_rate": 0.1,
                "mask_ratio": 0.1,
            },
        }
    )


@pytest.mark.slow
def test_tiny_vit_learns_the_demo_and_evaluates_on_pairs_and_ijb(demo_shards, tmp_path):
    from femb.evaluation.evaluate import run_evaluate
    from femb.evaluation.pairsets import load_pair_set, verify_pair_set
    from femb.training.run import build_module, train
    from tests.test_ijb import write_release

    # Measured on 2 shared CPU cores: accuracy 0.42 untrained, 0.66 after 40 steps (10-16 s).
    params = _vit_params(demo_shards, tmp_path / "run")
    torch.manual_seed(params.train.seed)
    untrained = build_module(params, num_classes=40).backbone
    pairs = load_pair_set(demo_shards / "demo.parquet")
    before = verify_pair_set(untrained, pairs, progress=False)["accuracy"]
    train(params, progress=False)
    weights = tmp_path / "run" / "backbone.pth"
    release = write_release(tmp_path / "ijbc")
    metrics = run_evaluate(
        weights, [demo_shards / "demo.parquet", release], tmp_path / "eval.json", batch_size=32
    )
    after = metrics["demo"]["accuracy"]
    assert after >= before + 0.15 and after >= 0.6, (before, after)
    assert json.loads((tmp_path / "eval.json").read_text())["demo"]["accuracy"] == after
    assert metrics["ijbc"]["num_images"] == 6 and {"tar_at_far", "auc", "1vn"} <= set(metrics["ijbc"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [(g["weight_decay"], len(g["params"])) for g in groups][1] == (0.0, 2)  # pos_embed, mask_token
    assert groups[0]["weight_decay"] == 0.1


# ---------------------------------------------------------------- export


@pytest.mark.slow
def test_onnx_export_of_a_vit_passes_the_parity_check_and_serves_like_torch(tmp_path):
    from femb.export import export_onnx
    from femb.weights import OnnxBackbone

    model = micro(mask_ratio=0.1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = None
    with torch.no_grad():
        model.train()(images(16, seed=4))  # BatchNorm statistics of a batch; masking active
    model.eval()
    info = export_onnx(model, tmp_path / "vit.onnx", backbone="vit_micro", header="cosface")
    assert info["max_abs_diff"] <= 1e-4 and info["metadata"]["backbone"] == "vit_micro"
    assert info["output_tensor"]["shape"] == ["N", 32] and info["embedding_scale"] > 0.5
    served = OnnxBackbone(tmp_path / "vit.onnx")
    x = images(3, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(served(x), model(x), rtol=0, atol=1e-4)
