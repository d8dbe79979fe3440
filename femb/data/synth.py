"""Demo faces: a generated identity dataset in the exact InsightFace layout, so every command runs anywhere.

Each person is a random parametric face (`femb.data.face`), photographed the way aligned crops vary
(`femb.data.capture`). `train.rec`/`.idx`/`property` hold the training people (`write_insightface`);
`demo.bin` varies like training, `demo_hard.bin` more (`HARD`); their people come from random streams of
their own, so no person of a pair set is a training identity. Two held-out sets come from streams of
their own too: `loose/` (`femb.data.loose`), LFW-style 250 x 250 photos of loose faces with their five
landmarks (`landmarks.txt`) and an LFW `pairs.txt`, for `femb convert --landmarks` and `femb pairs`; and
`IJBC/` (`femb.data.ijb_demo`), a small set in the IJB-C release layout for `femb.evaluation.ijb`.

Measured with the defaults (seed 0, one core of a busy 2-core machine): 14,000 images in about 13 s;
loose/ (100 photos) and IJBC/ (30 subjects, about 330 crops) add 0.7 s and 2.0 s of CPU time;
best-threshold raw-pixel verification accuracy (cosine of mean-subtracted pixels) 0.64 on demo.bin and
0.57 on demo_hard.bin. A 7-layer CNN with a CosFace head scores 0.51 / 0.50 untrained and 0.95-0.99 /
0.78-0.82 after 5 minutes of AdamW on that shared CPU (25,000-71,000 images seen, by load).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from femb.data.binfile import write_bin
from femb.data.capture import HARD, NORMAL, Variation, photograph
from femb.data.face import face_identity, render_face
from femb.data.ijb_demo import write_ijb_demo
from femb.data.loose import write_loose_set
from femb.data.recordio import write_insightface
from femb.errors import FembError
from femb.io import atomic_dir, temp_target, write_json
from femb.parallel import progress_bar

DEFAULT_IDENTITIES = 400
DEFAULT_IMAGES_PER_IDENTITY = 25
DEFAULT_PAIRS = 1000
DEFAULT_LOOSE_IDENTITIES = 20
DEFAULT_LOOSE_IMAGES_PER_IDENTITY = 5
DEFAULT_IJB_SUBJECTS = 30

# Each split's people come from their own random streams (the index is part of the seed): appending a
# split leaves every earlier split's bytes as they were.
_SPLITS = ("train", "demo", "demo_hard", "loose", "ijb")
_FORMAT = "femb-synth-1"  # bump when the renderer changes the bytes a seed produces
_FILES = ("train.rec", "train.idx", "property", "demo.bin", "demo_hard.bin", "synth.json")
LOOSE_DIR = "loose"  # LFW layout: <name>/<name>_%04d.jpg, landmarks.txt, pairs.txt (femb.data.loose)
IJB_DIR = "IJBC"  # IJB-C release layout: loose_crop/, meta/ijbc_* (femb.data.ijb_demo)
_DIRS = (LOOSE_DIR, IJB_DIR)
PAIR_SETS = {"demo": NORMAL, "demo_hard": HARD}  # the .bin files written, and how their images vary
_IJB_IMAGES_PER_SUBJECT = 10.8  # the mean of femb.data.ijb_demo's plan, for the progress bar's total


def _identity_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one person: each split's people (train, demo, demo_hard, loose, ijb) have their own."""
    return np.random.default_rng([seed, _SPLITS.index(split), index])


def _plan_rng(seed: int, split: str) -> np.random.Generator:
    """The random stream that plans a split's pairs, apart from every person's."""
    return np.random.default_rng([seed, _SPLITS.index(split), 1 << 32])


def identity_jpegs(
    seed: int, split: str, index: int, count: int, size: int, variation: Variation
) -> list[bytes]:
    """`count` JPEG images of person `index` of `split` ("train", "demo", "demo_hard"), deterministic for a seed."""
    rng = _identity_rng(seed, split, index)
    return photograph(render_face(face_identity(rng), size), rng, count, variation)


