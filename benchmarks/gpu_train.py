"""Training throughput and model FLOP utilisation (MFU) of a backbone + ArcFace on one CUDA GPU; prints JSON.

    python benchmarks/gpu_train.py                       # CUDA: about 1-2 minutes on an H200
    python benchmarks/gpu_train.py --compile             # adds a torch.compile'd run (+1-2 minutes)
    python benchmarks/gpu_train.py --backbone vit_t      # a ViT (also vit_s, vit_b) with its AdamW recipe
    python benchmarks/gpu_train.py --device cpu --tiny   # every code path on CPU at toy sizes, in seconds
    python benchmarks/gpu_train.py --device cpu --tiny --backbone vit_t   # the ViT code path on CPU

Without a CUDA device (and without --device cpu) it prints {"skipped": "no CUDA device"} and exits 0.
Defaults: iresnet50, ArcFace over 93,431 identities (MS1MV2), batch 256, bf16-mixed, channels_last,
SGD (momentum 0.9, weight decay 5e-4) with the per-step poly schedule and norm clipping at 5 as
`femb train` sets them. A ViT (`--backbone vit_t|vit_s|vit_b|...`) trains with arcface_torch's ViT
recipe instead: AdamW, lr 1e-3, weight decay 0.1 (none on the position embedding and mask token),
NCHW (channels_last does not apply), masking and drop path at the registry's defaults;
`--gradient-checkpointing` recomputes each block as arcface_torch does for vit_b/l/h. Each run
builds a fresh FaceRecognitionModule (seeded) and times `--steps` steps after `--warmup` steps,
between torch.cuda.synchronize() calls.

synthetic: random tensors already on the device, one run per variant:
    lightning             FaceRecognitionModule under a Lightning Trainer, as `femb train` runs it
                          (no logger/checkpoints/progress bar; cudnn.benchmark left off, as femb leaves it);
    eager                 the same step as a plain loop: forward, head loss, backward, clip, SGD, schedule;
    eager_cudnn_benchmark the plain loop with torch.backends.cudnn.benchmark = True;
    eager_no_label_check  as eager_cudnn_benchmark, minus the head's label range check (its
                          `bool(bad.any())` waits for the GPU once per step);
    eager_explicit_attention  (a ViT's default baseline) as eager_cudnn_benchmark with the attention
                          written out as arcface_torch does, instead of scaled_dot_product_attention;
    compiled              (--compile) as eager_cudnn_benchmark with the backbone torch.compile'd;
                          `warmup_seconds` includes compilation.
loader: `femb synth` demo faces (--images) converted by `femb convert` into a temporary directory,
    read by make_train_loader (--num-workers, pin_memory), batches copied with non_blocking=True into
    the eager step (same model and head as above, so the same FLOPs per step; cudnn.benchmark off),
    then the loader alone (no training) to show its ceiling. Demo epochs are short (images / batch
    steps), so epoch starts, where each worker refills its shuffle buffer, weigh more than on MS1MV2.
FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward + loss + backward of backbone and
head at the benchmark batch (convolutions and matmuls, as MFU counts them). A ViT is counted with its
attention written out (softmax(QK^T/sqrt(d))V: the same FLOPs as the fused kernel, which the counter
misses on a CPU and whose recomputation in backward is not model work); the counted forward is a
training one, so masked tokens cost nothing, and the JSON adds the analytic eval forward over all 144
tokens (`femb.backbones.vit.vit_forward_flops`) beside it. MFU = FLOPs per step x
steps per second / the device's peak dense bf16 FLOP/s (looked up by device name; --peak-tflops).
Progress goes to stderr, the JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # imported lazily, so that a machine without CUDA only prints "skipped"
    from femb.training.module import FaceRecognitionModule

Batch = tuple[Tensor, Tensor]
MS1MV2_IDENTITIES = 93_431
VARIANTS = (
    "lightning",
    "eager",
    "eager_cudnn_benchmark",
    "eager_no_label_check",
    "eager_explicit_attention",
    "compiled",
)
VARIANT_DEFAULT = (
    "lightning,eager,eager_cudnn_benchmark,eager_no_label_check"  # + explicit attention for a ViT
)

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from NVIDIA's datasheets, matched in order against
# the lower-cased device name; the first match wins.
PEAK_BF16: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h200",), 989e12),
    (("h100", "pcie"), 756e12),
    (("h100", "nvl"), 835e12),
    (("h100",), 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("h800",), 989e12),
    (("b200",), 2250e12),
    (("a100",), 312e12),
    (("a800",), 312e12),
    (("l40s",), 362e12),
    (("l4",), 121e12),
)

_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr, stamped with the seconds since start."""
    print(f"[{time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """Peak dense bf16 FLOP/s of the device and where the number came from."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for a CPU; pass --peak-tflops"
    name = torch.cuda.get_device_name(device).lower()
    for keys, value in PEAK_BF16:
        if all(key in name for key in keys):
            return value, f"table: {' '.join(keys)}"
    return None, f"'{name}' is not in the table; pass --peak-tflops"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device, for the JSON."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = torch.cuda.get_device_name(device)
        info["device_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def build_module(
    args: argparse.Namespace, device: torch.device, compile: bool = False
) -> FaceRecognitionModule:
    """A seeded FaceRecognitionModule on the device, its parameters in the module's memory format."""
    from femb.config import ModelParams, OptimParams, PartialFCParams
    from femb.training.module import FaceRecognitionModule

    torch.manual_seed(args.seed)
    model = ModelParams(
        backbone=args.backbone,
        embedding_size=args.embedding_size,
        head=args.header,
        channels_last=args.channels_last,
        compile=compile,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    partial_fc = PartialFCParams(enabled=args.sample_rate < 1.0, sample_rate=args.sample_rate)
    optim = OptimParams(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=0)
    module = FaceRecognitionModule(args.num_classes, model, optim, partial_fc)
    if partial_fc.enabled:
        module.build_partial_fc()  # one process: Lightning's setup would do this
    return module.to(device)


class EagerStep:
    """One training step of the module's backbone and head without Lightning (what Lightning's loop does)."""

    def __init__(
        self,
        module: FaceRecognitionModule,
        args: argparse.Namespace,
        device: torch.device,
        total_steps: int,
        label_check: bool = True,
    ) -> None:
        from femb.training.module import input_dtype, prepare_batch
        from femb.training.optim import build_optimizer, no_weight_decay_names

        self.prepare = prepare_batch  # what FaceRecognitionModule.on_after_batch_transfer does
        self.module = module.train()
        self.clip = args.gradient_clip
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # as configure_optimizers
        self.params = [p for _, p in named]
        self.optimizer, self.scheduler = build_optimizer(
            named, module.optim, total_steps, no_weight_decay_names(module)
        )
        self.dtype = input_dtype(module.backbone)
        self.autocast: Callable[[], Any] = nullcontext
        if args.precision == "bf16-mixed":
            self.autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16)
        head = module.header
        if module.partial_fc is not None or label_check:
            self.loss_fn: Callable[[Tensor, Tensor], Tensor] = module.loss
        else:
            # MarginHead.logits_and_loss minus its label range check (_logits is forward() after the checks).
            def unchecked(emb: Tensor, labels: Tensor) -> Tensor:
                norms = head.feature_norms(emb)
                logits = head._logits(emb, labels, head.weight, norms)
                return F.cross_entropy(logits, labels) + head.regulariser(norms)

            self.loss_fn = unchecked

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """Forward pass and loss under the step's precision (uint8 images normalised as the module does)."""
        images, labels = self.prepare((images, labels), self.dtype)
        with self.autocast():
            return self.loss_fn(self.module(images), labels)

    def __call__(self, images: Tensor, labels: Tensor) -> None:
        loss = self.loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.backbone.parameters(), self.clip)  # as femb
        self.optimizer.step()
        self.scheduler.step()


