"""ONNX export: parity with PyTorch, metadata, dynamic batch, InsightFace interface, failures, fp16, model card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from femb.errors import FembError
from femb.export import (
    check_onnx_parity,
    check_zoo_interface,
    export_onnx,
    read_onnx_metadata,
    render_model_card,
    write_model_card,
)
from femb.weights import OnnxBackbone, load_backbone, save_backbone
from tests.helpers import calibrated_tiny_mbf

FINGERPRINT = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A small MobileFaceNet (one block per stage, half width, 512-d) with BatchNorm statistics of a random batch."""
    return calibrated_tiny_mbf()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    info = export_onnx(model, path, backbone="mbf", header="arcface", dataset_fingerprint=FINGERPRINT)
    return path, info


def torch_embeddings(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def random_batch(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 112, 112)).astype(np.float32)


class ExportsDifferently(nn.Module):
    """A backbone whose exported graph adds 0.01 to every output: a stand-in for a corrupted export."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        out = self.backbone(x)
        return out + 0.01 if torch.onnx.is_in_onnx_export() else out


@pytest.mark.slow
def test_export_passes_parity_and_records_metadata(exported):
    path, info = exported
    assert info["max_abs_diff"] <= 1e-4 and info["tolerance"] == 1e-4
    assert info["min_cosine"] > 0.99999 and info["checked_batches"] == [8, 1]
    metadata = read_onnx_metadata(path)
    assert metadata["backbone"] == "mobilefacenet"
    assert metadata["header"] == "arcface"
    assert metadata["normalisation"] == "(x/255-0.5)/0.5 RGB"
    assert metadata["dataset_fingerprint"] == FINGERPRINT
    assert metadata["precision"] == "fp32" and metadata["embedding_size"] == "512"
    assert "femb_version" in metadata and "NCHW" in metadata["input_layout"]
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # one file: no .data, no temporary


@pytest.mark.slow
def test_exported_batch_is_dynamic_and_image_size_fixed(model, exported):
    path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (data,), (embedding,) = session.get_inputs(), session.get_outputs()
    assert (data.name, data.type, embedding.name) == ("data", "tensor(float)", "embedding")
    assert isinstance(data.shape[0], str) and data.shape[1:] == [3, 112, 112]
    assert isinstance(embedding.shape[0], str) and embedding.shape[1:] == [512]
    for batch in (3, 5):
        x = random_batch(batch, seed=batch)
        got = session.run(["embedding"], {"data": x})[0]
        np.testing.assert_allclose(got, torch_embeddings(model, x), rtol=1e-4, atol=1e-4)
    loaded = load_backbone(path, backbone="mbf")  # femb's own ONNX loader accepts the file and its metadata
    assert isinstance(loaded, OnnxBackbone)


@pytest.mark.slow
def test_tampered_weights_fail_the_parity_check(model, exported, tmp_path):
    path, _ = exported
    proto = onnx.load(str(path))
    largest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(largest).copy()
    weights.flat[0] += 0.5
    largest.CopyFrom(numpy_helper.from_array(weights, largest.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save_model(proto, str(tampered))
    with pytest.raises(FembError, match="parity check failed") as excinfo:
        check_onnx_parity(tampered, model)
    assert "\n" not in str(excinfo.value) and str(tampered) in str(excinfo.value)


@pytest.mark.slow
def test_zero_tolerance_rejects_the_float_rounding_difference(model, exported):
    path, info = exported
    assert info["max_abs_diff"] > 0  # reordered float arithmetic (fused BatchNorm) is never bit-exact here
    with pytest.raises(FembError, match="exceeds the tolerance 0"):
        check_onnx_parity(path, model, tolerance=0.0)


@pytest.mark.slow
def test_export_whose_graph_differs_fails_and_leaves_no_file(model, tmp_path):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"previous release")
    with pytest.raises(FembError, match="parity check failed") as excinfo:
        export_onnx(ExportsDifferently(model), output, backbone="mbf")
    assert "\n" not in str(excinfo.value)
    assert output.read_bytes() == b"previous release"  # the old file is neither removed nor half-replaced
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.slow
def test_fp16_export_keeps_a_float32_interface_within_its_tolerance(model, exported, tmp_path):
    weights = save_backbone(model, tmp_path / "backbone.pth", "mbf")
    output = tmp_path / "model_fp16.onnx"
    info = export_onnx(weights, output, fp16=True)  # the backbone is read from the weights file
    assert info["backbone"] == "mobilefacenet" and info["fp16"]
    assert info["tolerance"] == pytest.approx(0.02 * info["embedding_scale"])
    assert info["max_rel_diff"] < 0.02 and info["min_cosine"] > 0.999
    proto = onnx.load(str(output))
    float32 = onnx.TensorProto.FLOAT
    assert proto.graph.input[0].type.tensor_type.elem_type == float32
    assert proto.graph.output[0].type.tensor_type.elem_type == float32
    kinds = {t.data_type for t in proto.graph.initializer if len(t.dims) == 4}  # conv kernels
    assert kinds == {onnx.TensorProto.FLOAT16}
    assert read_onnx_metadata(output)["precision"] == "fp16"
    assert output.stat().st_size < 0.6 * exported[0].stat().st_size


def test_export_refuses_onnx_sources_and_bad_arguments(model, tmp_path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(FembError, match="already ONNX"):
        export_onnx(onnx_file, tmp_path / "out.onnx")
    with pytest.raises(FembError, match="must end in .onnx"):
        export_onnx(model, tmp_path / "model.pth")
    with pytest.raises(FembError, match="opset"):
        export_onnx(model, tmp_path / "out.onnx", opset=11)
    with pytest.raises(FembError, match="tolerance"):
        export_onnx(model, tmp_path / "out.onnx", tolerance=-1.0)
    assert not (tmp_path / "out.onnx").exists()


def _graph_file(path: Path, input_shape: list, output_shape: list, node_names: tuple[str, ...] = ()) -> Path:
    """A graph with the given interface (shapes only matter here; it is never run)."""
    nodes = [helper.make_node("Identity", ["data"], [f"t{i}"], name=n) for i, n in enumerate(node_names)]
    nodes.append(helper.make_node("ReduceMean", ["data"], ["embedding"], name="pool"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("data", onnx.TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, output_shape)],
    )
    onnx.save_model(helper.make_model(graph), str(path))
    return path


def test_zoo_interface_accepts_dynamic_batch_and_refuses_other_graphs(tmp_path):
    check_zoo_interface(_graph_file(tmp_path / "ok.onnx", ["N", 3, 112, 112], ["N", 512]), 512)
    fixed = _graph_file(tmp_path / "fixed.onnx", [1, 3, 112, 112], [1, 512])
    with pytest.raises(FembError, match=r"shape \[1, 3, 112, 112\], expected \[N, 3, 112, 112\]"):
        check_zoo_interface(fixed, 512)
    small = _graph_file(tmp_path / "small.onnx", ["N", 3, 96, 96], ["N", 512])
    with pytest.raises(FembError, match="InsightFace-compatible"):
        check_zoo_interface(small, 512)
    normalising = _graph_file(tmp_path / "sub.onnx", ["N", 3, 112, 112], ["N", 512], ("Sub_0", "Mul_1"))
    with pytest.raises(FembError, match="skip its input normalisation"):
        check_zoo_interface(normalising, 512)


def test_model_card_lists_metrics_parity_and_usage(tmp_path):
    info = {
        "output": str(tmp_path / "model.onnx"),
        "backbone": "iresnet50",
        "header": "arcface",
        "dataset_fingerprint": FINGERPRINT,
        "fp16": False,
        "opset": 18,
        "output_tensor": {"name": "embedding", "shape": ["N", 512], "dtype": "float32"},
        "max_abs_diff": 3.1e-6,
        "max_rel_diff": 2.9e-7,
        "embedding_scale": 10.5,
        "min_cosine": 0.99999999,
        "tolerance": 1e-4,
        "checked_batches": [8, 1],
        "sha256": "00" * 32,
    }
    metrics = {
        "lfw": {
            "accuracy": 0.9955,
            "accuracy_std": 0.0031,
            "tar_at_far": {"1e-04": 0.95, "1e-03": 0.98, "1e-02": 0.99},
            "far_below_resolution": ["1e-04"],
            "auc": 0.9991,
            "eer": 0.0062,
            "xnorm": 22.71,
            "num_pairs": 6000,
        },
        "mean_accuracy": 0.9955,
    }
    card = write_model_card(tmp_path / "MODEL_CARD.md", info, metrics)
    text = card.read_text()
    assert text == render_model_card(info, metrics)
    assert text.startswith("# model.onnx: iresnet50 face embedding")
    assert "| lfw | 99.55 ± 0.31 | 95.00 | 98.00 | 99.00 | 0.9991 | 0.62 | 22.71 | 6000 |" in text
    assert FINGERPRINT in text and "Max |difference| 3.1e-06" in text
    assert 'ort.InferenceSession("model.onnx"' in text and "Mean accuracy over the sets: 99.55%" in text
    assert "TAR at FAR 1e-04 lies below" in text
    assert [p.name for p in tmp_path.iterdir()] == ["MODEL_CARD.md"]
