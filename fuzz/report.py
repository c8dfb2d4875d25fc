"""The run's report: how many examples each property ran, which failed (their failure files), and the worst
error/bound ratio seen per dtype and quantity, with the case that produced it.

Each process keeps its own tallies and writes them, while it runs, to its own summary file in the run's
directory (`summary-<worker>.json`): after every test item, at once after a failure, and otherwise every
few seconds between examples. A run cut short (a time limit, SIGKILL) therefore keeps a summary that
is at most seconds old. At the end the controller reads every summary of the run, merges them, prints
the table and writes the merged report (`report.json`); `python -m fuzz.summary` merges the summaries
of several runs (the slices of a nightly run).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import core
from core.tolerance import Verdict
from fuzz.cases import Case

QUANTITIES = ("out", "lse", "dq", "dk", "dv")
FLUSH_SECONDS = 5.0  # the longest a live summary lags behind the examples it counts

_examples: Counter[str] = Counter()
_worst: dict[str, dict[str, dict]] = {}  # dtype -> quantity -> {"ratio", "error", "bound", ...}
_failures: Counter[str] = Counter()  # property -> distinct failures (failure files)
_failure_files: list[str] = []  # relative to the run directory
_items: dict[str, dict] = {}  # test item -> {"outcome", "seconds", "examples"}
_time_boxed: set[str] = set()  # test items that the time box stopped early

# The example being run: its verdicts and the property it counted itself under (fuzz/failures.py).
_verdicts: list[dict] = []
_property: str | None = None

_summary_path: Path | None = None
_summary_header: dict = {}
_last_flush = 0.0


def start_example() -> None:
    global _property
    _verdicts.clear()
    _property = None


def count_example(test: str) -> None:
    global _property
    _property = test
    _examples[test] += 1
    flush()


def current_property() -> str | None:
    """The name the running example counted itself under (count_example), if it got that far."""
    return _property


def record(case: Case, verdict: Verdict) -> None:
    dtype = str(case.problem.dtype).removeprefix("torch.")
    numbers = {
        "ratio": verdict.ratio,
        "error": verdict.error,
        "bound": verdict.bound,
        "eager_error": verdict.eager_error,
    }
    _verdicts.append({"quantity": verdict.quantity, "ok": verdict.ok, **numbers})
    _keep_worse(dtype, verdict.quantity, {**numbers, "case": repr(case)})


def example_verdicts() -> list[dict]:
    """Every quantity judged so far in the running example (its verdicts, passing or not)."""
    return list(_verdicts)


def note_failure(test: str, path: str) -> None:
    _failures[test] += 1
    _failure_files.append(path)
    flush(force=True)


def note_time_box(item: str) -> None:
    _time_boxed.add(item)


def item_started(item: str) -> None:
    _items[item] = {"outcome": "running", "seconds": None, "examples": 0}
    flush(force=True)


def item_finished(item: str, outcome: str, seconds: float, examples: int) -> None:
    """`examples`: the generated examples the item ran (pinned ones not counted)."""
    _items[item] = {"outcome": outcome, "seconds": round(seconds, 2), "examples": examples}
    flush(force=True)


def _keep_worse(dtype: str, quantity: str, entry: dict) -> None:
    current = _worst.setdefault(dtype, {}).get(quantity)
    # NaN ratios (a NaN error) are the worst of all: `not (x <= y)` ranks them above every number.
    if current is None or not (entry["ratio"] <= current["ratio"]):
        _worst[dtype][quantity] = entry


def snapshot() -> dict:
    return {
        "examples": dict(_examples),
        "failures": dict(_failures),
        "failure_files": list(_failure_files),
        "items": dict(_items),
        "time_boxed": sorted(_time_boxed),
        "worst": _worst,
    }


def merge(other: dict) -> None:
    """Fold in another process's snapshot (a summary file read back: non-finite numbers as strings)."""
    _examples.update(other.get("examples", {}))
    _failures.update(other.get("failures", {}))
    _failure_files.extend(other.get("failure_files", []))
    _items.update(other.get("items", {}))
    _time_boxed.update(other.get("time_boxed", []))
    for dtype, by_quantity in other.get("worst", {}).items():
        for quantity, entry in by_quantity.items():
            _keep_worse(dtype, quantity, {**entry, "ratio": float(entry["ratio"])})


def table() -> str:
    lines = [f"{'dtype':<10}" + "".join(f"{q:>10}" for q in QUANTITIES)]
    for dtype in sorted(_worst):
        cells = (_worst[dtype].get(q, {}).get("ratio") for q in QUANTITIES)
        lines.append(f"{dtype:<10}" + "".join(f"{'-' if r is None else f'{r:.3g}':>10}" for r in cells))
    counts = ", ".join(f"{test} {n}" for test, n in sorted(_examples.items()))
    lines.append(f"examples: {sum(_examples.values())} ({counts})")
    failures = ", ".join(f"{test} {n}" for test, n in sorted(_failures.items()))
    lines.append(f"failures: {sum(_failures.values())}" + (f" ({failures})" if failures else ""))
    if _time_boxed:
        lines.append(f"stopped by the time box: {len(_time_boxed)} test items")
    return "\n".join(lines)


def plain(x):
    """`x` as strict JSON data: non-finite floats become strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def write(path: Path, header: dict) -> None:
    """The tallies as JSON, after `header` (what run they belong to)."""
    write_json_atomically(path, {**header, **snapshot()})


def write_json_atomically(path: Path, data) -> None:
    """`data` as strict JSON (`plain`) at `path`, complete or not at all: written to a temporary file in
    the same directory, flushed and fsynced, then renamed over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as f:
        json.dump(plain(data), f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash of the machine too
    finally:
        os.close(directory)


def code_fingerprint() -> str:
    """What the examples ran on, as a hash of every Python source of the core package and of the fuzzer
    (paths and contents; caches and results left out). Runs with one fingerprint tested the same kernels
    with the same properties, whichever commit or session they came from, so their counts add up
    (`python -m fuzz.summary --code`); any change to either starts a new count."""
    digest = hashlib.sha256()
    for root in (Path(core.__file__).parent, Path(__file__).parent):
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root.parent)
            if "__pycache__" in relative.parts or "results" in relative.parts:
                continue
            digest.update(f"{relative}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


# --- The live summary of this process ------------------------------------------------------------------


def start_summary(path: Path, header: dict) -> None:
    """From now on keep this process's tallies in `path`, after `header` (the run's profile, slice, ...)."""
    global _summary_path, _summary_header
    _summary_path, _summary_header = path, header
    flush(force=True)


def live() -> bool:
    """Whether this process keeps a live summary (it runs tests: an xdist worker, or pytest without xdist)."""
    return _summary_path is not None


def flush(force: bool = False, finished: bool = False) -> None:
    """Rewrite the live summary if FLUSH_SECONDS have passed since the last time (or `force`)."""
    global _last_flush
    now = time.monotonic()
    if _summary_path is None or not (force or finished or now - _last_flush >= FLUSH_SECONDS):
        return
    _last_flush = now
    header = {**_summary_header, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": finished}
    write(_summary_path, header)


def load_summaries(paths) -> list[tuple[Path, dict]]:
    """Every summary-*.json under `paths` (run directories or folders holding them), sorted by path."""
    found = []
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(root.rglob("summary-*.json"))
        found += [(f, json.loads(f.read_text())) for f in files]
    return sorted(found, key=lambda pair: str(pair[0]))
