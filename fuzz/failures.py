"""Failure files: every failing example on disk the moment it fails, so a run cut short keeps its findings.

Hypothesis reports a failure at the end of a test, after shrinking it; a run killed before that end (a
time limit, a lost machine) loses the example. So each property's body is wrapped (`recording`, through
hypothesis' documented `inner_test` hook, applied by fuzz/conftest.py) and a failing call writes one
JSON file under the run's directory before hypothesis sees the exception:

    <run dir>/failures/<worker>-<test>[<family>]-<origin hash>.json

One file per (test item, failure origin), the origin being the exception type and the line that raised
it, as hypothesis tells distinct bugs apart. The file holds the example that first failed (`found`) and
the latest one (`example`): while hypothesis shrinks, every smaller failing example replaces `example`,
and the example hypothesis finally reports is written with stage "reported". Each process writes only
its own files (the worker id is in the name), each write atomically (a temporary file, fsync,
os.replace), so a file on disk is always complete. `python -m fuzz.replay FILE` re-runs it.

The same wrapper enforces the time box of the GPU profiles (`Run.deadline`): past it, generated
examples are rejected unrun, so hypothesis stops each test after the example it is running.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import hypothesis
from hypothesis import event, reject
from hypothesis.control import current_build_context
from hypothesis.core import encode_failure
from hypothesis.errors import UnsatisfiedAssumption

from fuzz import report
from fuzz.cases import Case, compact_repr, to_data

REPO = Path(__file__).resolve().parents[1]
FORMAT = "flashcore-fuzz-failure/1"


@dataclass(frozen=True)
class Run:
    """What every process of one fuzz run shares (the controller hands it to the xdist workers)."""

    directory: Path  # this run's report directory
    profile: str
    worker: str  # "main" without xdist, else xdist's worker id
    deadline: float | None = None  # time.time() after which no new example is drawn (the time box)
    shrinks: bool = False  # whether the profile shrinks failures (then "reported" is the shrunk example)

    @property
    def failures(self) -> Path:
        return self.directory / "failures"


_run: Run | None = None
# The running test item: its node id, and the names of the arguments pytest (not hypothesis) gives it.
_item: contextvars.ContextVar[tuple[str, frozenset[str]] | None] = contextvars.ContextVar(
    "fuzz_item", default=None
)
_generated_in_item: dict[str, int] = {}  # test item -> generated examples it ran (the time box spares one)
_files: dict[tuple[str, str], Path] = {}  # (test item, origin) -> its failure file
_environment: dict | None = None


def configure(run: Run) -> None:
    global _run
    _run = run
    run.failures.mkdir(parents=True, exist_ok=True)


def entered_item(nodeid: str, fixtures: frozenset[str]) -> contextvars.Token:
    return _item.set((nodeid, fixtures))


def left_item(token: contextvars.Token) -> None:
    _item.reset(token)


def past_time_box() -> bool:
    return _run is not None and _run.deadline is not None and time.time() > _run.deadline


def recording(test):
    """`test` (a property's body, hypothesis' inner_test) writing a failure file for each failing call,
    and rejecting generated examples unrun once the time box is over."""

    @functools.wraps(test)
    def run_example(*args, **kwargs):
        context = current_build_context()
        item, from_pytest = _item.get() or (test.__name__, frozenset())
        # A pinned @example runs with no choices; every generated example has some.
        generated = bool(_choices(context.data))
        if generated and not context.is_final and past_time_box() and _generated_in_item.get(item):
            event("time box reached: no new examples")
            report.note_time_box(item)
            reject()
        report.start_example()
        try:
            result = test(*args, **kwargs)
        except UnsatisfiedAssumption:
            raise
        except Exception as error:
            _ran(item, generated)
            try:
                _record(test, item, from_pytest, kwargs, error, generated, context)
            except Exception as unwritten:  # never let the record hide the failure itself
                print(f"fuzz: could not write the failure file: {unwritten!r}", file=sys.stderr)
            raise
        _ran(item, generated)
        return result

    return run_example


def examples_run(item: str) -> int:
    """The generated examples `item` ran in this process (not counting pinned ones)."""
    return _generated_in_item.get(item, 0)


def _ran(item: str, generated: bool) -> None:
    if generated:
        _generated_in_item[item] = _generated_in_item.get(item, 0) + 1


def _origin(error: BaseException) -> str:
    """The exception type and the innermost line that raised it: how hypothesis tells bugs apart."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{_shown_path(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
    return f"{type(error).__name__} at {where}"


def _shown_path(filename: str) -> str:
    path = Path(filename).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _file_name(item: str, origin: str) -> str:
    test = re.sub(r"[^A-Za-z0-9._\[\]-]+", "_", item.rsplit("::", 1)[-1])
    digest = hashlib.sha1(f"{item}\n{origin}".encode()).hexdigest()[:8]
    return f"{_run.worker}-{test}-{digest}.json"


def _choices(data):
    """What hypothesis replays an example from: its choice sequence (its byte buffer in hypothesis versions
    before choice sequences, which a GPU machine's image may have)."""
    choices = getattr(data, "choices", None)
    return tuple(choices) if choices is not None else bytes(getattr(data, "buffer", b""))


def _reproduction(data) -> str | None:
    try:
        return f"@reproduce_failure({hypothesis.__version__!r}, {encode_failure(_choices(data))!r})"
    except Exception:  # the blob is a convenience: the case data alone replays the example
        return None


