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

from fuzz import profiles, report, summary
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
    live = json.loads((runs / path.parent.parent.name / "summary-main.json").read_text())
    assert live["code"] == report.code_fingerprint() and live["device"] and live["torch"] and live["triton"]
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


def test_summary_counts_only_the_runs_on_the_code_asked_for(tmp_path, capsys, monkeypatch):
    """Runs on other kernels or another fuzzer are listed but not added: a count toward "N examples on
    the final main" sums runs on one code fingerprint alone."""

    def summed(*arguments):
        # summary.main merges into this process's tallies (report's module state): each call starts empty
        monkeypatch.setattr(report, "_examples", type(report._examples)())
        monkeypatch.setattr(report, "_failures", type(report._failures)())
        monkeypatch.setattr(report, "_failure_files", [])
        monkeypatch.setattr(report, "_worst", {})
        code = summary.main(list(arguments))
        return code, capsys.readouterr().out

    runs = (("old", "a" * 16, 7, 1), ("new", "b" * 16, 5, 0), ("newer", "b" * 16, 6, 0))
    for name, code, examples, failures in runs:
        run = tmp_path / name
        run.mkdir()
        files = [f"failures/{name}.json"] * failures
        (run / "summary-gw0.json").write_text(json.dumps({
            "profile": "gpu-1k", "code": code, "device": "a card", "finished": True,
            "examples": {"forward": examples}, "failures": {"forward": failures}, "failure_files": files,
        }))  # fmt: skip
    code, printed = summed(str(tmp_path), "--code", "b" * 16)
    assert code == 0  # the failing run is left out
    assert "old: gpu-1k, 7 examples, 1 failures" in printed and "(left out: other code)" in printed
    assert "examples: 11 (forward 11)" in printed and "failures: 0" in printed, printed
    assert summed(str(tmp_path), "--code")[1].count("(left out: other code)") == 3  # this checkout's
    code, printed = summed(str(tmp_path))
    assert code == 1 and "examples: 18" in printed  # without --code: every run
