"""Export a face backbone to ONNX (docs/architecture.md "ONNX"); prove onnxruntime computes what PyTorch does.

The graph takes `data`, float32 N x 3 x 112 x 112 RGB normalised as `(x/255 - 0.5)/0.5` (kept
outside the graph), and returns `embedding`, float32 N x D (D = 512 for every standard backbone),
unnormalised. Only the batch is dynamic, so InsightFace's model zoo (`get_model` routes a square
input of at least 112 and a multiple of 16 to `ArcFaceONNX`, which feeds float32 `(x-127.5)/127.5`)
serves the file unchanged. With `fp16`, weights and arithmetic are float16 but input and output
stay float32 (a Cast at each end): every consumer, the model zoo included, keeps feeding float32.

Exporter: `torch.onnx.export(..., dynamo=True)`, the torch.export-based exporter. It runs offline
(onnxscript is a dependency), is PyTorch's default and maintained path since 2.9, and the
TorchScript exporter (`dynamo=False`) warns that it will be removed; both gave the same parity on
IResNet and MobileFaceNet (max |diff| ~1e-5 on embeddings of scale ~10). Opset 18 is that exporter's
own; lower opsets go through the ONNX version converter.

The file is written under a temporary name and renamed only after the checks pass: the graph's
interface, then onnxruntime (CPUExecutionProvider) against the float32 PyTorch model on seeded
random batches of two sizes, neither the size traced, which also proves the dynamic batch.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from femb import __version__
from femb.backbones import canonical_backbone_name
from femb.data.decode import IMAGE_SIZE
from femb.errors import FembError
from femb.io import atomic_path, file_sha256
from femb.weights import OnnxBackbone, infer_backbone, load_backbone

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
NORMALISATION = "(x/255-0.5)/0.5 RGB"
INPUT_LAYOUT = "NCHW float32 RGB, N dynamic, 3 x 112 x 112"
DEFAULT_OPSET = 18
FP32_TOLERANCE = 1e-4
# Also relative to the embedding scale, so a model with tiny outputs (e.g. untrained BatchNorm
# statistics, scale ~1e-6) cannot pass the absolute bound with a wrong graph; float32 reordering
# measured ~1e-6 of the scale.
FP32_RELATIVE_TOLERANCE = 1e-3
# float16 keeps 11 significant bits (unit roundoff 4.9e-4); rounding at every layer of an IResNet-50
# or MobileFaceNet moved embeddings by 0.17-0.48% of their largest |value| when measured against
# float32, so 2% leaves 4x headroom, while a wrong graph (bad weights, missing op) moves them by O(100%).
FP16_RELATIVE_TOLERANCE = 2e-2
_TRACE_BATCH = 2  # torch.export specialises batch sizes 0 and 1, so trace with 2 and check others
_ZOO_MEAN_STD_NODES = 8  # insightface ArcFaceONNX looks for Sub/Mul among the first 8 nodes


def export_onnx(
    source: nn.Module | Path | str,
    output: Path | str,
    backbone: str | None = None,
    header: str | None = None,
    dataset_fingerprint: str | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    batch_for_check: int = 8,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Export a backbone (module or weights file) to `output` (.onnx) with metadata, after a parity check.

    `tolerance` bounds the largest |onnxruntime - PyTorch float32| embedding element; by default
    1e-4 for float32 and 2% of the largest |embedding element| for fp16. Whatever `tolerance`, the
    difference must also stay within 0.1% (float32) or 2% (fp16) of that scale. On any failure nothing is
    left at `output` (an existing file there is kept). Returns the parity numbers, the interface,
    the metadata, the file size and its sha256.
    """
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise FembError(f"{output}: the ONNX file name must end in .onnx")
    max_opset = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 17 <= opset <= max_opset:
        raise FembError(f"opset: expected an integer from 17 to {max_opset}, got {opset!r}")
    if isinstance(batch_for_check, bool) or not isinstance(batch_for_check, int) or batch_for_check < 2:
        raise FembError(f"batch_for_check: expected an integer of at least 2, got {batch_for_check!r}")
    if tolerance is not None and not (np.isfinite(tolerance) and tolerance >= 0):
        raise FembError(f"tolerance: expected a finite number >= 0, got {tolerance!r}")

    model, name = _resolve_model(source, backbone)
    num_features = _embedding_size(model)
    metadata = {
        "backbone": name,
        "header": header or "unknown",
        "normalisation": NORMALISATION,
        "input_layout": INPUT_LAYOUT,
        "embedding_size": str(num_features),
        "precision": "fp16" if fp16 else "fp32",
        "dataset_fingerprint": dataset_fingerprint or "unknown",
        "femb_version": __version__,
    }
    proto = _export_proto(model, fp16, opset)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "femb"
    proto.producer_version = __version__
    proto.doc_string = f"femb {name} face embedding: {INPUT_LAYOUT}, {NORMALISATION} -> {OUTPUT_NAME} N x D"

    with atomic_path(output) as tmp:
        onnx.save_model(proto, tmp)
        onnx.checker.check_model(str(tmp))
        check_zoo_interface(tmp, num_features)
        parity = check_onnx_parity(tmp, model, (batch_for_check, 1), tolerance=tolerance, fp16=fp16)
    return {
        "output": str(output),
        "backbone": name,
        "header": metadata["header"],
        "dataset_fingerprint": metadata["dataset_fingerprint"],
        "fp16": fp16,
        "opset": opset,
        "input": {"name": INPUT_NAME, "shape": ["N", 3, IMAGE_SIZE, IMAGE_SIZE], "dtype": "float32"},
        "output_tensor": {"name": OUTPUT_NAME, "shape": ["N", num_features], "dtype": "float32"},
        "metadata": metadata,
        **parity,
        "size_bytes": output.stat().st_size,
        "sha256": _sha256(output),
    }


