"""Stage `synth`: the demo faces, InsightFace layout (train.rec/.idx/property, demo.bin, demo_hard.bin),
loose photos with landmarks (loose/) and an IJB-C-layout set (IJBC/)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from femb.config import Params
from femb.data.synth import synthesize
from femb.errors import argument_names
from stages.common import run_stage

_KEYS = (
    "identities",
    "images_per_identity",
    "pairs",
    "seed",
    "loose_identities",
    "loose_images_per_identity",
    "ijb_subjects",
)


def main(params: Params, argv: Sequence[str]) -> None:
    """Write the `data.synth` demo to the directory dvc.yaml names."""
    (out,) = argv
    s = params.data.synth
    with argument_names({key: f"data.synth.{key}" for key in _KEYS}):
        summary = synthesize(Path(out), **{key: getattr(s, key) for key in _KEYS})
    print(f"synth: {summary['num_images']} images of {s.identities} identities -> {out}")


if __name__ == "__main__":
    run_stage(main)