def _attentions(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The ViT attention layers of a module (none for a CNN)."""
    from femb.backbones.vit import Attention

    return [m for m in module.modules() if isinstance(m, Attention)]


def count_flops(step: EagerStep, images: Tensor, labels: Tensor) -> dict[str, float]:
    """FLOPs of one forward + loss + backward (no optimizer step), and of the backbone forward per image.

    A ViT's attention is counted written out (the fused kernels' FLOPs, which the CPU counter misses).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from femb.backbones.vit import VisionTransformer, vit_forward_flops

    attentions = _attentions(step.module)
    for attention in attentions:
        attention.fused = False
    try:
        with FlopCounterMode(display=False) as counter:
            loss = step.loss(images, labels)
            loss.backward()
        step.optimizer.zero_grad(set_to_none=True)
        total = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter, torch.no_grad(), step.autocast():
            step.module(images)
    finally:
        for attention in attentions:
            attention.fused = True
    counted = {
        "flops_per_step": float(total),
        "backbone_forward_gflops_per_image": counter.get_total_flops() / images.shape[0] / 1e9,
    }
    if isinstance(step.module.backbone, VisionTransformer):
        counted["analytic_backbone_forward_gflops_per_image"] = vit_forward_flops(step.module.backbone) / 1e9
    return counted


