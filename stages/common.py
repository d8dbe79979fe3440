"""What every stage shares: params.yaml validated by femb.config, and user errors printed as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from femb.config import Params, load_params
from femb.errors import FembError, describe_os_error

PARAMS = Path("params.yaml")


def run_stage(main: Callable[[Params, Sequence[str]], None]) -> None:
    """Call `main(params, argv)`; a FembError (bad params.yaml, bad data) or an OSError on a file (missing,
    denied, read-only or full disk) prints one line naming it and exits 1, as the `femb` command does."""
    stage = Path(sys.argv[0]).stem
    try:
        main(load_params(PARAMS), sys.argv[1:])
    except FembError as err:
        print(f"stage {stage}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as err:
        print(f"stage {stage}: {describe_os_error(err)}", file=sys.stderr)
        raise SystemExit(1) from None
