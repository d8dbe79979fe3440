"""The params schema (pydantic): the one source of defaults; params.yaml repeats those dvc tracks, unchanged.

Every section refuses unknown keys, and a bad value fails with one line that names its dotted key
(``params.yaml: train.precision: ...``); the library's own checks name the library's arguments. Head
hyper-parameters default to the heads' own constructor defaults (the papers' values), so they are not
repeated here. See docs/architecture.md "Training configuration".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from femb.backbones import canonical_backbone_name, list_backbones
from femb.data.synth import (
    DEFAULT_IDENTITIES,
    DEFAULT_IJB_SUBJECTS,
    DEFAULT_IMAGES_PER_IDENTITY,
    DEFAULT_LOOSE_IDENTITIES,
    DEFAULT_LOOSE_IMAGES_PER_IDENTITY,
    DEFAULT_PAIRS,
)
from femb.errors import FembError, short_repr, short_text
from femb.headers import build_header, header_defaults, list_headers

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


def _known_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"'{value}' is not a precision; choose one of {', '.join(PRECISIONS)}")
    return value


def _known_head(value: str) -> str:
    if value not in list_headers():
        raise ValueError(f"'{value}' is not a head; choose one of {', '.join(list_headers())}")
    return value


def _known_backbone(value: str) -> str:
    try:
        canonical_backbone_name(value)
    except FembError:
        raise ValueError(
            f"'{value}' is not a backbone; choose one of {', '.join(list_backbones(aliases=True))}"
        ) from None
    return value


def _check_head_hparams(name: str, hparams: Mapping[str, Any], key: str) -> None:
    """Build a tiny head `name` with `hparams`; a refusal becomes a ValueError that starts with `key`."""
    if name not in list_headers():
        raise ValueError(f"{key}: not a head; choose one of {', '.join(list_headers())}")
    try:
        build_header(name, 8, 2, **hparams)
    except FembError as err:
        raise ValueError(f"{key}: {str(err).removeprefix(f'head {name}: ')}") from None


_LIGHTNING_NAME = re.compile(r"[a-z][a-z0-9_]*")
_DEVICE_INDICES = re.compile(r"\d+(,\d+)*,?")


def _device_spec(value: Any) -> Any:
    """Lightning's `devices`: "auto", -1 (every GPU), a count >= 1 (also as text), or GPU indices ("0,1", "0,")."""
    expected = (
        f"expected 'auto', -1 (every GPU), a number of devices >= 1, or GPU indices such as '0,1' "
        f"(got {short_repr(value)})"
    )
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(expected)
    if isinstance(value, int):
        if value == -1 or value >= 1:
            return value
        raise ValueError(expected)
    text = value.strip()
    if text == "auto" or re.fullmatch(r"-1|[1-9]\d*", text):
        return text
    if "," in text and _DEVICE_INDICES.fullmatch(text):
        indices = [int(i) for i in text.split(",") if i]
        if len(set(indices)) == len(indices):
            return text
        raise ValueError(f"GPU indices {text!r} name a device twice")
    raise ValueError(expected)


def _lightning_name(kind: str, examples: str) -> Any:
    """A validator of a Lightning registry name's syntax; `femb.training.preflight` checks it is known."""

    def check(value: str) -> str:
        name = value.strip().lower()
        if not _LIGHTNING_NAME.fullmatch(name):
            raise ValueError(f"not {kind} name; Lightning's are names such as {examples}")
        return name

    return check


Precision = Annotated[str, AfterValidator(_known_precision)]
Devices = Annotated[int | str, BeforeValidator(_device_spec)]
_accelerator_name = _lightning_name("an accelerator", "auto, cpu, gpu, cuda, mps")
AcceleratorName = Annotated[str, AfterValidator(_accelerator_name)]
StrategyName = Annotated[str, AfterValidator(_lightning_name("a strategy", "auto, ddp, ddp_spawn, fsdp"))]
HeadName = Annotated[str, AfterValidator(_known_head)]
BackboneName = Annotated[str, AfterValidator(_known_backbone)]
EmbeddingSize = Annotated[int, Field(ge=2)]