def make_pool(args: argparse.Namespace, device: torch.device) -> list[Batch]:
    """Two distinct batches of random images and labels, already on the device."""
    generator = torch.Generator().manual_seed(args.seed)
    return [
        (
            torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device),
            torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device),
        )
        for _ in range(2)
    ]


def timed_loop(
    step: Callable[[Tensor, Tensor], None],
    batches: Iterator[Batch],
    warmup: int,
    steps: int,
    device: torch.device,
    to_device: bool = False,
) -> dict[str, float]:
    """Run warmup + steps steps; wall seconds of the warm-up and of the timed steps (device-synchronised)."""
    start = time.perf_counter()
    for _ in range(warmup):
        images, labels = next(batches)
        if to_device:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        step(images, labels)
    sync(device)
    timed = time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        if to_device:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        step(images, labels)
    sync(device)
    end = time.perf_counter()
    return {"warmup_seconds": timed - start, "seconds": end - timed}


def cycle(pool: list[Batch]) -> Iterator[Batch]:
    """The pool's batches in turn, forever."""
    while True:
        yield from pool


def run_lightning(args: argparse.Namespace, device: torch.device, pool: list[Batch]) -> dict[str, float]:
    """The module under a minimal Lightning Trainer on the synthetic batches, timed by a callback."""
    import lightning as L

    for name in ("lightning.pytorch", "lightning.fabric"):  # after the import, which sets INFO
        logging.getLogger(name).setLevel(logging.ERROR)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_end(self, trainer: L.Trainer, *rest: Any) -> None:
            if trainer.global_step in (args.warmup, args.warmup + args.steps):
                sync(device)
                self.marks.append(time.perf_counter())

    class Batches:
        def __len__(self) -> int:
            return args.warmup + args.steps

        def __iter__(self) -> Iterator[Batch]:
            for i in range(len(self)):
                yield pool[i % len(pool)]

    clock = Clock()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" and device.index is not None else 1,
        max_steps=args.warmup + args.steps,
        precision=args.precision,
        gradient_clip_val=args.gradient_clip or None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=10,
        callbacks=[clock],
    )
    module = build_module(args, torch.device("cpu"))
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=Batches())
    if len(clock.marks) != 2:
        raise RuntimeError(
            f"Lightning stopped at step {trainer.global_step}, expected {args.warmup + args.steps}"
        )
    return {"warmup_seconds": clock.marks[0] - start, "seconds": clock.marks[1] - clock.marks[0]}


def rates(result: dict[str, float], steps: int, batch_size: int, flops: float, peak: float | None) -> dict:
    """Images/s, step time, achieved TFLOP/s and MFU of a timed run of `steps` steps."""
    step_s = result["seconds"] / steps
    achieved = flops / step_s
    return {
        "images_per_sec": round(batch_size / step_s, 1),
        "step_ms": round(1000 * step_s, 2),
        "achieved_tflops": round(achieved / 1e12, 2),
        "mfu": round(achieved / peak, 4) if peak else None,
        "warmup_seconds": round(result["warmup_seconds"], 1),
    }


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def synthetic_section(
    args: argparse.Namespace, device: torch.device, variants: list[str], flops: float, peak: float | None
) -> dict[str, dict]:
    """Every variant on the same synthetic batches."""
    pool = make_pool(args, device)
    results = {}
    total = args.warmup + args.steps
    for variant in variants:
        progress(f"synthetic: {variant} ({args.warmup} warm-up + {args.steps} timed steps)")
        _reset_memory(device)
        torch.backends.cudnn.benchmark = variant not in ("lightning", "eager")
        if variant == "lightning":
            timing = run_lightning(args, device, pool)
        else:
            module = build_module(args, device, compile=variant == "compiled")
            if variant == "eager_explicit_attention":  # the official softmax(QK^T/sqrt(d))V, no fused kernel
                for attention in _attentions(module):
                    attention.fused = False
            step = EagerStep(module, args, device, total, label_check=variant != "eager_no_label_check")
            timing = timed_loop(step, cycle(pool), args.warmup, args.steps, device)
            del step, module
        results[variant] = {
            **rates(timing, args.steps, args.batch_size, flops, peak),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "max_memory_gb": _peak_memory(device),
        }
        progress(f"synthetic: {variant}: {results[variant]}")
    torch.backends.cudnn.benchmark = False
    return results