def check_onnx_parity(
    onnx_path: Path | str,
    model: nn.Module,
    batch_sizes: Sequence[int] = (8, 1),
    tolerance: float | None = None,
    fp16: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the ONNX file (onnxruntime, CPU) and the float32 PyTorch model on the same random batches; compare.

    Inputs are uniform in [-1, 1], the range of normalised pixels. Returns max_abs_diff,
    max_rel_diff (max_abs_diff over the largest |reference element|), min_cosine, the embedding
    scale, the absolute and relative tolerances used and the batch sizes; FembError when the
    difference exceeds either (see `export_onnx`), the output is not finite, or its shape is wrong.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    reference_model = _float32_cpu_copy(model)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    max_abs = scale = 0.0
    min_cosine = 1.0
    for batch in batch_sizes:
        x = torch.rand((batch, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator) * 2 - 1
        with torch.inference_mode():
            expected = reference_model(x).numpy().astype(np.float64)
        got = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        if got.shape != expected.shape:
            raise FembError(
                f"{onnx_path}: parity check failed: batch {batch} gives output shape {list(got.shape)}, "
                f"PyTorch {list(expected.shape)}"
            )
        if not np.isfinite(got).all():
            raise FembError(f"{onnx_path}: parity check failed: onnxruntime output holds NaN or inf")
        got = got.astype(np.float64)
        max_abs = max(max_abs, float(np.max(np.abs(got - expected))))
        scale = max(scale, float(np.max(np.abs(expected))))
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
        cosine = np.sum(got * expected, axis=1) / np.maximum(norms, np.finfo(np.float64).tiny)
        min_cosine = min(min_cosine, float(cosine.min()))
    relative = FP16_RELATIVE_TOLERANCE if fp16 else FP32_RELATIVE_TOLERANCE
    if tolerance is None:
        tolerance = FP16_RELATIVE_TOLERANCE * scale if fp16 else FP32_TOLERANCE
    result = {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf),
        "min_cosine": min_cosine,
        "embedding_scale": scale,
        "tolerance": float(tolerance),
        "relative_tolerance": relative,
        "checked_batches": [int(b) for b in batch_sizes],
    }
    if not result["max_rel_diff"] <= relative:
        raise FembError(
            f"{onnx_path}: parity check failed: max |onnxruntime - PyTorch| = {max_abs:.3g} is "
            f"{result['max_rel_diff']:.3g} of the embedding scale {scale:.3g}, above {relative:.3g} "
            f"(batches {list(batch_sizes)})"
        )
    if not max_abs <= tolerance:
        raise FembError(
            f"{onnx_path}: parity check failed: max |onnxruntime - PyTorch| = {max_abs:.3g} exceeds the "
            f"tolerance {tolerance:.3g} (embedding scale {scale:.3g}, batches {list(batch_sizes)})"
        )
    return result


def check_zoo_interface(onnx_path: Path | str, num_features: int) -> None:
    """FembError unless the graph is what InsightFace's model zoo serves as a recognition model.

    One float32 input `data` [N, 3, 112, 112] with a symbolic batch, one float32 output `embedding`
    [N, num_features], and no Sub and Mul among the first nodes (ArcFaceONNX would take them for
    in-graph normalisation and skip its own `(x-127.5)/127.5`).
    """
    onnx_path = Path(onnx_path)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    problems = []
    if len(inputs) != 1 or len(graph.output) != 1:
        problems.append(f"{len(inputs)} inputs and {len(graph.output)} outputs, expected one of each")
    else:
        for value, name, fixed in (
            (inputs[0], INPUT_NAME, [3, IMAGE_SIZE, IMAGE_SIZE]),
            (graph.output[0], OUTPUT_NAME, [num_features]),
        ):
            tensor = value.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            if value.name != name:
                problems.append(f"tensor '{value.name}' should be named '{name}'")
            if tensor.elem_type != onnx.TensorProto.FLOAT:
                problems.append(
                    f"'{value.name}' is {onnx.TensorProto.DataType.Name(tensor.elem_type)}, not FLOAT"
                )
            if len(dims) != 1 + len(fixed) or not isinstance(dims[0], str) or dims[1:] != fixed:
                problems.append(
                    f"'{value.name}' has shape {dims}, expected [N, {', '.join(map(str, fixed))}]"
                )
    first = [node.name for node in graph.node[:_ZOO_MEAN_STD_NODES]]
    if any(n.startswith(("Sub", "_minus")) for n in first) and any(
        n.startswith(("Mul", "_mul")) for n in first
    ):
        problems.append("Sub and Mul nodes at the start would make InsightFace skip its input normalisation")
    if problems:
        raise FembError(
            f"{onnx_path}: not an InsightFace-compatible recognition graph: {'; '.join(problems)}"
        )


def read_onnx_metadata(path: Path | str) -> Mapping[str, str]:
    """The metadata properties of an ONNX file (backbone, header, normalisation, ...), without its weights."""
    model = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in model.metadata_props}


