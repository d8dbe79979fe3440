"""The shard directory contract (docs/architecture.md "Parquet shards"): file names, schemas, the manifest.

`femb convert` writes a directory that the loader, the pair sets, training and export read. This
module is the one place that spells its names: `train-00000-of-00008.parquet` shards (key int64,
label int64, image binary), `<name>.parquet` pair sets (left, right binary, is_same bool, in the
source's order) and `manifest.json`, written last.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from femb.errors import FembError
from femb.io import write_json

FORMAT = "femb-shards/1"  # the manifest's and every file footer's "format"
MANIFEST = "manifest.json"
SHARD_GLOB = "train-*.parquet"
SHARD_NAME = re.compile(r"train-(\d{5})-of-(\d{5})\.parquet")  # the loader reads exactly these
FOOTER_KEY = b"femb"  # the Parquet key-value entry that says which conversion wrote a file

SHARD_COLUMNS = ("key", "label", "image")
SHARD_SCHEMA = pa.schema([("key", pa.int64()), ("label", pa.int64()), ("image", pa.binary())])
PAIR_COLUMNS = ("left", "right", "is_same")
PAIR_SCHEMA = pa.schema([("left", pa.binary()), ("right", pa.binary()), ("is_same", pa.bool_())])
IMAGE_COLUMNS = {"image", "left", "right"}  # stored PLAIN: no compression, dictionary or statistics


def shard_name(index: int, count: int) -> str:
    """The file name of train shard `index` of `count`."""
    return f"train-{index:05d}-of-{count:05d}.parquet"


def pair_set_name(name: str) -> str:
    """The file name of the pair set `name` (the stem of its `.bin`)."""
    return f"{name}.parquet"


def is_shard(path: Path | str) -> bool:
    """Whether `path` is named as a train shard."""
    return SHARD_NAME.fullmatch(Path(path).name) is not None


def shard_files(shards_dir: Path | str) -> list[Path]:
    """The train shards of a directory, in name order."""
    return sorted(p for p in Path(shards_dir).glob(SHARD_GLOB) if is_shard(p))


def pair_set_files(shards_dir: Path | str) -> list[Path]:
    """The pair sets of a directory: every `<name>.parquet` but the shards, in name order."""
    return sorted(p for p in Path(shards_dir).glob("*.parquet") if not is_shard(p))


def manifest_path(shards_dir: Path | str) -> Path:
    """Where the manifest of a shard directory lives."""
    return Path(shards_dir) / MANIFEST


def read_manifest(shards_dir: Path | str) -> dict[str, Any] | None:
    """The manifest of a shard directory, or None when there is none; a FembError if it is not JSON."""
    path = manifest_path(shards_dir)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FembError(f"{path}: not a readable manifest ({err})") from None
    if not isinstance(manifest, dict):
        raise FembError(f"{path}: not a femb manifest (expected a JSON object)")
    return manifest


def write_manifest(shards_dir: Path | str, manifest: dict[str, Any]) -> Path:
    """Write the manifest atomically: the last file of a conversion, its mark of completion."""
    return write_json(manifest_path(shards_dir), manifest, indent=1)


def data_fingerprint(shards_dir: Path | str) -> str | None:
    """The source fingerprint recorded in the manifest (None without one): the data a run trained on."""
    manifest = read_manifest(shards_dir)
    return None if manifest is None else manifest.get("fingerprint")
