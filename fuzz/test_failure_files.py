"""The failure files survive a run killed mid-way, and replay from the file alone (fuzz/failures.py).

A scratch property with a planted bug (core.attention's output 1% too large) runs in a pytest
subprocess under the `dev` profile, which shrinks; the subprocess is SIGKILLed as soon as the first
failure file appears, i.e. while hypothesis is still shrinking and before pytest has printed anything
about the failure. The file must be there, complete, and `python -m fuzz.replay` must reproduce the
failure from it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from fuzz import profiles
from fuzz.cases import Case, Layout, Problem, Upstream, Values, compact_repr, from_data, to_data

CORE_SRC = profiles.REPO / "packages" / "core" / "src"

PLANTED = '''
import contextlib

import torch
from hypothesis import given
from hypothesis import strategies as st

import core
from fuzz import profiles, report
from fuzz.cases import Case, Problem, Upstream, Values
from fuzz.test_accuracy import check_against_float64

CORRECT = core.attention


@contextlib.contextmanager
def planted_bug():
    """core.attention with every output 1% too large."""

    def too_large(*args, **kwargs):
        result = CORRECT(*args, **kwargs)
        return (result[0] * 1.01, result[1]) if kwargs.get("return_lse") else result * 1.01

    core.attention = too_large
    try:
        yield
    finally:
        core.attention = CORRECT


small_problems = st.builds(
    Problem,
    n_queries=st.integers(1, 24),
    n_keys=st.integers(1, 24),
    dtype=st.just(torch.float32),
    causal=st.booleans(),
)


@profiles.budget("forward", sharded=False)
@given(
    case=st.builds(
        Case,
        problem=small_problems,
        values=st.builds(Values, seed=st.integers(0, 2**16)),
        upstream=st.just(Upstream(lse="unused")),
    )
)
def test_planted_bug_is_found(case):
    report.count_example("planted")
    with planted_bug():
        check_against_float64(case, backward=False)
'''


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUZZ_", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join((str(profiles.REPO), str(CORE_SRC)))
    return env


def _first_failure_file(runs: Path, process: subprocess.Popen, seconds: float) -> Path:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = sorted(runs.glob("*/failures/*.json"))
        if found:
            return found[0]
        assert process.poll() is None, "the scratch run ended before any failure file appeared"
        time.sleep(0.02)
    raise AssertionError(f"no failure file after {seconds} s")


def test_a_killed_run_keeps_a_complete_replayable_failure_file(tmp_path):
    (tmp_path / "test_planted.py").write_text(textwrap.dedent(PLANTED))
    runs = tmp_path / "runs"
    command = [
        sys.executable, "-m", "pytest", "test_planted.py", "-p", "fuzz.conftest", "-p", "no:cacheprovider",
        "-q", "--profile", "dev", "--db", str(tmp_path / "db"), "--report-dir", str(runs),
    ]  # fmt: skip
    with open(tmp_path / "pytest.out", "w+") as output:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=_environment(), stdout=output, stderr=subprocess.STDOUT
        )
        try:
            path = _first_failure_file(runs, process, seconds=120)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        output.seek(0)
        printed = output.read()
    assert process.returncode == -signal.SIGKILL
    assert "Falsifying" not in printed and "Failing test case" not in printed, printed

    record = json.loads(path.read_text())  # complete: it parses
    assert record["stage"] in ("found", "shrinking"), "killed before hypothesis reported the failure"
    assert record["property"] == "test_planted_bug_is_found" and record["counted_as"] == "planted"
    example = record["example"]
    case = from_data(example["arguments"]["case"])
    assert isinstance(case, Case) and case.problem.dtype == torch.float32
    assert example["reproduce_failure"].startswith("@reproduce_failure(")
    assert any(v["quantity"] == "out" and not v["ok"] for v in example["verdicts"])
    assert "TENSOR_DESCRIPTORS" in example["kernel_path"]["forward"]["launch"]
    assert (runs / path.parent.parent.name / "summary-main.json").exists()
    summary = subprocess.run(
        [sys.executable, "-m", "fuzz.summary", str(path.parent.parent)],
        cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert summary.returncode == 1 and f"failure file: {path}" in summary.stdout, summary.stdout

    replay = subprocess.run(
        [sys.executable, "-m", "fuzz.replay", str(path)],
        cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert replay.returncode == 1, replay.stdout + replay.stderr
    assert "FAIL  out" in replay.stdout and "still fails: AssertionError" in replay.stdout, replay.stdout


def test_arguments_survive_the_round_trip_through_json():
    case = Case(
        problem=Problem(batch=2, q_heads=4, kv_heads=2, head_dim=200, dtype=torch.bfloat16, sm_scale=-1e308),
        layouts=(Layout(order=(0, 2, 1, 3)), Layout(steps=(1, 2, 1, 3), offset=17, broadcast=(0,)), Layout()),
        values=Values("huge_logits", seed=2**32 - 1, level=1.5),
        upstream=Upstream(out="sum", lse="dense", lse_layout=Layout(order=(0, 2, 1))),
    )
    arguments = {
        "kernel": (torch.bfloat16, True),
        "args": (case, (1, 0), (1, 0)),
        "power": -3,
        "scale": -float("inf"),
    }
    data = json.loads(
        json.dumps({name: to_data(value) for name, value in arguments.items()}, allow_nan=False)
    )
    assert {name: from_data(value) for name, value in data.items()} == arguments
    assert compact_repr(Case(problem=Problem(n_queries=3))) == "Case(problem=Problem(n_queries=3))"
