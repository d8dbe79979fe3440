"""Training-loader throughput on one core, against arcface_torch's per-sample pipeline and bare libjpeg-turbo.

Prints one JSON object. Data: `femb synth` faces (112x112 JPEG) converted by `femb convert`, so the loader
reads real shards. Three single-process measurements (torch limited to one thread):
  loader:     make_train_loader(num_workers=0) for whole epochs: Parquet read, shuffle buffer, decode,
              flip, normalise, batch;
  arcface:    arcface_torch's transform chain per sample on in-memory bytes, then default collation:
              PIL decode -> np.array -> ToPILImage -> RandomHorizontalFlip -> ToTensor -> Normalize(0.5, 0.5),
              re-implemented here as torchvision implements each step (torchvision is not installed);
  decode:     simplejpeg.decode_jpeg(..., colorspace="RGB") of the same bytes, nothing else.
Targets: loader >= 3x arcface and >= 0.5x decode.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import simplejpeg
import torch
from PIL import Image

from femb.data.loader import make_train_loader
from femb.data.shards import convert
from femb.data.synth import synthesize


def _to_pil_image(npimg: np.ndarray) -> Image.Image:
    """torchvision ToPILImage for an H x W x 3 uint8 ndarray: mode RGB."""
    return Image.fromarray(npimg)


def _random_horizontal_flip(img: Image.Image, p: float = 0.5) -> Image.Image:
    """torchvision RandomHorizontalFlip on a PIL image: torch.rand(1) < p -> FLIP_LEFT_RIGHT."""
    if torch.rand(1) < p:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def _to_tensor(pic: Image.Image) -> torch.Tensor:
    """torchvision ToTensor on an RGB PIL image: copy to uint8 HWC, permute to CHW, contiguous, float / 255."""
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
    img = img.permute((2, 0, 1)).contiguous()
    return img.to(dtype=torch.get_default_dtype()).div(255)


def _normalize(tensor: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """torchvision Normalize (inplace=False): clone, then sub_(mean[:, None, None]).div_(std[:, None, None])."""
    tensor = tensor.clone()
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)
    if (std_t == 0).any():
        raise ValueError("std evaluated to zero")
    return tensor.sub_(mean_t[:, None, None]).div_(std_t[:, None, None])


def arcface_sample(data: bytes) -> torch.Tensor:
    """One training sample the way arcface_torch's dataset + transforms make it."""
    sample = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    img = _random_horizontal_flip(_to_pil_image(sample))
    return _normalize(_to_tensor(img), [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


def loader_epoch(loader) -> int:
    """One epoch of our loader; returns the images it yielded."""
    images = 0
    for batch, _labels in loader:
        images += batch.shape[0]
    return images


def arcface_epoch(data: list[bytes], labels: list[int], batch_size: int) -> int:
    """arcface_torch's per-sample transforms plus default collation (torch.stack) over whole batches."""
    usable = len(data) // batch_size * batch_size
    for lo in range(0, usable, batch_size):
        samples = [arcface_sample(d) for d in data[lo : lo + batch_size]]
        targets = [torch.tensor(y, dtype=torch.long) for y in labels[lo : lo + batch_size]]
        torch.stack(samples), torch.stack(targets)
    return usable


def decode_epoch(data: list[bytes]) -> int:
    """Bare libjpeg-turbo decode of every image."""
    for d in data:
        simplejpeg.decode_jpeg(d, colorspace="RGB")
    return len(data)


def measure(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, dict[str, float]]:
    """Images per wall second and per CPU second of this process for each run: medians over `repeats`
    passes taken in turn, so that load from other processes hits every pipeline alike."""
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    images: dict[str, int] = {}
    for run in runs.values():  # warm-up: first touch of memory, Parquet footers, caches
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            images[name] = run()
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    return {
        "img_per_s": {name: images[name] / statistics.median(wall[name]) for name in runs},
        "img_per_cpu_s": {name: images[name] / statistics.median(cpu[name]) for name in runs},
    }


def _summary(rates: dict[str, float]) -> dict:
    vs_arcface = rates["loader"] / rates["arcface_torch_style"]
    vs_decode = rates["loader"] / rates["simplejpeg_decode"]
    return {
        **{name: round(rate) for name, rate in rates.items()},
        "loader_vs_arcface_torch": round(vs_arcface, 2),
        "loader_vs_decode": round(vs_decode, 2),
        "targets_met": vs_arcface >= 3.0 and vs_decode >= 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="face images to generate (25 per identity)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per pipeline; the median counts")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: temporary)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        synthesize(
            work / "demo",
            identities=max(2, args.images // 25),
            images_per_identity=25,
            pairs=2,
            progress=False,
        )
        convert(work / "demo", work / "shards", workers=1, progress=False)
        table = pq.read_table(sorted((work / "shards").glob("train-*.parquet")), columns=["label", "image"])
        data, labels = table.column("image").to_pylist(), table.column("label").to_pylist()

        loader = make_train_loader(work / "shards", args.batch_size, num_workers=0)
        rates = measure(
            {
                "loader": lambda: loader_epoch(loader),
                "arcface_torch_style": lambda: arcface_epoch(data, labels, args.batch_size),
                "simplejpeg_decode": lambda: decode_epoch(data),
            },
            args.repeats,
        )

    result = {
        "images": len(data),
        "mean_jpeg_bytes": round(sum(map(len, data)) / len(data)),
        "batch_size": args.batch_size,
        "loader_images_per_epoch": len(loader) * args.batch_size,
        "processes": 1,
        "torch_threads": torch.get_num_threads(),
        "per_wall_second": _summary(rates["img_per_s"]),
        "per_cpu_second": _summary(rates["img_per_cpu_s"]),
        "targets": {"loader_vs_arcface_torch": 3.0, "loader_vs_decode": 0.5},
        "notes": (
            f"medians of {args.repeats} interleaved passes after one warm-up pass; per_cpu_second counts this "
            "process's user+system time (steadier on a shared machine); the loader reads Parquet shards "
            "from disk (page cache), the other two work on in-memory bytes; torchvision is not installed, so "
            "ToPILImage, RandomHorizontalFlip, ToTensor and Normalize are re-implemented step by step as "
            "torchvision implements them"
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
