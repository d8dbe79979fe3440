"""Stage `convert`: the source (`data.source`: InsightFace, image folder or list) as Parquet shards (`data.shards`)."""

from __future__ import annotations

from collections.abc import Sequence

from femb.config import Params
from femb.data.convert import convert
from femb.errors import argument_names
from stages.common import run_stage

_KEYS = ("shard_size_mb", "workers", "source_kind", "root", "landmarks", "image_size", "jpeg_quality")


def main(params: Params, argv: Sequence[str]) -> None:
    """Convert `data.source` into `data.shards` (manifest with fingerprint; see docs/architecture.md)."""
    d = params.data
    with (
        argument_names({key: f"data.{key}" for key in _KEYS}),
        argument_names({"`landmarks`": "data.landmarks"}, anywhere=True),
    ):
        manifest = convert(
            d.source,
            d.shards,
            shard_size_mb=d.shard_size_mb,
            workers=d.workers,
            source_kind=d.source_kind,
            root=d.root,
            landmarks=d.landmarks,
            pairs=d.pairs,
            image_size=d.image_size,
            jpeg_quality=d.jpeg_quality,
            lossless=d.lossless,
            skip_bad=d.skip_bad,
        )
    print(
        f"convert: {manifest['num_images']} images of {manifest['num_classes']} identities, "
        f"{len(manifest.get('pairs', {}))} pair set(s) -> {d.shards}"
    )


if __name__ == "__main__":
    run_stage(main)
