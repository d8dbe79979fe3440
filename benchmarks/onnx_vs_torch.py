"""CPU inference of an exported backbone: onnxruntime vs PyTorch eager, latency (batch 1) and throughput; print JSON.

Both runtimes get the same number of intra-op threads and the same float32 inputs. The backbone is
randomly initialised (speed does not depend on the weights; BatchNorm statistics from one random batch) and exported with `femb.export`, so
the ONNX graph is exactly the one `femb export` ships, parity check included.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from femb.backbones import create_backbone
from femb.export import export_onnx


def timings(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics from one random batch, so activations have a trained network's scale."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 112, 112) * 2 - 1)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="r50", help="backbone name or alias (r50, r18, mbf, ...)")
    parser.add_argument("--repeats", type=int, default=30, help="timed batch-1 runs (median reported)")
    parser.add_argument("--batch", type=int, default=64, help="throughput batch size")
    parser.add_argument("--batch-repeats", type=int, default=3, help="timed throughput batches (median)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads for both (default: torch's)")
    parser.add_argument("--fp16", action="store_true", help="benchmark the fp16 export instead")
    args = parser.parse_args()

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = calibrated(create_backbone(args.backbone))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        info = export_onnx(model, path, backbone=args.backbone, fp16=args.fp16)
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    one = rng.uniform(-1, 1, (1, 3, 112, 112)).astype(np.float32)
    many = rng.uniform(-1, 1, (args.batch, 3, 112, 112)).astype(np.float32)
    one_t, many_t = torch.from_numpy(one), torch.from_numpy(many)

    def run_ort(x: np.ndarray) -> Callable[[], object]:
        return lambda: session.run(["embedding"], {"data": x})

    def run_torch(x: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return model(x)

        return call

    report: dict[str, object] = {
        "backbone": info["backbone"],
        "precision": "fp16" if args.fp16 else "fp32",
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "export_s": round(export_s, 2),
        "parity_max_abs_diff": info["max_abs_diff"],
    }
    for name, fn_one, fn_many in (
        ("onnxruntime", run_ort(one), run_ort(many)),
        ("torch", run_torch(one_t), run_torch(many_t)),
    ):
        latency = statistics.median(timings(fn_one, args.repeats, warmup=3))
        batch_s = statistics.median(timings(fn_many, args.batch_repeats, warmup=1))
        report[f"{name}_latency_b1_ms"] = round(1000 * latency, 2)
        report[f"{name}_throughput_b{args.batch}_img_s"] = round(args.batch / batch_s, 1)
    report["latency_ratio_torch_over_ort"] = round(
        report["torch_latency_b1_ms"] / report["onnxruntime_latency_b1_ms"], 2
    )
    key = f"throughput_b{args.batch}_img_s"
    report["throughput_ratio_ort_over_torch"] = round(
        report[f"onnxruntime_{key}"] / report[f"torch_{key}"], 2
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
