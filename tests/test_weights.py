"""Weight loading: official state dicts, femb and Lightning checkpoints, ONNX, and refusals."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from femb.backbones import create_backbone
from femb.errors import FembError
from femb.weights import OnnxBackbone, infer_backbone, load_backbone, save_backbone

OFFICIAL_KEYS = Path(__file__).parent / "fixtures" / "official_keys"


def official_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official arcface_torch keys/shapes (fixture file), not from our model."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for line in (OFFICIAL_KEYS / f"{name}.txt").read_text().splitlines():
        key, dims = line.split("\t")
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    return state


def assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def calibrated(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def test_official_state_dict_loads_strictly_with_inferred_architecture(tmp_path):
    state = official_state_dict("r18")
    torch.save(state, tmp_path / "backbone.pth")
    model = load_backbone(tmp_path / "backbone.pth")
    assert type(model).__name__ == "IResNet" and len(model.layer4) == 2
    assert not model.training
    assert_state_equal(model, state)


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "module.backbone.", "_orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    state = official_state_dict("mbf")
    torch.save({prefix + k: v for k, v in state.items()}, tmp_path / "model.pt")
    assert_state_equal(load_backbone(tmp_path / "model.pt", "mbf"), state)


def test_state_dict_without_batchnorm_counters_loads(tmp_path):
    state = {k: v for k, v in official_state_dict("mbf").items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    model = load_backbone(tmp_path / "old.pth")
    assert torch.equal(model.conv_sep.layers[1].running_var, state["conv_sep.layers.1.running_var"])


def test_arcface_torch_resume_checkpoint_loads_its_backbone(tmp_path):
    state = official_state_dict("mbf")
    torch.save(
        {"epoch": 3, "global_step": 10, "state_dict_backbone": state, "state_dict_softmax_fc": {}},
        tmp_path / "checkpoint_gpu_0.pt",
    )
    assert_state_equal(load_backbone(tmp_path / "checkpoint_gpu_0.pt"), state)


@pytest.mark.parametrize("name", ["r18", "r50", "r100"])
def test_inference_identifies_official_iresnet_depths(name):
    got, kwargs = infer_backbone(official_state_dict(name))
    assert got == {"r18": "iresnet18", "r50": "iresnet50", "r100": "iresnet100"}[name]
    assert kwargs == {"num_features": 512}


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("iresnet34", {"num_features": 128}),
        ("iresnet200", {"num_features": 512}),
        ("mobilefacenet", {"num_features": 512}),
        ("mobilefacenet_large", {"num_features": 256}),
        ("mobilefacenet", {"num_features": 64, "blocks": (2, 1, 1, 1), "scale": 1}),
    ],
)
def test_inference_recovers_name_and_shape_arguments(name, kwargs):
    with torch.device("meta"):
        state = create_backbone(name, **kwargs).state_dict()
    assert infer_backbone(state) == (name, kwargs)


def test_inference_rejects_an_unknown_iresnet_depth():
    state = {k: v for k, v in official_state_dict("r18").items() if not k.startswith("layer4.1.")}
    with pytest.raises(FembError, match=r"blocks per stage \(2, 2, 2, 1\) is not one of iresnet18"):
        infer_backbone(state)


def test_save_backbone_round_trip_keeps_name_weights_and_outputs(tmp_path):
    model = calibrated(create_backbone("mbf", num_features=128))
    path = save_backbone(model, tmp_path / "out" / "mbf.pt", "mbf")
    assert [p.name for p in path.parent.iterdir()] == ["mbf.pt"]  # no temporary left behind
    saved = torch.load(path, weights_only=True)
    assert saved["backbone"] == "mobilefacenet"
    loaded = load_backbone(path)
    assert_state_equal(loaded, model.state_dict())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_save_backbone_refuses_a_model_of_another_architecture(tmp_path):
    with pytest.raises(FembError, match=r"weights do not fit backbone 'iresnet18'"):
        save_backbone(create_backbone("mbf"), tmp_path / "x.pt", "r18")
    assert not list(tmp_path.iterdir())


def test_femb_file_name_wins_over_inference(tmp_path):
    # A femb file says mbf_large; the weights are mbf: the recorded name is used, so the mismatch shows.
    torch.save({"backbone": "mbf_large", "state_dict": official_state_dict("mbf")}, tmp_path / "f.pt")
    with pytest.raises(FembError, match=r"f\.pt: weights do not fit backbone 'mobilefacenet_large'"):
        load_backbone(tmp_path / "f.pt")


def lightning_like_checkpoint(state: dict[str, torch.Tensor], hparams: dict) -> dict:
    """The dict Lightning's Trainer.save_checkpoint writes for a module with `self.backbone` and `self.header`."""
    return {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {
            **{f"backbone.{k}": v for k, v in state.items()},
            **{f"_forward_backbone.{k}": v for k, v in state.items()},
            "header.weight": torch.randn(10, 512),
        },
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hyper_parameters": hparams,
    }


def test_lightning_checkpoint_yields_backbone_part(tmp_path):
    state = official_state_dict("r18")
    torch.save(
        lightning_like_checkpoint(state, {"backbone": "r18", "num_classes": 10}), tmp_path / "last.ckpt"
    )
    assert_state_equal(load_backbone(tmp_path / "last.ckpt"), state)


def test_lightning_hyper_parameters_name_the_backbone(tmp_path):
    ckpt = lightning_like_checkpoint(official_state_dict("r18"), {"backbone": "iresnet34"})
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.raises(FembError, match=r"last\.ckpt: weights do not fit backbone 'iresnet34'"):
        load_backbone(tmp_path / "last.ckpt")