class _ExportWrapper(nn.Module):
    """The backbone with the graph's names and dtypes: float32 `data` in, float32 `embedding` out."""

    def __init__(self, backbone: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.backbone = backbone
        self.dtype = dtype

    def forward(self, data: Tensor) -> Tensor:
        return self.backbone(data.to(self.dtype)).float()


def _export_proto(model: nn.Module, fp16: bool, opset: int) -> onnx.ModelProto:
    """The ONNX model of the backbone (all weights inside the proto), batch dynamic, traced in eval mode."""
    dtype = torch.float16 if fp16 else torch.float32
    wrapper = _ExportWrapper(_float32_cpu_copy(model).to(dtype), dtype).eval()
    example = torch.zeros((_TRACE_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE))
    with _quiet_exporter():
        program = torch.onnx.export(
            wrapper,
            (example,),
            None,
            dynamo=True,
            verbose=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("N")},),
        )
    return program.model_proto


def _resolve_model(source: nn.Module | Path | str, backbone: str | None) -> tuple[nn.Module, str]:
    """The torch backbone to export and its canonical name (given, recorded in the file, or inferred)."""
    if isinstance(source, OnnxBackbone):
        raise FembError(f"{source.path}: is already ONNX; export from the .pth or .ckpt weights")
    if isinstance(source, nn.Module):
        model = source
    else:
        path = Path(source)
        if path.suffix.lower() == ".onnx":
            raise FembError(f"{path}: is already ONNX; export from the .pth or .ckpt weights")
        model = load_backbone(path, backbone)
    if backbone is not None:
        return model, canonical_backbone_name(backbone)
    try:
        name, _ = infer_backbone(model.state_dict())
    except FembError as err:
        raise FembError(
            f"cannot tell which backbone to record in the ONNX metadata ({err}); pass backbone"
        ) from err
    return model, name


def _float32_cpu_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of the model in eval mode; the caller's model keeps its device, dtype and mode."""
    return copy.deepcopy(model).to("cpu", torch.float32).eval()


def _embedding_size(model: nn.Module) -> int:
    with torch.inference_mode():
        out = _float32_cpu_copy(model)(torch.zeros((_TRACE_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)))
    if out.dim() != 2:
        raise FembError(f"the backbone returns shape {list(out.shape)}, expected [N, embedding size]")
    return int(out.shape[1])


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes (missing torchvision ops, internal deprecations); errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _sha256(path: Path) -> str:
    return file_sha256(path)
