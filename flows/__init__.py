"""Prefect flows that orchestrate the DVC pipeline: `python -m flows.pipeline | flows.retrain | flows.compare`.

Flows run `dvc repro` / `dvc exp run` (DVC stays the record of lineage) and never do femb's work
themselves. Importing this package sets Prefect's defaults for a local, offline and quiet run before
Prefect is imported, each only where the user has not set it: no analytics, and a temporary server
given time to start on a slow machine.
"""

from __future__ import annotations

import os

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # With no PREFECT_API_URL, run against a temporary local server (Prefect's default profile does too).
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
    # The temporary server migrates its SQLite database at start: ~10 s on two busy cores, 20 s by default.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}

for _key, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