@pytest.mark.slow
def test_real_lightning_checkpoint_loads_with_weights_only(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, backbone: str = "mbf", embedding_size: int = 32):
            super().__init__()
            self.save_hyperparameters()
            self.backbone = create_backbone(backbone, num_features=embedding_size)
            self.header = nn.Linear(embedding_size, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.header(self.backbone(x)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 112, 112), torch.tensor([0, 1, 2, 0]))
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    module = Tiny()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = load_backbone(tmp_path / "last.ckpt")
    assert_state_equal(loaded, module.backbone.state_dict())


def test_mismatch_error_names_file_backbone_and_keys(tmp_path):
    state = official_state_dict("r18")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(FembError) as err:
        load_backbone(tmp_path / "r18.pth", "r34")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'r18.pth'}: weights do not fit backbone 'iresnet34': ")
    # r34 has 1+2+4+1 more blocks than r18, of 18 entries each, 3 of them BatchNorm counters (not required)
    assert "120 missing keys (layer1.2.bn1.weight, layer1.2.bn1.bias," in message
    assert "1 unexpected keys (extra.weight)" in message


def test_shape_mismatch_error_quotes_both_shapes(tmp_path):
    torch.save(official_state_dict("r18"), tmp_path / "r18.pth")
    with pytest.raises(
        FembError, match=r"shape mismatches \(fc\.weight: file \[512, 25088\] vs model \[128, 25088\]"
    ):
        load_backbone(tmp_path / "r18.pth", num_features=128)


def test_non_tensor_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "cfg": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(FembError, match=r"evil\.pt: refused to load: the pickle names the global io\.open"):
        load_backbone(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(FembError, match=r"raw\.pkl: "):
        load_backbone(tmp_path / "raw.pkl")
    assert not marker.exists()


def test_pickled_module_is_refused_with_advice(tmp_path):
    torch.save(create_backbone("mbf"), tmp_path / "full.pt")
    with pytest.raises(
        FembError, match=r"full\.pt: refused to load: .*MobileFaceNet.*save a state_dict instead"
    ):
        load_backbone(tmp_path / "full.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_garbage_file_is_named_in_the_error(tmp_path, content):
    (tmp_path / "bad.pth").write_bytes(content)
    with pytest.raises(FembError, match=r"bad\.pth: not a PyTorch weights file"):
        load_backbone(tmp_path / "bad.pth")


def test_missing_file_and_non_state_dict_are_named(tmp_path):
    with pytest.raises(FembError, match=r"nope\.pth: no such weights file"):
        load_backbone(tmp_path / "nope.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(FembError, match=r"tensor\.pth: holds a Tensor, not a state dict"):
        load_backbone(tmp_path / "tensor.pth")
    torch.save({"lr": 0.1, "epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(FembError, match=r"meta\.pth: not a backbone state dict: 2 entries are not tensors"):
        load_backbone(tmp_path / "meta.pth")


def test_unknown_layout_asks_for_the_backbone_name(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(FembError, match=r"other\.pth: keys match no known backbone.*pass the backbone name"):
        load_backbone(tmp_path / "other.pth")


def export_onnx(model: nn.Module, path: Path) -> None:
    torch.onnx.export(
        model, (torch.randn(2, 3, 112, 112),), str(path), dynamo=False, input_names=["data"],
        output_names=["embedding"], dynamic_axes={"data": {0: "batch"}, "embedding": {0: "batch"}},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_file_runs_through_onnxruntime_like_the_torch_model(tmp_path):
    model = calibrated(create_backbone("r18", num_features=64))
    export_onnx(model, tmp_path / "r18.onnx")
    onnx_model = load_backbone(tmp_path / "r18.onnx")
    assert isinstance(onnx_model, OnnxBackbone)
    x = torch.randn(3, 3, 112, 112)  # another batch size than exported: the batch is dynamic
    with torch.no_grad():
        expected = model(x)
    got = onnx_model(x)
    assert got.shape == (3, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_backbone_is_inference_only_and_checks_metadata(tmp_path):
    import onnx

    export_onnx(calibrated(create_backbone("mbf", num_features=16)), tmp_path / "mbf.onnx")
    proto = onnx.load(str(tmp_path / "mbf.onnx"))
    proto.metadata_props.add(key="backbone", value="mobilefacenet")
    onnx.save(proto, str(tmp_path / "mbf.onnx"))
    model = load_backbone(tmp_path / "mbf.onnx", "mbf")
    assert model.metadata["backbone"] == "mobilefacenet" and not model.training
    with pytest.raises(FembError, match=r"mbf\.onnx: an ONNX backbone is inference-only"):
        model.train()
    with pytest.raises(FembError, match=r"expects input \['batch', 3, 112, 112\], got \[1, 3, 96, 96\]"):
        model(torch.zeros(1, 3, 96, 96))
    with pytest.raises(
        FembError, match=r"mbf\.onnx: expected backbone 'iresnet50', but the ONNX metadata says"
    ):
        load_backbone(tmp_path / "mbf.onnx", "r50")


def test_broken_onnx_file_is_named(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"\x00\x01garbage")
    with pytest.raises(FembError, match=r"broken\.onnx: not a loadable ONNX model"):
        load_backbone(tmp_path / "broken.onnx")


def test_iresnet_tiny_is_inferred_from_its_state_dict(tmp_path):
    model = create_backbone("iresnet_tiny", num_features=64)
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    loaded = load_backbone(tmp_path / "tiny.pth")
    assert loaded.fc.out_features == 64
    assert loaded.conv1.stride == (2, 2)


def test_checkpoint_whose_state_dict_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"state_dict_backbone": [torch.zeros(1)]}, path)
    with pytest.raises(FembError, match="not a mapping of tensors"):
        load_backbone(path)