def _record(test, item, from_pytest, kwargs, error, generated, context) -> None:
    if _run is None:  # outside a configured fuzz run (e.g. the replay command): nothing to write
        return
    origin = _origin(error)
    path = _files.get((item, origin))
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    drawn = ", ".join(
        f"{name}={compact_repr(value)}" for name, value in kwargs.items() if name not in from_pytest
    )
    example = {
        "arguments": {name: to_data(value) for name, value in kwargs.items()},
        "repr": ", ".join(f"{name}={compact_repr(value)}" for name, value in kwargs.items()),
        "pin": f'@example({drawn}).via("discovered failure")',
        "reproduce_failure": _reproduction(context.data) if generated else None,
        "error": {
            "type": type(error).__name__,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(error)),
        },
        "verdicts": report.example_verdicts(),
        "kernel_path": _kernel_path_of(kwargs),
    }
    if path is None:
        path = _files[(item, origin)] = _run.failures / _file_name(item, origin)
        record = {
            "format": FORMAT,
            "property": test.__name__,
            "module": test.__module__,
            "module_file": _shown_path(sys.modules[test.__module__].__file__),
            "item": item,
            "counted_as": report.current_property(),
            "origin": origin,
            "profile": _run.profile,
            "shrinks": _run.shrinks,
            "first_seen": now,
            "failing_calls": 0,
            "environment": environment(),
            "found": example,
        }
        first = True
    else:
        record = json.loads(path.read_text())
        first = False
    record["failing_calls"] += 1
    record["updated"] = now
    record["stage"] = (
        "pinned example" if not generated else "reported" if context.is_final else
        "found" if record["failing_calls"] == 1 else "shrinking"
    )  # fmt: skip
    record["example"] = example
    report.write_json_atomically(path, record)
    # The summary names the file only once it exists: a kill between the two writes leaves a file the
    # summary does not list (fuzz.summary still finds it in failures/), never a listed file that is missing.
    if first:
        report.note_failure(report.current_property() or test.__name__, str(path.relative_to(_run.directory)))


def _kernel_path_of(kwargs: dict) -> dict | None:
    """The launch parameters of the case among a property's arguments (the permutation property passes
    (case, orders)); None for properties without one (invalid calls launch nothing)."""
    for value in kwargs.values():
        for candidate in value if isinstance(value, tuple) else (value,):
            if isinstance(candidate, Case):
                try:
                    return kernel_path(candidate)
                except Exception as error:  # e.g. a CUDA error that broke the context
                    return {"unavailable": f"{type(error).__name__}: {error}"}
    return None


def kernel_path(case: Case) -> dict:
    """Which kernels core launches for `case` on this device and how: grid, tile sizes, tensor
    descriptors on or off, the backward's variants, warps and stages, read from the plans core itself
    builds for the call (nothing launches). The one place the fuzzer reads core's launch internals."""
    import torch

    import core.testing
    from fuzz.cases import build
    from fuzz.oracle import DEVICE

    def bound_launches(plan, prefix: str, seen: set) -> dict:
        """The bound launches a plan holds, and those of the plans it holds (decode's attend plan,
        hopper's portable one), named by their path from the outer plan."""
        seen.add(id(plan))
        found = {}
        for name, value in vars(plan).items():
            if isinstance(value, core.testing.portable.launch.BoundLaunch):
                found[prefix + name] = {"grid": list(value.grid), **value.keywords}
            elif type(value).__module__.startswith("core.kernels.") and id(value) not in seen:
                found.update(bound_launches(value, f"{prefix}{name}.", seen))
        return found

    def launches(plan) -> dict:
        """The plan's module, its own tile settings where it launches a kernel of its own (the Gluon
        family), and every bound launch it holds: grid, constexprs and options."""
        own = {"plan": type(plan).__module__, **getattr(plan, "constexprs", {})}
        return {**own, **bound_launches(plan, "", set())}

    problem = case.problem
    inputs = build(case, DEVICE)
    q, k, v = (t.detach() for t in (inputs.q, inputs.k, inputs.v))
    forward = core.testing.plan_for(
        q, k, v, causal=problem.causal, sm_scale=problem.sm_scale,
        window_size=problem.window_size, softcap=problem.softcap,
    )  # fmt: skip
    dout = torch.zeros_like(q) if inputs.dout is None else inputs.dout  # autograd's stand-in for None
    dlse = None if inputs.dlse is None else inputs.dlse.contiguous()
    backward = forward.backward_plan(dout, dlse, q, k, v)
    return {"forward": launches(forward), "backward": launches(backward)}


def _git(*arguments: str) -> str:
    return subprocess.run(
        ["git", *arguments], cwd=REPO, capture_output=True, text=True, timeout=10
    ).stdout.strip()


def environment() -> dict:
    """Where the failures of this process happened (computed once)."""
    global _environment
    if _environment is None:
        import torch
        import triton

        import core

        try:
            commit = _git("rev-parse", "HEAD")
            # A run of uncommitted code names its commit and says the tree differed from it.
            if commit and _git("status", "--porcelain", "--untracked-files=no"):
                commit += " (with uncommitted changes)"
        except (OSError, subprocess.SubprocessError):
            commit = ""
        interpreted = core.is_interpreted()
        _environment = {
            "device": "cpu (Triton interpreter)" if interpreted else torch.cuda.get_device_name(),
            "interpreted": interpreted,
            "worker": _run.worker if _run else None,
            "pid": os.getpid(),
            "host": platform.node(),
            "commit": commit or None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "hypothesis": hypothesis.__version__,
        }
    return _environment
