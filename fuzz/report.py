"""The session report: how many examples each property ran, and the worst error/bound ratio seen per
dtype and quantity, with the case that produced it (paste it into an @example to replay it).

Each process keeps its own tallies; under pytest-xdist the workers hand theirs to the controller
(fuzz/conftest.py), which merges them, prints the table and writes the JSON.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from core.tolerance import Verdict
from fuzz.cases import Case

QUANTITIES = ("out", "lse", "dq", "dk", "dv")

_examples: Counter[str] = Counter()
_worst: dict[str, dict[str, dict]] = {}  # dtype -> quantity -> {"ratio", "error", "bound", ...}


def count_example(test: str) -> None:
    _examples[test] += 1


def record(case: Case, verdict: Verdict) -> None:
    dtype = str(case.problem.dtype).removeprefix("torch.")
    entry = {
        "ratio": verdict.ratio,
        "error": verdict.error,
        "bound": verdict.bound,
        "eager_error": verdict.eager_error,
        "case": repr(case),
    }
    _keep_worse(dtype, verdict.quantity, entry)


def _keep_worse(dtype: str, quantity: str, entry: dict) -> None:
    current = _worst.setdefault(dtype, {}).get(quantity)
    # NaN ratios (a NaN error) are the worst of all: `not (x <= y)` ranks them above every number.
    if current is None or not (entry["ratio"] <= current["ratio"]):
        _worst[dtype][quantity] = entry


def snapshot() -> dict:
    return {"examples": dict(_examples), "worst": _worst}


def merge(other: dict) -> None:
    """Fold in a worker's snapshot."""
    _examples.update(other.get("examples", {}))
    for dtype, by_quantity in other.get("worst", {}).items():
        for quantity, entry in by_quantity.items():
            _keep_worse(dtype, quantity, entry)


def table() -> str:
    lines = [f"{'dtype':<10}" + "".join(f"{q:>10}" for q in QUANTITIES)]
    for dtype in sorted(_worst):
        cells = (_worst[dtype].get(q, {}).get("ratio") for q in QUANTITIES)
        lines.append(f"{dtype:<10}" + "".join(f"{'-' if r is None else f'{r:.3g}':>10}" for r in cells))
    counts = ", ".join(f"{test} {n}" for test, n in sorted(_examples.items()))
    lines.append(f"examples: {sum(_examples.values())} ({counts})")
    return "\n".join(lines)


def write(path: Path, profile: str) -> None:
    """The snapshot as strict JSON (non-finite ratios and errors become strings)."""

    def plain(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"profile": profile, **plain(snapshot())}, indent=2) + "\n")