def _plan_pairs(seed: int, split: str, pairs: int) -> tuple[int, list[tuple[int, int]]]:
    """LFW-style pairs over a pool of fresh people: one positive pair per person, random negatives, shuffled."""
    rng = _plan_rng(seed, split)
    pool = max(2, pairs // 2)
    positive = pairs // 2
    same = rng.permutation(np.arange(positive) % pool)
    left = rng.integers(0, pool, pairs - positive)
    right = (left + rng.integers(1, pool, pairs - positive)) % pool
    plan = [(int(a), int(a)) for a in same] + [(int(a), int(b)) for a, b in zip(left, right)]
    # Mixed order: InsightFace's 10-fold protocol splits the file in order and needs both kinds in every fold.
    return pool, [plan[i] for i in rng.permutation(len(plan))]


def _write_pair_set(
    path: Path, seed: int, split: str, pairs: int, size: int, variation: Variation, bar: tqdm
) -> list[tuple[int, int]]:
    """Render the pair set `split` and write it as an InsightFace .bin; returns the (left, right) person ids."""
    pool, plan = _plan_pairs(seed, split, pairs)
    wanted = np.bincount(np.asarray(plan).ravel(), minlength=pool)
    stacks: dict[int, list[bytes]] = {}
    for person in map(int, np.flatnonzero(wanted)):
        count = int(wanted[person])
        stacks[person] = identity_jpegs(seed, split, person, count, size, variation)[::-1]  # popped in order
        bar.update(count)
    images: list[bytes] = []
    for a, b in plan:
        images += [stacks[a].pop(), stacks[b].pop()]
    write_bin(path, images, [a == b for a, b in plan])
    return plan


def _train_images(seed: int, identities: int, per_identity: int, size: int, bar: tqdm) -> Iterator[bytes]:
    """The training people's images, person by person, rendered as they are written."""
    for person in range(identities):
        yield from identity_jpegs(seed, "train", person, per_identity, size, NORMAL)
        bar.update(per_identity)


def _check_int(name: str, value: object, low: int, high: int, off: bool = False) -> int:
    """`value` as an int if it lies in [low, high] (or is 0 when `off` allows "none"), else a FembError naming it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not (low <= value <= high or (off and value == 0))
    ):
        what = f"0 (none) or an integer in [{low}, {high}]" if off else f"an integer in [{low}, {high}]"
        raise FembError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _dir_files(out_dir: Path, name: str) -> dict[str, int]:
    """Size of every file under out_dir/name, keyed by its path relative to out_dir."""
    root = out_dir / name
    return {
        path.relative_to(out_dir).as_posix(): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _previous_run(out_dir: Path, params: dict) -> dict | None:
    """The summary of a complete earlier run with the same parameters (all files present, same sizes), else None."""
    try:
        record = json.loads((out_dir / "synth.json").read_text(encoding="utf-8"))
        if record.get("format") != _FORMAT or record.get("params") != params:
            return None
        for name, size in record["files"].items():
            if (out_dir / name).stat().st_size != size:
                return None
        return record["summary"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _prepare_dir(out_dir: Path) -> None:
    """Create `out_dir`, or clear what an earlier `femb synth` left there; refuse a directory holding other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FembError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    owned = (*_FILES, *_DIRS)
    ours = [entry for entry in out_dir.iterdir() if entry.name in owned or temp_target(entry.name) in owned]
    others = sorted(entry.name for entry in out_dir.iterdir() if entry not in ours)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FembError(
            f"{out_dir}: holds files femb synth did not write ({shown}); choose an empty or new directory"
        )
    # synth.json first: a run cut short must never look complete.
    for entry in sorted(ours, key=lambda e: e.name != "synth.json"):
        if entry.name in _DIRS or temp_target(entry.name) in _DIRS:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        elif entry.is_dir():
            raise FembError(f"{entry}: is a directory where femb synth writes a file")
        else:
            entry.unlink()


def synthesize(
    out_dir: Path,
    identities: int = DEFAULT_IDENTITIES,
    images_per_identity: int = DEFAULT_IMAGES_PER_IDENTITY,
    pairs: int = DEFAULT_PAIRS,
    seed: int = 0,
    image_size: int = 112,
    loose_identities: int = DEFAULT_LOOSE_IDENTITIES,
    loose_images_per_identity: int = DEFAULT_LOOSE_IMAGES_PER_IDENTITY,
    ijb_subjects: int = DEFAULT_IJB_SUBJECTS,
    progress: bool | None = None,
) -> dict:
    """Write a demo InsightFace dataset: train.rec/.idx, property, demo.bin, demo_hard.bin (and synth.json).

    The defaults (400 people x 25 images, 1,000 pairs per set) take about 13 s on one core: hundreds of
    people let a small CNN learn what tells people apart rather than memorise a few, 25 images each show
    it the variation to ignore, and 1,000 pairs give 10 folds of 100 and a 0.7% standard error at 95%
    accuracy. `loose_identities` x `loose_images_per_identity` loose photos (20 x 5) and `ijb_subjects`
    IJB-C subjects (30) add about 3 s; 0 leaves either out. They ignore `image_size` (the loose photos are
    250 px, their faces aligned to 112). A complete dataset with the same parameters is left as it is;
    the bytes depend only on the parameters (and the numpy, torch, OpenCV and libjpeg-turbo builds), and
    adding the held-out sets changes no byte of the others.
    """
    out_dir = Path(out_dir)
    params = {
        "identities": _check_int("identities", identities, 2, 10_000_000),
        "images_per_identity": _check_int("images_per_identity", images_per_identity, 1, 100_000),
        "pairs": _check_int("pairs", pairs, 2, 10_000_000),
        "seed": _check_int("seed", seed, 0, 2**63 - 1),
        "image_size": _check_int("image_size", image_size, 32, 1024),
        "loose_identities": _check_int("loose_identities", loose_identities, 2, 1_000_000, off=True),
        "loose_images_per_identity": _check_int(
            "loose_images_per_identity", loose_images_per_identity, 2, 10_000
        ),
        "ijb_subjects": _check_int("ijb_subjects", ijb_subjects, 2, 1_000_000, off=True),
    }
    previous = _previous_run(out_dir, params)
    if previous is not None:
        return {**previous, "dir": str(out_dir), "reused": True}
    _prepare_dir(out_dir)

    started = time.perf_counter()
    num_images = identities * images_per_identity
    loose_photos = loose_identities * loose_images_per_identity
    total = (
        num_images + 2 * pairs * len(PAIR_SETS) + loose_photos + round(_IJB_IMAGES_PER_SUBJECT * ijb_subjects)
    )
    loose = ijb = None
    ijb_people: dict[str, int] = {}
    with progress_bar(total, "femb synth", progress) as bar:
        labels = np.repeat(np.arange(identities), images_per_identity)
        write_insightface(
            out_dir, labels, _train_images(seed, identities, images_per_identity, image_size, bar), image_size
        )
        plans = {
            name: _write_pair_set(out_dir / f"{name}.bin", seed, name, pairs, image_size, variation, bar)
            for name, variation in PAIR_SETS.items()
        }
        if loose_identities:
            with atomic_dir(out_dir / LOOSE_DIR) as tmp:
                loose = write_loose_set(
                    tmp,
                    loose_identities,
                    loose_images_per_identity,
                    lambda i: _identity_rng(seed, "loose", i),
                    _plan_rng(seed, "loose"),
                    bar.update,
                )
        if ijb_subjects:
            with atomic_dir(out_dir / IJB_DIR) as tmp:
                ijb, ijb_people = write_ijb_demo(
                    tmp,
                    ijb_subjects,
                    lambda i: _identity_rng(seed, "ijb", i),
                    _plan_rng(seed, "ijb"),
                    bar.update,
                )
        bar.total = bar.n  # the IJB set's image count was an estimate
        bar.refresh()

    summary = {
        "dir": str(out_dir),
        "num_classes": identities,
        "num_images": num_images,
        "image_size": image_size,
        "pair_sets": {
            name: {
                "pairs": len(plan),
                "positive": sum(a == b for a, b in plan),
                "people": len({person for pair in plan for person in pair}),
            }
            for name, plan in plans.items()
        },
        "loose": None if loose is None else {"dir": LOOSE_DIR, **loose},
        "ijb": None if ijb is None else {"dir": IJB_DIR, **ijb},
        "seconds": round(time.perf_counter() - started, 2),
        "reused": False,
    }
    record = {
        "format": _FORMAT,
        "params": params,
        "summary": summary,
        "files": {
            **{name: (out_dir / name).stat().st_size for name in _FILES if name != "synth.json"},
            **{
                path: size
                for name in _DIRS
                if (out_dir / name).is_dir()
                for path, size in _dir_files(out_dir, name).items()
            },
        },
        # Person ids of every pair: `demo:3` is person 3 of the demo stream; training people are `train:<label>`.
        "pair_identities": {
            name: [[f"{name}:{a}", f"{name}:{b}"] for a, b in plan] for name, plan in plans.items()
        },
        # The loose folders in order (`person_0003` is `loose:3`) and each IJB subject id's person.
        "loose_identities": [f"loose:{i}" for i in range(loose_identities)],
        "ijb_identities": {subject: f"ijb:{index}" for subject, index in ijb_people.items()},
    }
    write_json(out_dir / "synth.json", record, indent=1)
    return summary
