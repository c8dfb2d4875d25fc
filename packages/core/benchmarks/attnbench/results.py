"""The results file: one JSON document per run, written whole after every case so a cut run keeps its data.

Layout: `meta` (card, versions, date, mode, timer, budget, whether the run completed), `ceilings`,
`host` (core's per-call host overhead and CUDA-graph capture), and `cases`: each case's shape, flops
per pass and, per provider that ran on it, `note`, `first_call_s`, `check` (against core) and
`passes` ({"ms", "tflops"} or {"error"}), or just `error` when the provider could not run the case.
A provider missing from a case did not get to run (time budget).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA_VERSION = 1
PROVIDER_ORDER = ("core", "flash", "cudnn", "efficient", "flex")
LABELS = {"core": "core", "flash": "FLASH", "cudnn": "CUDNN", "efficient": "EFFICIENT", "flex": "Flex"}


def new_results(meta: dict, cases) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "meta": meta,
        "ceilings": {},
        "host": {},
        "cases": [{**case.as_dict(), "providers": {}} for case in cases],
    }


def save_results(results: dict, path: Path) -> None:
    """Write atomically: a reader (or a kill mid-write) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    os.replace(partial, path)


def load_results(path: Path) -> dict:
    results = json.loads(Path(path).read_text())
    if results.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema {results.get('schema')!r}, this report reads {SCHEMA_VERSION}")
    return results
