"""Checks a training run before it starts anything: hardware params, batch size and memory against this machine.

Lightning checks `accelerator`, `devices` and `strategy` only once it builds the Trainer, after the run
has written `run.json` and begun; some values it takes happily and then hangs (99 CPU processes on 2
cores) or crashes in a later layer (BatchNorm on one image, the allocator on 10^12 class centres).
`preflight` refuses all of these first, each in one line that names the params key to change.
docs/architecture.md "Training configuration".
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from femb.backbones import create_backbone
from femb.config import Params
from femb.errors import FembError

# Bytes of a parameter as the Trainer keeps it (mixed precision keeps float32 master weights).
_PARAM_BYTES = {"64-true": 8, "bf16-true": 2, "16-true": 2}
# Strategies that fork the process: CUDA must not be initialised before them, so free memory is not asked.
_FORKING = ("fork", "notebook")


def preflight(params: Params, num_classes: int) -> None:
    """Refuse a run this machine cannot start, before any process or file exists (FembError naming the key).

    Checked: the accelerator exists and is available; `devices` fits it (no more CPU processes than
    cores, no more GPUs than are visible); the strategy is one Lightning knows; every device gets at
    least 2 images when the backbone has BatchNorm; and the weights, class centres (with their
    gradient and optimiser state, per device with or without partial FC) and logits fit in memory.
    """
    t = params.train
    accelerator = _accelerator(t.accelerator)
    _check_strategy(t.strategy)
    devices = _devices_per_node(accelerator, t.devices)
    backbone = _meta_backbone(params)
    if backbone is not None and t.batch_size < 2 and _has_batchnorm(backbone):
        raise FembError(
            f"train.batch_size={t.batch_size}: {params.backbone} has BatchNorm, which needs at least 2 "
            "images per device in training; set train.batch_size to 2 or more"
        )
    parameters = sum(p.numel() for p in backbone.parameters()) if backbone is not None else 0
    estimate = estimate_memory(params, num_classes, devices * t.num_nodes, parameters)
    _check_memory(estimate, accelerator, devices, t.strategy, t.partial_fc.enabled)


def _accelerator(name: str) -> str:
    """The accelerator Lightning would use for `name` ("auto" and "gpu" resolved), refused if unavailable."""
    from lightning.pytorch.accelerators import (
        AcceleratorRegistry,
        CUDAAccelerator,
        MPSAccelerator,
        XLAAccelerator,
    )

    known = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
    if name not in known:
        raise FembError(
            f"train.accelerator: '{name}' is not an accelerator; choose one of {', '.join(known)}"
        )
    if name == "auto":
        for resolved, cls in (("tpu", XLAAccelerator), ("mps", MPSAccelerator), ("cuda", CUDAAccelerator)):
            if cls.is_available():
                return resolved
        return "cpu"
    if name == "gpu":
        for resolved, cls in (("mps", MPSAccelerator), ("cuda", CUDAAccelerator)):
            if cls.is_available():
                return resolved
        raise FembError(
            f"train.accelerator=gpu: no GPU is available here (torch {torch.__version__}, "
            f"{torch.cuda.device_count()} CUDA device(s) visible, no MPS); set train.accelerator to auto or cpu"
        )
    if not AcceleratorRegistry[name]["accelerator"].is_available():
        needs = {
            "tpu": "a TPU and torch_xla",
            "cuda": "a CUDA GPU and a CUDA build of torch",
            "mps": "Apple MPS",
        }
        raise FembError(
            f"train.accelerator={name}: not available here (it needs {needs.get(name, 'its device')}); "
            "set train.accelerator to auto or cpu"
        )
    return name


def _check_strategy(name: str) -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    known = StrategyRegistry.available_strategies()
    if name != "auto" and name not in known:
        shown = ["auto", *(s for s in known if not re.search(r"find_unused|offload|stage|debug|tpu", s))]
        raise FembError(
            f"train.strategy: '{name}' is not a Lightning strategy; choose one of {', '.join(shown)} "
            "(or a variant that lightning.pytorch.strategies.StrategyRegistry lists)"
        )
    for prefix, package in (("deepspeed", "deepspeed"), ("xla", "torch_xla"), ("single_xla", "torch_xla")):
        if name.startswith(prefix) and importlib.util.find_spec(package) is None:
            raise FembError(f"train.strategy={name}: needs the {package} package, which is not installed")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _devices_per_node(accelerator: str, devices: int | str) -> int:
    """How many devices (processes) `devices` means on this node for `accelerator`; refused when too many."""
    text = str(devices).strip()
    indices = [int(i) for i in text.split(",") if i] if "," in text else None
    count = int(text) if indices is None and text != "auto" else None
    if accelerator == "cpu":
        if indices is not None or count == -1:
            raise FembError(
                f"train.devices={text}: GPU indices or -1 (every GPU) on a CPU run; "
                "give the number of training processes, or auto"
            )
        cores = usable_cores()
        if count is not None and count > cores:
            raise FembError(
                f"train.devices={count} would start {count} training processes on {cores} CPU core(s); "
                f"set train.devices to at most {cores} (or auto, one process)"
            )
        return count or 1
    if accelerator == "cuda":
        visible = torch.cuda.device_count()
        where = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"{visible} CUDA GPU(s) visible" + (
            f" (CUDA_VISIBLE_DEVICES={where})" if where is not None else ""
        )
        if indices is not None:
            missing = [i for i in indices if i >= visible]
            if missing:
                raise FembError(f"train.devices={text}: no GPU {missing[0]}, {seen}; GPU indices start at 0")
            return len(indices)
        if count is not None and count > visible:
            raise FembError(
                f"train.devices={count}: {seen}; set train.devices to at most {visible} (or auto)"
            )
        return visible if count in (None, -1) else count
    if accelerator == "mps":
        if (count or 1) != 1 or indices not in (None, [0]):
            raise FembError(f"train.devices={text}: Apple MPS is one device; set train.devices to 1 or auto")
        return 1
    return 1 if count in (None, -1) else (len(indices) if indices is not None else count)


def _meta_backbone(params: Params) -> nn.Module | None:
    """The run's backbone built on the meta device (shapes only, no memory); None if it cannot be built there."""
    m = params.model_section()
    try:
        with torch.device("meta"):
            return create_backbone(m.backbone, num_features=m.embedding_size, **m.backbone_kwargs())
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


