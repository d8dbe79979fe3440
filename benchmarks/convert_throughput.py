"""Throughput of `femb convert` against `cp` and a naive converter, on one generated .rec; prints JSON.

    python benchmarks/convert_throughput.py                      # 50,000 records, ~400 MB
    python benchmarks/convert_throughput.py --records 5000 --size-mb 40 --repeats 1

Builds an InsightFace-layout train.rec/.idx of JPEG-like payloads (~8 KB each) in a temporary
directory on the chosen disk (--tmpdir), reads it once so every method starts from a warm page
cache, then times on the same files: `cp` of train.rec, a naive converter (every record into
Python lists, `pa.table`, `pq.write_table`), and `femb convert` with one worker and with one per
core. MB/s is train.rec bytes / seconds (best of --repeats); `ratio_to_cp` divides by cp's MB/s.
Outputs are deleted after each run and the disk is synced between runs (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from femb.data.convert import convert
from femb.data.parquet import arrow_views
from femb.data.recordio import InsightFaceRecords, write_insightface


def build(src: Path, records: int, size_mb: float, seed: int = 0) -> None:
    """An InsightFace-layout dataset (header record 0, images 1..N, identity records) of JPEG-like payloads."""
    rng = np.random.default_rng(seed)
    mean = size_mb * 1e6 / records
    lengths = rng.integers(int(mean * 0.75), int(mean * 1.25), records)
    noise = rng.bytes(int(lengths.max()) * 2)
    per_class = 50

    def images() -> Iterator[bytes]:
        for length in lengths.tolist():
            start = int(rng.integers(0, len(noise) - length))
            yield b"\xff\xd8" + noise[start : start + length - 4] + b"\xff\xd9"

    write_insightface(src, np.arange(records) // per_class, images(), 112)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def naive(src: Path, out: Path) -> None:
    """The obvious converter: every record into Python lists, one Arrow table, pq.write_table."""
    out.mkdir()
    keys, labels, images = [], [], []
    with InsightFaceRecords(src) as dataset:
        for key in dataset.image_keys.tolist():
            header, image = dataset.record(key)
            keys.append(key)
            labels.append(int(np.asarray(header.label).flat[0]) if header.flag else int(header.label))
            images.append(image)
    table = pa.table(
        {"key": pa.array(keys, pa.int64()), "label": pa.array(labels, pa.int64()), "image": images}
    )
    pq.write_table(table, out / "train-00000-of-00001.parquet")


def timed(run: Callable[[Path], None], out: Path, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        os.sync()
        started = time.perf_counter()
        run(out)
        seconds.append(time.perf_counter() - started)
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000, help="images in the generated .rec")
    parser.add_argument("--size-mb", type=float, default=400.0, help="total image bytes (MB)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method (the best counts)")
    parser.add_argument(
        "--tmpdir", default=None, help="where to build the data (default: the system temp dir)"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="workers of the parallel run (0: one per core)"
    )
    args = parser.parse_args(argv)
    workers = args.workers or os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="femb-convert-bench-", dir=args.tmpdir))
    try:
        src = work / "src"
        started = time.perf_counter()
        build(src, args.records, args.size_mb)
        build_s = time.perf_counter() - started
        rec = src / "train.rec"
        size = rec.stat().st_size
        warm(rec)
        methods: dict[str, Callable[[Path], None]] = {
            "cp": lambda out: subprocess.run(["cp", str(rec), str(out)], check=True),
            "naive": lambda out: naive(src, out),
            "femb_workers_1": lambda out: convert(src, out, workers=1, progress=False),
            f"femb_workers_{workers}": lambda out: convert(src, out, workers=workers, progress=False),
        }
        results = {}
        for name, run in methods.items():
            seconds = timed(run, work / f"out-{name}", args.repeats)
            results[name] = {
                "seconds": [round(s, 3) for s in seconds],
                "mb_per_s": round(size / 1e6 / min(seconds), 1),
            }
        for result in results.values():
            result["ratio_to_cp"] = round(result["mb_per_s"] / results["cp"]["mb_per_s"], 3)
        report = {
            "records": args.records,
            "rec_bytes": size,
            "mean_payload_bytes": round(size / args.records),
            "build_seconds": round(build_s, 2),
            "cpu_count": os.cpu_count(),
            "pyarrow": pa.__version__,
            "arrow_views": arrow_views(),
            "python": sys.version.split()[0],
            "results": results,
        }
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
