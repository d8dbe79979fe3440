"""`RecordWriter.write` (each write names its file if the disk fills) against bare `file.write`; prints JSON.

    python benchmarks/record_writer.py [--records 200000 --payload 2000 --repeats 5]

Writes the same framed records to a temporary .rec/.idx pair: once through `femb.data.recordio.
RecordWriter.write` (which goes through `femb.io.write_to`, so that a full disk is reported with the
file's name, and cleans its temporaries on any failure), and once with the framing and `.idx` lines
written by plain `file.write` calls, the writer as it was before. Records/s is the best of --repeats,
the two methods interleaved; `ratio` is femb / bare (1.0: no cost).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from femb.data.recordio import IRHeader, RecordWriter, frame_record, pack


def femb_writer(out: Path, payloads: list[bytes]) -> None:
    with RecordWriter(out / "a.rec", out / "a.idx") as writer:
        for key, payload in enumerate(payloads):
            writer.write(key, payload)


def bare_writer(out: Path, payloads: list[bytes]) -> None:
    with open(out / "b.rec", "wb") as rec, open(out / "b.idx", "w", encoding="ascii") as idx:
        pos = 0
        for key, payload in enumerate(payloads):
            framed = frame_record(payload)
            idx.write(f"{key}\t{pos}\n")
            rec.write(framed)
            pos += len(framed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--payload", type=int, default=2000, help="image bytes per record")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    payloads = [
        pack(IRHeader(0, float(i % 100), i, 0), bytes([i % 251]) * args.payload) for i in range(args.records)
    ]
    best = {"femb": float("inf"), "bare": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, write in (("femb", femb_writer), ("bare", bare_writer)):
                started = time.perf_counter()
                write(Path(tmp), payloads)
                best[name] = min(best[name], time.perf_counter() - started)
    rates = {name: round(args.records / seconds) for name, seconds in best.items()}
    print(
        json.dumps(
            {
                "records": args.records,
                "payload_bytes": args.payload,
                "records_per_sec": rates,
                "ratio": round(rates["femb"] / rates["bare"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
