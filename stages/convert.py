"""Stage `convert`: the InsightFace source (`data.source`) as Parquet shards and pair files (`data.shards`)."""

from __future__ import annotations

from collections.abc import Sequence

from femb.config import Params
from femb.data.convert import convert
from femb.errors import argument_names
from stages.common import run_stage


def main(params: Params, argv: Sequence[str]) -> None:
    """Convert `data.source` into `data.shards` (image bytes copied unchanged, manifest with fingerprint)."""
    d = params.data
    with argument_names({"shard_size_mb": "data.shard_size_mb", "workers": "data.workers"}):
        manifest = convert(d.source, d.shards, shard_size_mb=d.shard_size_mb, workers=d.workers)
    print(
        f"convert: {manifest['num_images']} images of {manifest['num_classes']} identities, "
        f"{len(manifest.get('pairs', {}))} pair set(s) -> {d.shards}"
    )


if __name__ == "__main__":
    run_stage(main)