def demo_shards(workdir: Path, images: int, seed: int) -> tuple[Path, dict[str, float]]:
    """`femb synth` + `femb convert` of about `images` faces (25 per identity) under workdir."""
    from femb.data.convert import convert
    from femb.data.synth import synthesize

    started = time.perf_counter()
    synthesize(
        workdir / "demo",
        identities=max(2, images // 25),
        images_per_identity=25,
        pairs=2,
        seed=seed,
        progress=False,
    )
    synthesized = time.perf_counter()
    convert(workdir / "demo", workdir / "shards", workers=0, progress=False)
    converted = time.perf_counter()
    return workdir / "shards", {
        "synth_seconds": round(synthesized - started, 1),
        "convert_seconds": round(converted - synthesized, 1),
    }


def epochs(loader: Any) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch (each new iterator is the next epoch)."""
    while True:
        yield from loader


def loader_section(
    args: argparse.Namespace, device: torch.device, flops: float, peak: float | None
) -> dict[str, Any]:
    """The eager step fed by the real loader from shards, and the loader alone."""
    from femb.data.loader import make_train_loader, read_num_classes

    with tempfile.TemporaryDirectory(prefix="femb-gpu-train-") as tmp:
        progress(f"loader: synthesising {args.images} faces and converting them")
        shards, prep = demo_shards(Path(tmp), args.images, args.seed)
        progress(f"loader: data ready {prep}")
        loader = make_train_loader(
            shards,
            args.batch_size,
            args.num_workers,
            seed=args.seed,
            pin_memory=device.type == "cuda",
        )
        batches_per_epoch = len(loader)
        demo_classes = read_num_classes(shards)
        if demo_classes > args.num_classes:
            raise SystemExit(
                f"--num-classes {args.num_classes} is below the demo's {demo_classes} identities"
            )
        _reset_memory(device)
        torch.backends.cudnn.benchmark = False  # as `femb train` leaves it
        module = build_module(args, device)
        step = EagerStep(module, args, device, args.warmup + args.loader_steps)
        progress(f"loader: training {args.warmup} warm-up + {args.loader_steps} timed steps")
        stream = epochs(loader)
        timing = timed_loop(step, stream, args.warmup, args.loader_steps, device, to_device=True)
        del step, module
        train = rates(timing, args.loader_steps, args.batch_size, flops, peak)
        progress(f"loader: training {train}")
        progress(f"loader: loader alone, {args.loader_steps} batches")
        started = time.perf_counter()
        for _ in range(args.loader_steps):
            images, labels = next(stream)
            images.to(device, non_blocking=True)
        sync(device)
        alone = args.loader_steps * args.batch_size / (time.perf_counter() - started)
        progress(f"loader: alone {alone:.0f} images/s")
        del stream, loader
    return {
        **prep,
        "images": args.images,
        "demo_identities": demo_classes,
        "batches_per_epoch": batches_per_epoch,
        "num_workers": args.num_workers,
        "cpu_count": os.cpu_count(),
        "pin_memory": device.type == "cuda",
        "training": {**train, "cudnn_benchmark": False, "max_memory_gb": _peak_memory(device)},
        "loader_alone_images_per_sec": round(alone, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda", help="cuda (default), cuda:N, or cpu for a code-path check"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="toy sizes (batch 16, 3 steps; iresnet_tiny unless --backbone)"
    )
    parser.add_argument("--backbone", default=None, help="iresnet50 (default), vit_t, vit_s, vit_b, ...")
    parser.add_argument("--header", default="arcface")
    parser.add_argument("--num-classes", type=int, default=MS1MV2_IDENTITIES, help="synthetic section")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="partial FC sample rate; 1 = full FC")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "32-true"))
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW")
    parser.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default=None, help="default: adamw for a ViT"
    )
    parser.add_argument("--lr", type=float, default=None, help="default: 0.1 (SGD), 1e-3 (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 (SGD), 0.1 (AdamW)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    parser.add_argument("--gradient-clip", type=float, default=5.0, help="clip-by-norm value; 0 disables")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing (compilation included)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per synthetic variant")
    parser.add_argument("--loader-steps", type=int, default=120, help="timed steps through the loader")
    parser.add_argument("--images", type=int, default=20_000, help="demo faces for the loader section")
    parser.add_argument("--num-workers", type=int, default=10, help="loader worker processes")
    parser.add_argument(
        "--variants",
        default=VARIANT_DEFAULT,
        help=f"comma-separated synthetic variants, of {', '.join(VARIANTS)}",
    )
    parser.add_argument("--compile", action="store_true", help="add the 'compiled' variant")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s override")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's; --tiny: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.backbone is None:
        args.backbone = "iresnet_tiny" if args.tiny else "iresnet50"
    vit = args.backbone.startswith("vit_")
    if vit:
        args.channels_last = False  # a ViT's convolution is one patch embedding: NCHW
    args.optimizer = args.optimizer or ("adamw" if vit else "sgd")
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adamw" else 0.1
    if args.weight_decay is None:
        args.weight_decay = 0.1 if args.optimizer == "adamw" else 5e-4
    if args.tiny:
        args.num_classes, args.batch_size = 1000, 16
        args.warmup, args.steps, args.loader_steps = 1, 3, 3
        args.images, args.num_workers = 400, min(args.num_workers, 2)
        args.threads = args.threads or 1
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.compile and "compiled" not in variants:
        variants.append("compiled")
    if vit and "eager_explicit_attention" not in variants and args.variants == VARIANT_DEFAULT:
        variants.append("eager_explicit_attention")  # the baseline beside the fused attention
    if not vit and "eager_explicit_attention" in variants:
        parser.error("--variants: eager_explicit_attention needs a ViT backbone")
    if args.sample_rate < 1.0 and "eager_no_label_check" in variants:
        variants.remove("eager_no_label_check")  # partial FC has its own checks and syncs
    args.variants = variants
    if min(args.warmup, args.steps, args.loader_steps) < 1:
        parser.error("--warmup, --steps and --loader-steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_train", "skipped": "no CUDA device", "torch": torch.__version__}))
        return
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    warnings.filterwarnings("ignore", module="lightning")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True  # only matters for 32-true
    torch.backends.cudnn.allow_tf32 = True

    env = environment(device)
    progress(f"{env['device_name']}, torch {env['torch']}, cuda {env['cuda']}")
    peak, peak_source = peak_flops(device, args.peak_tflops)
    progress("counting FLOPs of one forward + backward")
    module = build_module(args, device)
    step = EagerStep(module, args, device, 1)
    images, labels = make_pool(args, device)[0]
    counted = count_flops(step, images, labels)
    del step, module, images, labels
    flops = counted["flops_per_step"]
    progress(
        f"{flops / 1e12:.2f} TFLOP per step, {counted['backbone_forward_gflops_per_image']:.2f} GFLOP/image"
    )

    result: dict[str, Any] = {
        "benchmark": "gpu_train",
        **env,
        "backbone": args.backbone,
        "header": args.header,
        "num_classes": args.num_classes,
        "sample_rate": args.sample_rate,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "gradient_checkpointing": args.gradient_checkpointing,
        "gradient_clip": args.gradient_clip,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "tflop_per_step": round(flops / 1e12, 3),
        "backbone_forward_gflops_per_image": round(counted["backbone_forward_gflops_per_image"], 3),
        "peak_tflops": round(peak / 1e12, 1) if peak else None,
        "peak_source": peak_source,
        "mfu_target": 0.40,
    }
    if "analytic_backbone_forward_gflops_per_image" in counted:
        result["analytic_backbone_forward_gflops_per_image"] = round(
            counted["analytic_backbone_forward_gflops_per_image"], 3
        )
    if not args.skip_synthetic:
        result["synthetic"] = synthetic_section(args, device, args.variants, flops, peak)
        best = max(result["synthetic"].values(), key=lambda r: r["images_per_sec"])
        result["best_synthetic_mfu"] = best["mfu"]
        femb = result["synthetic"].get("lightning")
        result["mfu_target_met_as_femb_trains"] = (
            None if femb is None or femb["mfu"] is None else femb["mfu"] >= 0.40
        )
    if not args.skip_loader:
        result["loader"] = loader_section(args, device, flops, peak)
    result["seconds"] = round(time.perf_counter() - _STARTED, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
