"""Load a face backbone from any weights file femb meets, and save one in femb's own format.

Accepted: an InsightFace arcface_torch state dict (`backbone.pth`, `model.pt`, optionally with a
`module.` / `backbone.` prefix), an arcface_torch resume checkpoint (`checkpoint_gpu_*.pt`, key
`state_dict_backbone`), a Lightning `.ckpt` of femb training (`state_dict` keys `backbone.<key>`),
a file written by `save_backbone`, and an `.onnx` file (served by onnxruntime, inference only).
Every PyTorch file goes through `torch.load(..., weights_only=True)`: a pickle that holds anything
but tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from femb.backbones import IRESNET_LAYERS, canonical_backbone_name, create_backbone
from femb.backbones.iresnet import TINY_WIDTHS
from femb.backbones.mobilefacenet import MBF_BLOCKS, MBF_LARGE_BLOCKS, MBF_LARGE_SCALE, MBF_SCALE
from femb.backbones.vit import MICRO_LAYOUT, VIT_LAYOUTS
from femb.errors import FembError, short_text
from femb.io import atomic_path

# Prefixes that wrappers add in front of the backbone's own keys: DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 5  # keys quoted in an error message


def load_backbone(path: Path | str, backbone: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a backbone in eval mode from a state dict, femb/Lightning/arcface_torch checkpoint or ONNX file.

    `backbone` (a name or alias) is inferred from the file when None: femb files record it, plain
    state dicts reveal it by their blocks per stage. `kwargs` go to `create_backbone` and override
    what the file implies (e.g. `num_features`). Keys must match exactly (strict load).
    """
    path = Path(path)
    if not path.is_file():
        raise FembError(f"{path}: no such weights file")
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, backbone, **kwargs)
    state_dict, recorded = read_backbone_state_dict(path)
    if backbone is not None:
        name = canonical_backbone_name(backbone)
        arch = _structural_kwargs(name, state_dict)
    elif recorded is not None:
        try:
            name = canonical_backbone_name(recorded)
        except FembError as err:
            raise FembError(f"{path}: the file names {err}") from err
        arch = _structural_kwargs(name, state_dict)
    else:
        try:
            name, arch = infer_backbone(state_dict)
        except FembError as err:
            raise FembError(f"{path}: {err}; pass the backbone name explicitly") from err
    model = create_backbone(name, **{**arch, **kwargs})
    _check_keys(path, name, model.state_dict(), state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_backbone_weights(model: nn.Module, path: Path | str, backbone: str, embedding_size: int) -> None:
    """Copy the backbone weights in `path` into `model`, a `backbone` of `embedding_size` features, strictly.

    `path` is any PyTorch file `load_backbone` reads (an arcface_torch `backbone.pth`, a femb
    `backbone.pth`, a femb/Lightning `.ckpt`); a checkpoint's head is ignored. Weights of another
    architecture or embedding size are refused in one line naming the file's and the model's.
    """
    path = Path(path)
    if not path.is_file():
        raise FembError(f"{path}: no such weights file")
    state, recorded = read_backbone_state_dict(path)
    wanted = canonical_backbone_name(backbone)
    found = _file_backbone(state, recorded)
    features = _structural_kwargs(found or wanted, state).get("num_features")
    if (found is not None and found != wanted) or (features is not None and features != embedding_size):
        raise FembError(
            f"{path}: holds {found or 'unrecognised'} weights of embedding size {features or '?'}, but "
            f"backbone is '{wanted}' with embedding_size {embedding_size}; set both to match the file"
        )
    _check_keys(path, wanted, model.state_dict(), state)
    model.load_state_dict(state, strict=True)


def _file_backbone(state: Mapping[str, Tensor], recorded: str | None) -> str | None:
    """The canonical backbone a weights file holds: the name it records, else the one its keys imply."""
    try:
        return canonical_backbone_name(recorded) if recorded is not None else infer_backbone(state)[0]
    except FembError:
        return None  # unknown: the strict key check says what does not fit


def read_backbone_state_dict(path: Path | str) -> tuple[dict[str, Tensor], str | None]:
    """The backbone's state dict (official key names) in a weights file, and the backbone it names if any."""
    path = Path(path)
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise FembError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint")
    recorded: str | None = None
    if "state_dict_backbone" in obj:  # arcface_torch checkpoint_gpu_<rank>.pt
        state = obj["state_dict_backbone"]
    elif isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
        if isinstance(obj.get("backbone"), str):  # save_backbone
            recorded = obj["backbone"]
        else:  # Lightning
            recorded = _backbone_from_hparams(obj.get("hyper_parameters"))
    else:
        state = obj
    if not isinstance(state, Mapping):
        raise FembError(f"{path}: its state dict is a {type(state).__name__}, not a mapping of tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        top = ", ".join(repr(k) for k in list(obj)[:_SHOWN])
        raise FembError(
            f"{path}: not a backbone state dict: {len(bad)} entries are not tensors "
            f"(e.g. {bad[0]!r}); top-level keys: {top}"
        )
    state = _strip_prefixes(dict(state))
    if not state:
        raise FembError(f"{path}: holds no backbone weights")
    return state, recorded


def infer_backbone(state_dict: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """Identify the architecture of an official-layout state dict: (canonical name, constructor kwargs).

    IResNet depth comes from the number of blocks in layer1..4, MobileFaceNet from its `layers.N`
    tree, a ViT's size from its width (`pos_embed`) and number of blocks; the embedding size from the
    final linear layer.
    """
    if "fc.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        counts = tuple(_count_children(state_dict, f"layer{i}.") for i in range(1, 5))
        for name, layers in IRESNET_LAYERS.items():
            if counts == layers:
                return name, _structural_kwargs(name, state_dict)
        if counts == (1, 1, 1, 1) and state_dict["conv1.weight"].shape[0] == TINY_WIDTHS[0]:
            return "iresnet_tiny", _structural_kwargs("iresnet_tiny", state_dict)
        known = ", ".join(f"{n} {layers}" for n, layers in IRESNET_LAYERS.items())
        raise FembError(f"an IResNet with blocks per stage {counts} is not one of {known}")
    if "conv_sep.layers.0.weight" in state_dict and "features.layers.2.weight" in state_dict:
        blocks, scale = _mobilefacenet_layout(state_dict)
        name = (
            "mobilefacenet_large"
            if (blocks, scale) == (MBF_LARGE_BLOCKS, MBF_LARGE_SCALE)
            else "mobilefacenet"
        )
        return name, _structural_kwargs(name, state_dict)
    if (
        "pos_embed" in state_dict
        and "feature.0.weight" in state_dict
        and "blocks.0.attn.qkv.weight" in state_dict
    ):
        layout = (int(state_dict["pos_embed"].shape[-1]), _count_children(state_dict, "blocks."))
        layouts = {**VIT_LAYOUTS, "vit_micro": MICRO_LAYOUT}
        name = next((n for n, known in layouts.items() if known == layout), None)
        if name is None:
            known = ", ".join(f"{n} {w}x{d}" for n, (w, d) in VIT_LAYOUTS.items())
            raise FembError(f"a ViT of width {layout[0]} and depth {layout[1]} is not one of {known}")
        return name, _structural_kwargs(name, state_dict)
    first = ", ".join(list(state_dict)[:_SHOWN])
    raise FembError(f"keys match no known backbone (IResNet, MobileFaceNet or ViT); first keys: {first}")


def save_backbone(model: nn.Module, path: Path | str, name: str, plain: bool = False) -> Path:
    """Write `{"backbone": name, "state_dict": ...}` atomically; `load_backbone` reads it back as is.

    With `plain`, write the bare state dict with official key names instead: the `backbone.pth` that
    arcface_torch's `backbone.load_state_dict(torch.load(path))` takes (the name is then inferred).
    """
    path = Path(path)
    canonical = canonical_backbone_name(name)
    state = _strip_prefixes({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    with torch.device("meta"):
        expected = create_backbone(canonical, **_structural_kwargs(canonical, state)).state_dict()
    _check_keys(path, canonical, expected, state)
    with atomic_path(path) as tmp:
        torch.save(state if plain else {"backbone": canonical, "state_dict": state}, tmp)
    return path


class OnnxBackbone(nn.Module):
    """An ONNX backbone run by onnxruntime behind the nn.Module call interface: inference only.

    It has no parameters and no autograd; `train(True)` is refused. Input and output are float32
    torch tensors; the output is returned on the input's device.
    """

    def __init__(self, path: Path | str, providers: Sequence[str] | None = None):
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        available = ort.get_available_providers()
        chosen = list(providers) if providers is not None else _default_providers(available)
        try:
            self.session = ort.InferenceSession(str(self.path), providers=chosen)
        except Exception as err:  # onnxruntime raises its own untyped errors for bad files
            raise FembError(f"{self.path}: not a loadable ONNX model ({_first_line(err)})") from err
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise FembError(
                f"{self.path}: expected one image input and an output, found {len(inputs)} inputs"
            )
        self.input_name: str = inputs[0].name
        self.input_shape: list[int | str | None] = list(inputs[0].shape)
        self.output_name: str = outputs[0].name
        declared = outputs[0].shape
        if isinstance(declared, (list, tuple)) and declared and len(declared) != 2:
            raise FembError(
                f"{self.path}: its output '{self.output_name}' is {_shape_text(declared)}, expected "
                "N x D embeddings (a flattening layer may be missing from the export)"
            )
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        super().train(False)

    def train(self, mode: bool = True) -> OnnxBackbone:
        """Only eval mode exists: an ONNX graph cannot be trained here."""
        if mode:
            raise FembError(
                f"{self.path}: an ONNX backbone is inference-only; train from a .pth or .ckpt file"
            )
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        fixed = [(i, d) for i, d in enumerate(self.input_shape) if isinstance(d, int) and i > 0]
        if x.dim() != len(self.input_shape) or any(x.shape[i] != d for i, d in fixed):
            raise FembError(f"{self.path}: expects input {self.input_shape}, got {list(x.shape)}")
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        batch = self.input_shape[0]
        if isinstance(batch, int) and batch > 0 and batch != len(array):
            out = np.concatenate(
                [self._run_fixed_batch(array[i : i + batch], batch) for i in range(0, len(array), batch)]
            )
        else:
            out = self._run(array)
        return torch.from_numpy(out).to(x.device)

    def _run(self, array: np.ndarray) -> np.ndarray:
        out = np.asarray(self.session.run([self.output_name], {self.input_name: array})[0], dtype=np.float32)
        if out.ndim != 2 or len(out) != len(array):
            raise FembError(
                f"{self.path}: gave an output of shape {list(out.shape)} for {len(array)} images, "
                "expected N x D embeddings"
            )
        return out

    def _run_fixed_batch(self, chunk: np.ndarray, batch: int) -> np.ndarray:
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        return self._run(chunk)[: batch - pad]


def _shape_text(shape: Sequence[object]) -> str:
    """An ONNX shape as `N x 512 x 1 x 1` (a symbolic or unknown batch reads N)."""
    return " x ".join("N" if i == 0 and not isinstance(d, int) else str(d) for i, d in enumerate(shape))


def _load_onnx(path: Path, backbone: str | None, **kwargs: Any) -> OnnxBackbone:
    extra = sorted(set(kwargs) - {"providers"})
    if extra:
        raise FembError(f"{path}: {', '.join(extra)} cannot be applied to an ONNX backbone")
    model = OnnxBackbone(path, providers=kwargs.get("providers"))
    recorded = model.metadata.get("backbone")
    if backbone is not None and recorded:
        wanted = canonical_backbone_name(backbone)
        try:
            found = canonical_backbone_name(recorded)
        except FembError:
            found = recorded
        if wanted != found:
            raise FembError(f"{path}: expected backbone '{wanted}', but the ONNX metadata says '{recorded}'")
    return model.eval()


def _default_providers(available: Sequence[str]) -> list[str]:
    preferred = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return preferred or list(available)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own text advises retrying with weights_only=False, i.e. running the pickle: not repeated.
        blocked = re.search(r"GLOBAL\s+([\w.]+)", str(err))
        if blocked:
            raise FembError(
                f"{path}: refused to load: the pickle names the global {short_text(blocked[1])}, which is "
                "neither a tensor nor a plain container (loading with weights_only=True never imports or runs "
                "it); save a state_dict instead"
            ) from None
        raise FembError(f"{path}: not a PyTorch weights file ({_unpickler_detail(str(err))})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise FembError(
            f"{path}: not a PyTorch weights file ({_first_line(err) or type(err).__name__})"
        ) from err


# Lines of torch's weights_only message that are advice, not the reason (torch 2.4 to 2.13 wordings).
_TORCH_ADVICE = re.compile(r"weights.only|re-running|file an issue|documentation", re.I)


def _unpickler_detail(message: str) -> str:
    """The reason in torch's weights_only refusal, without its advice to load with weights_only=False."""
    after = re.split(r"WeightsUnpickler error:", message, maxsplit=1)
    lines = [line.strip() for line in after[-1].splitlines() if line.strip()]
    reasons = [line for line in lines if not _TORCH_ADVICE.search(line)]
    return short_text(reasons[0], 160) if reasons else "not a pickle that holds only tensors"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _backbone_from_hparams(hparams: Any) -> str | None:
    if not isinstance(hparams, Mapping):
        return None
    for key in ("backbone", "backbone_name"):
        if isinstance(hparams.get(key), str):
            return hparams[key]
    for value in hparams.values():  # one level of nesting, e.g. {"model": {"backbone": "r50"}}
        if isinstance(value, Mapping) and isinstance(value.get("backbone"), str):
            return value["backbone"]
    return None


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official key names: drop wrapper prefixes; of a whole-model dict keep the `backbone.` part."""
    while state:
        if any(k.startswith("backbone.") for k in state):
            state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
            continue
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _count_children(state: Mapping[str, Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return len(indices)


def _structural_kwargs(name: str, state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Constructor arguments that shapes in the file fix (embedding size; MobileFaceNet blocks and width)."""
    if name.startswith("iresnet"):
        fc = state.get("fc.weight")
        return {"num_features": int(fc.shape[0])} if fc is not None and fc.dim() == 2 else {}
    if name.startswith("vit_"):
        fc = state.get("feature.2.weight")
        return {"num_features": int(fc.shape[0])} if fc is not None and fc.dim() == 2 else {}
    arch: dict[str, Any] = {}
    if "features.layers.2.weight" in state:
        arch["num_features"] = int(state["features.layers.2.weight"].shape[0])
    if "layers.0.layers.0.weight" in state:
        blocks, scale = _mobilefacenet_layout(state)
        # A custom layout is rebuilt from the file; a named one is left to `name` so a mismatch shows.
        if (blocks, scale) not in ((MBF_BLOCKS, MBF_SCALE), (MBF_LARGE_BLOCKS, MBF_LARGE_SCALE)):
            arch.update(blocks=blocks, scale=scale)
    return arch


def _mobilefacenet_layout(state: Mapping[str, Tensor]) -> tuple[tuple[int, ...], int]:
    scale = int(state["layers.0.layers.0.weight"].shape[0]) // 64
    # layers.1 is a single grouped ConvBlock when blocks[0] == 1, else a Residual of DepthWise blocks.
    first = 1 if "layers.1.layers.0.weight" in state else _count_children(state, "layers.1.layers.")
    return (first, *(_count_children(state, f"layers.{i}.layers.") for i in (3, 5, 7))), scale


def _check_keys(path: Path, name: str, expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> None:
    # Pre-1.0 PyTorch files lack BatchNorm counters; load_state_dict fills those in itself.
    missing = [k for k in expected if k not in found and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: file {list(found[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in found and found[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = ", ..." if len(items) > _SHOWN else ""
            problems.append(f"{len(items)} {label} ({', '.join(items[:_SHOWN])}{more})")
    if problems:
        raise FembError(f"{path}: weights do not fit backbone '{name}': {'; '.join(problems)}")