@dataclass(frozen=True)
class MemoryEstimate:
    """What one device (rank) holds at least, in bytes, and the sizes behind it (for the message)."""

    backbone: int  # weights, gradients and optimiser state of the backbone
    centres: int  # the same for this rank's class centres
    logits: int  # one step's float32 logits and their gradient
    classes_per_rank: int
    embedding_size: int
    state_bytes: int  # bytes per parameter: weight, gradient and optimiser slots
    world_size: int

    @property
    def total(self) -> int:
        return self.backbone + self.centres + self.logits


def estimate_memory(
    params: Params, num_classes: int, world_size: int, backbone_parameters: int
) -> MemoryEstimate:
    """A lower bound of one rank's memory: parameters x (weight + gradient + optimiser slots), plus the logits.

    The class-centre matrix is `num_classes x embedding_size` on every rank, or its `1/world_size` shard
    under partial FC (arcface_torch PartialFC v2 keeps a dense gradient and momentum of the shard too).
    The logits are `batch x classes` (partial FC: the global batch x this rank's sampled centres) in at
    least float32, with their gradient. Activations are not counted: the estimate errs low, never high.
    """
    t = params.train
    param_bytes = _PARAM_BYTES.get(t.precision, 4)
    slots = 2 if t.optimizer == "adamw" else (1 if t.momentum > 0 else 0)
    state_bytes = param_bytes * (2 + slots)
    pfc = t.partial_fc
    classes = math.ceil(num_classes / world_size) if pfc.enabled else num_classes
    rows = t.batch_size * world_size if pfc.enabled else t.batch_size
    scored = max(1, int(classes * pfc.sample_rate)) if pfc.enabled else classes
    logit_bytes = max(param_bytes, 4)
    return MemoryEstimate(
        backbone=backbone_parameters * state_bytes,
        centres=classes * params.embedding_size * state_bytes,
        logits=rows * scored * logit_bytes * 2,
        classes_per_rank=classes,
        embedding_size=params.embedding_size,
        state_bytes=state_bytes,
        world_size=world_size,
    )


def available_memory(accelerator: str, strategy: str = "auto") -> tuple[int, str] | None:
    """Free bytes where one rank will live, and a name for it; None where that cannot be asked safely.

    CUDA: `torch.cuda.mem_get_info` of this process's device (LOCAL_RANK), not asked before a forking
    strategy (CUDA must stay uninitialised there). CPU: available RAM (psutil when installed, else
    sysconf), capped by a cgroup v2 memory limit.
    """
    if accelerator == "cuda":
        if any(word in strategy for word in _FORKING) or not torch.cuda.is_available():
            return None
        index = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"cuda:{index} has"
    if accelerator != "cpu":
        return None
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_memory_left()
    return (min(free, limit) if limit is not None else free), "this machine has"


def _cgroup_memory_left() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit, None without one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int((root / "memory.current").read_text()), 0)
    except (OSError, ValueError):
        return None


def _check_memory(
    estimate: MemoryEstimate, accelerator: str, devices: int, strategy: str, partial_fc: bool
) -> None:
    found = available_memory(accelerator, strategy)
    if found is None:
        return
    free, where = found
    processes = devices if accelerator == "cpu" else 1  # CPU ranks of a node share its RAM
    needed = estimate.total * processes
    if needed <= free:
        return
    per = f" x {processes} processes" if processes > 1 else ""
    parts = (
        f"class centres {_size(estimate.centres)} ({estimate.classes_per_rank:,} classes per rank x "
        f"{estimate.embedding_size:,} features x {estimate.state_bytes} bytes: weight, gradient, optimiser state), "
        f"logits {_size(estimate.logits)}, backbone {_size(estimate.backbone)}"
    )
    sizes = {"centres": estimate.centres, "logits": estimate.logits, "backbone": estimate.backbone}
    largest = max(sizes, key=sizes.__getitem__)
    split = (
        f"add train.devices / train.num_nodes ({estimate.world_size} rank(s) share the centres now)"
        if partial_fc
        else "set train.partial_fc.enabled=true with more train.devices / train.num_nodes to split the centres "
        "over ranks"
    )
    sample = (
        "lower train.partial_fc.sample_rate" if partial_fc else "set train.partial_fc.enabled=true with a "
    )
    advice = {
        "centres": f"{split}, or lower embedding_size",
        "logits": "lower train.batch_size or "
        + (sample if partial_fc else f"{sample}train.partial_fc.sample_rate below 1"),
        "backbone": "lower embedding_size or choose a smaller backbone",
    }[largest]
    raise FembError(
        f"train: needs at least {_size(estimate.total)} per rank{per} but {where} {_size(free)} free: "
        f"{parts}; {advice}"
    )


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:,.0f} {unit}" if unit == "B" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


__all__ = ["MemoryEstimate", "available_memory", "estimate_memory", "preflight", "usable_cores"]
