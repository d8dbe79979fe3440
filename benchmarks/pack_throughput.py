"""Throughput of `femb pack` (plain and --shuffle) against `cp -r` of the same shard directory; prints JSON.

    python benchmarks/pack_throughput.py                      # 50,000 images, ~400 MB of shards
    python benchmarks/pack_throughput.py --records 5000 --size-mb 40 --repeats 3

Builds the generated InsightFace-layout .rec of `convert_throughput.py` (JPEG-like payloads of
~8 KB), converts it to shards (not timed), reads the shards once so every method starts from a
warm page cache and runs each method once untimed; then times, interleaved `--repeats` times on
the same shards, `cp -r` of the shard directory, `femb pack` (header layout, streamed) and `femb
pack --shuffle` (flat layout, through the scratch file of the reordering pass). MB/s is the
shards' bytes / seconds; `ratio_to_cp` divides by cp's MB/s, from the medians
(`best_ratio_to_cp`: from the best runs); `cpu_seconds` is each method's median user + system
time. Outputs are deleted after each run and the disk is synced between runs (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from convert_throughput import build, warm

from femb.data.convert import convert
from femb.data.pack import pack


def _cpu() -> float:
    """User + system seconds of this process and its waited-for children (cp) so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000, help="images in the generated shards")
    parser.add_argument("--size-mb", type=float, default=400.0, help="total image bytes (MB)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per method")
    parser.add_argument(
        "--tmpdir", default=None, help="where to build the data (default: the system temp dir)"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="femb-pack-bench-", dir=args.tmpdir))
    try:
        started = time.perf_counter()
        build(work / "src", args.records, args.size_mb)
        shards = work / "shards"
        convert(work / "src", shards, progress=False)
        shutil.rmtree(work / "src")
        build_s = time.perf_counter() - started
        files = sorted(shards.iterdir())
        size = sum(p.stat().st_size for p in files)
        for path in files:
            warm(path)
        out = work / "out"
        methods: dict[str, Callable[[], object]] = {
            "cp": lambda: subprocess.run(["cp", "-r", str(shards), str(out)], check=True),
            "pack": lambda: pack(shards, out, progress=False),
            "pack_shuffle": lambda: pack(shards, out, shuffle=True, seed=0, progress=False),
        }
        for run in methods.values():  # first runs pay one-time costs (imports, thread pools, page cache)
            run()
            shutil.rmtree(out)
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        cpu: dict[str, list[float]] = {name: [] for name in methods}
        packed_bytes = 0
        for _ in range(args.repeats):
            for name, run in methods.items():
                os.sync()
                before = _cpu()
                begin = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - begin)
                cpu[name].append(_cpu() - before)
                if name == "pack":
                    packed_bytes = sum(p.stat().st_size for p in out.iterdir())
                shutil.rmtree(out)
        results = {
            name: {
                "seconds": [round(s, 3) for s in runs],
                "mb_per_s": round(size / 1e6 / statistics.median(runs), 1),
                "best_mb_per_s": round(size / 1e6 / min(runs), 1),
                "cpu_seconds": round(statistics.median(cpu[name]), 3),
            }
            for name, runs in seconds.items()
        }
        for result in results.values():
            result["ratio_to_cp"] = round(result["mb_per_s"] / results["cp"]["mb_per_s"], 3)
            result["best_ratio_to_cp"] = round(result["best_mb_per_s"] / results["cp"]["best_mb_per_s"], 3)
        report = {
            "records": args.records,
            "shard_bytes": size,
            "pack_bytes": packed_bytes,
            "build_seconds": round(build_s, 2),
            "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "pyarrow": pa.__version__,
            "python": sys.version.split()[0],
            "results": results,
        }
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