class Section(BaseModel):
    """A params section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthParams(Section):
    """`femb synth` sizes for the demo dataset (`loose_identities` / `ijb_subjects` 0: no loose/, IJBC/)."""

    identities: int = Field(DEFAULT_IDENTITIES, ge=2)
    images_per_identity: int = Field(DEFAULT_IMAGES_PER_IDENTITY, ge=2)
    pairs: int = Field(DEFAULT_PAIRS, ge=10)
    seed: int = Field(0, ge=0)
    loose_identities: int = Field(DEFAULT_LOOSE_IDENTITIES, ge=0)
    loose_images_per_identity: int = Field(DEFAULT_LOOSE_IMAGES_PER_IDENTITY, ge=2)
    ijb_subjects: int = Field(DEFAULT_IJB_SUBJECTS, ge=0)


class DataParams(Section):
    """Where the source dataset lives, how `femb convert` reads it, and where its Parquet shards go.

    `source` is an InsightFace directory, an image folder (`<identity>/.../<image>`) or an image list
    (`path label` lines, under `root`); `source_kind` says which when detection should not decide.
    `landmarks` aligns every image with its five points (docs/architecture.md "Image sources").
    """

    source: Path = Path("data/demo")
    shards: Path = Path("data/shards")
    synth: SynthParams = SynthParams()
    shard_size_mb: float = Field(256.0, gt=0)
    workers: int = Field(0, ge=0)
    source_kind: Literal["auto", "insightface", "folder", "list"] = "auto"
    root: Path | None = None
    landmarks: Path | None = None
    pairs: list[Path] = []
    image_size: int = Field(112, ge=16)
    jpeg_quality: int = Field(95, ge=1, le=100)
    lossless: bool = False
    skip_bad: bool = False


class PartialFCParams(Section):
    """Partial FC (An et al., CVPR 2022): class centres sharded across ranks, a sampled fraction of negatives."""

    enabled: bool = False
    sample_rate: float = Field(1.0, gt=0, le=1)


class OptimParams(Section):
    """The optimiser and its LR schedule, stepped per optimizer step (`train.optimizer`, `train.lr`, ...)."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["poly", "cosine", "step", "constant"] = "poly"
    warmup_steps: int = Field(50, ge=0)
    poly_power: float = Field(2.0, gt=0)
    milestones: list[int] = []
    gamma: float = Field(0.1, gt=0, le=1)


class BackboneOptions(Section):
    """How the backbone is built and run (`train.dropout`, `train.channels_last`, ...)."""

    dropout: float = Field(0.0, ge=0, lt=1)
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    # ViT only (None: the backbone's own default, e.g. vit_t 0.1 and 0.1; WebFace42M recipes 0.05 and 0.0)
    drop_path_rate: float | None = Field(None, ge=0, lt=1)
    mask_ratio: float | None = Field(None, ge=0, lt=1)


class TrainParams(OptimParams, BackboneOptions):
    """Optimisation and hardware: arcface_torch's recipe (SGD 0.1, poly, batch 128) sized for the CPU demo.

    The demo defaults (4 epochs of the 10,000 synthetic faces, 50 warm-up steps, one loader worker)
    reach about 0.98 verification accuracy on `demo` in a few minutes on two CPU cores; a real
    dataset wants more epochs (arcface_torch: 20 for MS1MV2) and more workers.
    """

    out_dir: Path = Path("models/train")
    batch_size: int = Field(128, ge=1)
    num_workers: int = Field(1, ge=0)
    shuffle_buffer: int = Field(8192, ge=0)
    max_epochs: int = Field(4, ge=1)
    max_steps: int = Field(-1, ge=-1)
    precision: Precision = "32-true"
    accelerator: AcceleratorName = "auto"
    devices: Devices = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: StrategyName = "auto"
    gradient_clip: float = Field(5.0, ge=0)
    accumulate_grad_batches: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(200, ge=1)
    val_every: int = Field(200, ge=1)
    val_sets: list[str] = []
    partial_fc: PartialFCParams = PartialFCParams()
    init_weights: Path | None = None  # fine-tuning: the backbone starts from these weights, the head fresh
    freeze_backbone_steps: int = Field(0, ge=0)  # fine-tuning: only the head trains for this many steps
    # A non-finite loss stops the run, or rewinds it: back to the last good checkpoint, past the batches
    # since (at least rewind_skip_batches), the LR times rewind_lr_factor; at most max_rewinds times.
    on_divergence: Literal["stop", "rewind"] = "stop"
    rewind_lr_factor: float = Field(0.5, gt=0, lt=1)
    max_rewinds: int = Field(3, ge=1)
    rewind_skip_batches: int = Field(0, ge=0)


