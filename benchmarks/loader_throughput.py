"""Training-loader throughput on one core, against bare libjpeg-turbo and arcface_torch's torchvision pipeline.

Prints one JSON object. Two image sets, each converted to Parquet shards so that the loader reads real
files: the `femb synth` demo faces (~2.8 KB JPEGs) and the same faces with a seeded noise texture
re-encoded at quality 95 (~8 KB by default, closer to MS1MV2's). For each set, three pipelines take
turns, one epoch each, `--repeats` times (medians count), all single-process with one torch thread:
  loader:       make_train_loader(num_workers=0): Parquet read, shuffle buffer, decode, flip, uint8 batch;
  decode:       simplejpeg.decode_jpeg(..., colorspace="RGB") of the same bytes, nothing else;
  torchvision:  arcface_torch's MXFaceDataset transform with the real torchvision, in a DataLoader
                (benchmarks/torchvision_pipeline.py), in-process if torchvision imports here, else in
                a long-lived subprocess of `--torchvision-python` that times its own epochs.
Targets: loader >= 0.8x decode and >= 3x torchvision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import simplejpeg
import torch

from femb.data.convert import convert
from femb.data.layout import SHARD_SCHEMA, read_manifest, shard_files, write_manifest
from femb.data.loader import make_train_loader
from femb.data.synth import synthesize

HERE = Path(__file__).resolve().parent
TARGETS = {"loader_vs_decode": 0.8, "loader_vs_torchvision": 3.0}
Pass = Callable[[], dict[str, float]]  # one timed epoch: {"images", "wall_s", "cpu_s"}


def timed(run: Callable[[], int]) -> Pass:
    """A pass timed in this process, on the wall and on this process's CPU clock."""

    def one_pass() -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        images = run()
        return {"images": images, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}

    return one_pass


def loader_epoch(loader) -> int:
    """One epoch of femb's loader; returns the images it yielded."""
    return sum(images.shape[0] for images, _labels in loader)


def decode_epoch(data: list[bytes]) -> int:
    """Bare libjpeg-turbo decode of every image."""
    for d in data:
        simplejpeg.decode_jpeg(d, colorspace="RGB")
    return len(data)


