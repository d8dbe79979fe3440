"""Shared fixtures: a small demo dataset, generated once per session and converted to shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from femb.data.convert import convert
from femb.data.synth import synthesize


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`femb synth` output: 40 identities x 8 images, 100 pairs per set, 3 x 2 loose photos, a 6-subject IJB-C set."""
    out = tmp_path_factory.mktemp("demo") / "source"
    synthesize(
        out,
        identities=40,
        images_per_identity=8,
        pairs=100,
        seed=7,
        loose_identities=3,
        loose_images_per_identity=2,
        ijb_subjects=6,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def demo_shards(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo source converted to Parquet shards and pair files."""
    out = tmp_path_factory.mktemp("demo") / "shards"
    convert(demo_source, out, progress=False)
    return out
