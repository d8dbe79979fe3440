"""Stage `params`: validate all of params.yaml, so that a typo fails even in a key no stage depends on."""

from __future__ import annotations

from collections.abc import Sequence

from femb.config import Params
from stages.common import PARAMS, run_stage


def main(params: Params, argv: Sequence[str]) -> None:
    """Nothing to do once run_stage has loaded the params: say which head and backbone will train."""
    print(f"{PARAMS}: valid; trains {params.backbone} with {params.header} {params.header_hparams()}")


if __name__ == "__main__":
    run_stage(main)