def textured(data: list[bytes], target_bytes: int, seed: int = 0) -> tuple[list[bytes], float]:
    """The images with seeded Gaussian noise re-encoded at quality 95; the noise level is searched so that
    the mean size is about `target_bytes`. Returns the images and the noise sigma."""
    pixels = [simplejpeg.decode_jpeg(d, colorspace="RGB") for d in data]
    noise = np.random.default_rng(seed).normal(0, 1, (len(pixels), *pixels[0].shape)).astype(np.float32)

    def encode(sigma: float, indices) -> list[bytes]:
        out = []
        for i in indices:
            noisy = np.clip(pixels[i] + sigma * noise[i], 0, 255).astype(np.uint8)
            out.append(simplejpeg.encode_jpeg(noisy, quality=95, colorspace="RGB"))
        return out

    sample = range(0, len(pixels), max(1, len(pixels) // 200))
    low, high = 0.0, 64.0
    for _ in range(12):
        sigma = (low + high) / 2
        low, high = (
            (sigma, high) if np.mean([len(d) for d in encode(sigma, sample)]) < target_bytes else (low, sigma)
        )
    sigma = (low + high) / 2
    return encode(sigma, range(len(pixels))), sigma


def write_like(shards: Path, out: Path, images: list[bytes]) -> None:
    """Shards with the rows, row groups and manifest of `shards` but other image bytes (order kept)."""
    out.mkdir(parents=True)
    start = 0
    for path in shard_files(shards):
        table = pq.read_table(path)
        rows = table.num_rows
        table = table.set_column(2, "image", pa.array(images[start : start + rows], pa.binary())).cast(
            SHARD_SCHEMA
        )
        group = pq.ParquetFile(path).metadata.row_group(0).num_rows
        pq.write_table(table, out / path.name, row_group_size=group, compression="none", use_dictionary=False)
        start += rows
    write_manifest(out, read_manifest(shards))


def read_rows(shards: Path) -> tuple[list[bytes], list[int]]:
    """Every image and label of the shards, in file order."""
    table = pq.read_table(shard_files(shards), columns=["label", "image"])
    return table.column("image").to_pylist(), table.column("label").to_pylist()


def write_data(data_dir: Path, images: list[bytes], labels: list[int]) -> None:
    """The images and labels as torchvision_pipeline.read_data reads them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "images.bin").write_bytes(b"".join(images))
    np.save(data_dir / "lengths.npy", np.array([len(image) for image in images], np.int64))
    np.save(data_dir / "labels.npy", np.array(labels, np.int64))


class TorchvisionSubprocess:
    """torchvision_pipeline.py in another Python; each pass asks it for one timed epoch."""

    def __init__(self, python: str, data_dir: Path, batch_size: int) -> None:
        script = HERE / "torchvision_pipeline.py"
        self.process = subprocess.Popen(
            [python, str(script), str(data_dir), str(batch_size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        ready = self.process.stdout.readline()
        if not ready:
            raise RuntimeError(f"{python} {script} did not start (see its stderr)")
        self.versions = json.loads(ready)

    def __call__(self) -> dict[str, float]:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def torchvision_pass(
    python: str | None, data_dir: Path, data: list[bytes], labels: list[int], batch_size: int
) -> tuple[Pass | None, Callable[[], None], str]:
    """The torchvision baseline (in-process when torchvision imports here), its closer, and a note."""
    if python is None:
        try:
            sys.path.insert(0, str(HERE))
            import torchvision_pipeline as tv  # noqa: PLC0415
        except ImportError as err:
            return None, lambda: None, f"torchvision unavailable ({err}); pass --torchvision-python"
        loader = tv.make_loader(data, np.array(labels), batch_size)
        return (
            timed(lambda: loader_epoch(loader)),
            lambda: None,
            f"torchvision {tv.torchvision.__version__} in-process",
        )
    tv_process = TorchvisionSubprocess(python, data_dir, batch_size)
    versions = tv_process.versions
    note = f"torchvision {versions['torchvision']} (torch {versions['torch']}) in a subprocess of {python}"
    return tv_process, tv_process.close, note


def measure(passes: dict[str, Pass], repeats: int) -> dict[str, dict[str, float]]:
    """Images per wall second and per CPU second for each pipeline: medians over `repeats` rounds in which
    the pipelines take turns, so that load from other processes hits every pipeline alike."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in passes}
    for name, one_pass in passes.items():  # warm-up: first touch of memory, Parquet footers, caches
        if name != "torchvision":  # the subprocess warmed itself up
            one_pass()
    for _ in range(repeats):
        for name, one_pass in passes.items():
            runs[name].append(one_pass())
    return {
        clock: {
            name: statistics.median(r["images"] / r[f"{clock}_s"] for r in results)
            for name, results in runs.items()
        }
        for clock in ("wall", "cpu")
    }


def summary(rates: dict[str, float]) -> dict:
    """Rounded rates and the two ratios against their targets."""
    out: dict = {name: round(rate) for name, rate in rates.items()}
    out["loader_vs_decode"] = round(rates["loader"] / rates["decode"], 3)
    if "torchvision" in rates:
        out["loader_vs_torchvision"] = round(rates["loader"] / rates["torchvision"], 2)
    out["targets_met"] = all(out[key] >= target for key, target in TARGETS.items() if key in out)
    return out


def bench_set(name: str, shards: Path, work: Path, args: argparse.Namespace) -> dict:
    """All three pipelines on one image set."""
    data, labels = read_rows(shards)
    data_dir = work / f"{name}-raw"
    write_data(data_dir, data, labels)
    loader = make_train_loader(shards, args.batch_size, num_workers=0)
    passes: dict[str, Pass] = {
        "loader": timed(lambda: loader_epoch(loader)),
        "decode": timed(lambda: decode_epoch(data)),
    }
    tv, close, note = torchvision_pass(args.torchvision_python, data_dir, data, labels, args.batch_size)
    if tv is not None:
        passes["torchvision"] = tv
    try:
        rates = measure(passes, args.repeats)
    finally:
        close()
    return {
        "images": len(data),
        "mean_jpeg_bytes": round(sum(map(len, data)) / len(data)),
        "loader_images_per_epoch": len(loader) * args.batch_size,
        "per_wall_second": summary(rates["wall"]),
        "per_cpu_second": summary(rates["cpu"]),
        "torchvision": note,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="face images to generate (25 per identity)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per pipeline; the median counts")
    parser.add_argument("--textured-bytes", type=int, default=8000, help="mean JPEG size of the textured set")
    parser.add_argument("--sets", default="demo,textured", help="which image sets to run: demo, textured")
    parser.add_argument(
        "--torchvision-python",
        default=None,
        help="a Python whose environment has torch + torchvision (default: import torchvision here)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: temporary)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        synthesize(
            work / "demo-src",
            identities=max(2, args.images // 25),
            images_per_identity=25,
            pairs=2,
            progress=False,
        )
        convert(work / "demo-src", work / "demo", workers=1, progress=False)
        sets = {"demo": work / "demo"}
        notes = {"demo": "femb synth faces as rendered"}
        wanted = args.sets.split(",")
        if "textured" in wanted:
            images, sigma = textured(read_rows(work / "demo")[0], args.textured_bytes)
            write_like(work / "demo", work / "textured", images)
            sets["textured"] = work / "textured"
            notes["textured"] = f"demo faces + Gaussian noise (sigma {sigma:.1f}, seeded), JPEG quality 95"
        results = {name: {"data": notes[name], **bench_set(name, sets[name], work, args)} for name in wanted}

    print(
        json.dumps(
            {
                **results,
                "batch_size": args.batch_size,
                "processes": 1,
                "torch_threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "targets": TARGETS,
                "notes": (
                    f"medians of {args.repeats} rounds in which the pipelines take turns, after a warm-up; "
                    "per_cpu_second counts each pipeline's process user+system time (steadier on a shared "
                    "machine); the loader reads Parquet shards (page cache), decode and torchvision work on "
                    "in-memory bytes; the loader yields uint8 batches (normalised later on the device), "
                    "torchvision float32 ones"
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