class ModelParams(BackboneOptions):
    """What the LightningModule builds: a backbone of `embedding_size` features and a head over them.

    Not a params.yaml section of its own: `Params.model_section()` gathers it from `backbone`,
    `embedding_size`, `header`, `headers.<header>` (defaults filled in) and the backbone options of `train`.
    """

    backbone: BackboneName
    embedding_size: EmbeddingSize
    head: HeadName
    head_hparams: dict[str, Any] = {}

    @model_validator(mode="after")
    def _head_builds(self) -> ModelParams:
        _check_head_hparams(self.head, self.head_hparams, "head_hparams")
        return self

    def backbone_kwargs(self) -> dict[str, Any]:
        """The backbone constructor's options that differ from its defaults (not every backbone takes them)."""
        kwargs: dict[str, Any] = {}
        if self.dropout:
            kwargs["dropout"] = self.dropout
        if self.gradient_checkpointing:
            kwargs["gradient_checkpointing"] = True
        for key in ("drop_path_rate", "mask_ratio"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        return kwargs


class EvaluateParams(Section):
    """The verification sets (empty: every pair set `convert` wrote to `data.shards`), IJB releases, batch size.

    `ijb` lists IJB-B/C release directories (default: the demo IJB-C set `femb synth` writes);
    `ijb_normalize_images` and `ijb_faceness` pick eval_ijbc.py's modes (N1 D1 by default), and IJB
    features are cached under `ijb_cache` (outside the stage's outputs; null: not cached).
    """

    sets: list[str] = []
    batch_size: int = Field(128, ge=1)
    ijb: list[Path] = [Path("data/demo/IJBC")]
    ijb_normalize_images: bool = False
    ijb_faceness: bool = True
    ijb_cache: Path | None = Path(".femb-cache/ijb")


class ExportParams(Section):
    """ONNX export settings (opset 18: the torch.export exporter's own) and the model card beside it."""

    output: Path = Path("models/model.onnx")
    model_card: Path = Path("models/model.md")
    fp16: bool = False
    opset: int = Field(18, ge=17)


class CompareParams(Section):
    """Heads trained one after another by `flows.compare`."""

    headers: list[str] = ["arcface", "cosface", "magface"]


class Params(Section):
    """Everything params.yaml may set; `header` picks the trained head, `headers.<name>` its hyper-parameters."""

    header: HeadName = "arcface"
    backbone: BackboneName = "iresnet_tiny"
    embedding_size: EmbeddingSize = 512
    headers: dict[str, dict[str, Any]] = {}
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    compare: CompareParams = CompareParams()

    @model_validator(mode="after")
    def _heads_build(self) -> Params:
        for name, hparams in self.headers.items():
            _check_head_hparams(name, hparams or {}, f"headers.{name}")
        for name in self.compare.headers:
            if name not in list_headers():
                raise ValueError(
                    f"compare.headers: '{name}' is not a head; choose one of {', '.join(list_headers())}"
                )
        return self

    def header_hparams(self, name: str | None = None) -> dict[str, Any]:
        """The hyper-parameters of head `name` (default: the trained one): its defaults, then params.yaml."""
        name = name or self.header
        return {**header_defaults(name), **(self.headers.get(name) or {})}

    def model_section(self) -> ModelParams:
        """The model the train stage builds: backbone, embedding size, the trained head and its options."""
        options = self.train.model_dump(include=set(BackboneOptions.model_fields))
        return ModelParams(
            backbone=self.backbone,
            embedding_size=self.embedding_size,
            head=self.header,
            head_hparams=self.header_hparams(),
            **options,
        )


SectionT = TypeVar("SectionT", bound=Section)


def as_section(cls: type[SectionT], value: Section | Mapping[str, Any]) -> SectionT:
    """`value` validated as exactly a `cls`: a mapping (e.g. a checkpoint's hyper-parameters) or any
    section holding cls's keys (a `TrainParams` gives its `OptimParams` part)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(include=set(cls.model_fields))
    return cls.model_validate(value)


def _section_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the section at `loc` takes (empty when `loc` is not a section)."""
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    loc = tuple(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if not loc:  # a model validator's message starts with the key it is about
        return f"{source}: {message}"
    if first["type"] == "extra_forbidden":
        section = ".".join(str(part) for part in loc[:-1]) or "the top level"
        message = f"unknown key; {section} takes {', '.join(_section_keys(loc[:-1]))}"
    elif "input" in first and first["type"] != "missing" and short_repr(first["input"]) not in message:
        message = f"{message} (got {short_repr(first['input'])})"  # bounded: the input may be huge or deep
    return f"{source}: {short_text('.'.join(str(part) for part in loc))}: {message}"


def parse_params(data: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a params mapping; the first problem becomes a FembError naming its dotted key."""
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise FembError(_describe(err, source)) from None


def set_dotted(data: dict[str, Any], assignment: str) -> None:
    """Apply one `key.sub=value` override (value parsed as YAML), as `dvc exp run -S` does."""
    key, sep, raw = assignment.partition("=")
    shown = short_repr(assignment)
    if not sep or not key:
        raise FembError(f"--set {shown}: expected KEY=VALUE, e.g. train.lr=0.05")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FembError(f"--set {shown}: '{short_text(part)}' is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as err:
        raise FembError(
            f"--set {shown}: the value is not plain YAML ({_yaml_problem(err)}); "
            "give a number, true/false, text or a [list], and quote text that YAML would misread"
        ) from None


def _yaml_problem(err: BaseException) -> str:
    """What PyYAML found wrong, on one line (its messages span several, with a caret under the spot)."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    problem = getattr(err, "problem", None) or str(err)
    return short_text(problem, 120)


def load_params(path: Path | str = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (missing file: all defaults), apply `key=value` overrides, validate."""
    path = Path(path)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise FembError(f"{path}: cannot read the params file ({err.strerror or err})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise FembError(
                f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} at line {line}); save the file as UTF-8"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except (yaml.YAMLError, RecursionError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise FembError(f"{path}: not valid YAML{where} ({_yaml_problem(err)})") from None
        if not isinstance(data, dict):
            raise FembError(f"{path}: expected a mapping of keys at the top level")
    for assignment in overrides or []:
        set_dotted(data, assignment)
    return parse_params(data, str(path))
