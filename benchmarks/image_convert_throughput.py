"""`femb convert` of image folders against its baselines, in one run; prints JSON.

    python benchmarks/image_convert_throughput.py                    # 20,000 aligned faces, 2,000 loose photos
    python benchmarks/image_convert_throughput.py --aligned 4000 --loose 400 --repeats 1

Two measurements, each side by side with the baseline issue 11 names:

- **Folder of pre-aligned JPEGs -> shards** against `cp -r` of the same folder: the demo faces
  (`femb synth`, ~2.8 KB JPEGs at 112x112) written as `ROOT/<identity>/<n>.jpg`. femb keeps their
  bytes; MB/s is the folder's image bytes / seconds; `ratio_to_cp` divides by cp's MB/s.
- **Alignment path** (decode, warp, encode) against an InsightFace-style loop over the same loose
  photos (`femb synth`'s loose demo photos, larger than 112, with their five landmarks): per image
  `cv2.imread`, `norm_crop`, `cv2.imencode(".jpg")`, in one process, written to one file per image.
  femb runs `convert --landmarks` with one worker (images/s per core, the issue's comparison) and
  with one per core.

Every run starts from a warm page cache (the inputs are read once first); outputs are deleted and
the disk synced between runs (not timed). Best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from femb.data.align import norm_crop
from femb.data.convert import convert
from femb.data.landmarks import read_landmarks
from femb.data.recordio import InsightFaceRecords
from femb.data.synth import synthesize


def aligned_folder(root: Path, images: int, seed: int = 0) -> int:
    """The demo's training faces as ROOT/<identity>/<n>.jpg; their total bytes."""
    per_identity = 25
    src = root.parent / "synth-aligned"
    synthesize(
        src,
        identities=max(2, images // per_identity),
        images_per_identity=per_identity,
        pairs=10,
        seed=seed,
        loose_identities=0,
        ijb_subjects=0,
    )
    total = 0
    with InsightFaceRecords(src) as records:
        for key in records.image_keys.tolist():
            folder = root / f"id{records.label(key):05d}"
            folder.mkdir(parents=True, exist_ok=True)
            data = records.image(key)
            (folder / f"{key:07d}.jpg").write_bytes(data)
            total += len(data)
    shutil.rmtree(src)
    return total


def loose_folder(root: Path, photos: int, seed: int = 0) -> Path:
    """`femb synth`'s loose demo photos (ROOT/<name>/<name>_%04d.jpg) and their landmarks file."""
    per_identity = 10
    synthesize(
        root,
        identities=2,
        images_per_identity=2,
        pairs=10,
        seed=seed,
        loose_identities=max(2, photos // per_identity),
        loose_images_per_identity=per_identity,
        ijb_subjects=0,
    )
    return root / "loose"


def warm(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            path.read_bytes()


def insightface_loop(loose: Path, out: Path) -> int:
    """The per-image loop InsightFace's tools run: imread, norm_crop, imencode, one file per image."""
    marks = read_landmarks(loose / "landmarks.txt")
    out.mkdir()
    for index, (name, points) in enumerate(marks.points.items()):
        image = cv2.imread(str(loose / name))
        crop = norm_crop(image, points, 112)
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
        (out / f"{index:07d}.jpg").write_bytes(buf.tobytes())
    return len(marks)


def best(run: Callable[[Path], object], scratch: Path, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        out = scratch / "out"
        os.sync()
        started = time.perf_counter()
        run(out)
        seconds.append(time.perf_counter() - started)
        shutil.rmtree(out)
    return min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligned", type=int, default=20000, help="pre-aligned faces in the folder")
    parser.add_argument("--loose", type=int, default=2000, help="loose photos for the alignment path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmpdir", default=None, help="where the data is written (default: system temp)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        scratch = Path(tmp)
        folder = scratch / "aligned"
        size = aligned_folder(folder, args.aligned)
        warm(folder)
        cp = best(
            lambda out: subprocess.run(["cp", "-r", str(folder), str(out)], check=True), scratch, args.repeats
        )
        femb_1 = best(lambda out: convert(folder, out, workers=1, progress=False), scratch, args.repeats)
        femb_n = best(lambda out: convert(folder, out, workers=cores, progress=False), scratch, args.repeats)
        mb = size / 1e6
        folder_result = {
            "images": args.aligned,
            "mb": round(mb, 1),
            "cp_mb_s": round(mb / cp, 1),
            "femb_1_worker_mb_s": round(mb / femb_1, 1),
            f"femb_{cores}_workers_mb_s": round(mb / femb_n, 1),
            "ratio_to_cp_1_worker": round(cp / femb_1, 3),
            f"ratio_to_cp_{cores}_workers": round(cp / femb_n, 3),
        }
        shutil.rmtree(folder)

        loose = loose_folder(scratch / "loose-src", args.loose)
        marks = loose / "landmarks.txt"
        photos = len(read_landmarks(marks))
        warm(loose)
        loop = best(lambda out: insightface_loop(loose, out), scratch, args.repeats)
        align_1 = best(
            lambda out: convert(loose, out, landmarks=marks, workers=1, progress=False), scratch, args.repeats
        )
        align_n = best(
            lambda out: convert(loose, out, landmarks=marks, workers=cores, progress=False),
            scratch,
            args.repeats,
        )
        photo_shape = cv2.imread(str(next(loose.rglob("*.jpg")))).shape
        align_result = {
            "photos": photos,
            "photo_size": list(photo_shape[:2]),
            "insightface_loop_img_s": round(photos / loop, 1),
            "femb_1_worker_img_s": round(photos / align_1, 1),
            f"femb_{cores}_workers_img_s": round(photos / align_n, 1),
            "per_core_ratio_to_loop": round(loop / align_1, 3),
        }
    print(
        json.dumps(
            {
                "cores": cores,
                "numpy": np.__version__,
                "opencv": cv2.__version__,
                "folder_to_shards": folder_result,
                "alignment_path": align_result,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
