"""Invalid calls: a TypeError or ValueError with a clear message, never a crash, a hang, a kernel
launch or a silent result."""

from __future__ import annotations

import contextlib
import re
import signal

import pytest
from hypothesis import example, given

import core
import core.testing
from fuzz import profiles, report
from fuzz.cases import Case, Problem, build
from fuzz.invalid_inputs import CATALOGUE
from fuzz.oracle import DEVICE
from fuzz.strategies import breakages, problems

# Validation never looks at values, so tiny problems do: each example then costs microseconds.
TINY = profiles.Limits(
    max_batch=2, max_kv_heads=2, max_group=2, max_seq=8, max_head_dim=32, max_scores=256, max_work=8192
)
HANG_SECONDS = 30


@contextlib.contextmanager
def hang_guard(seconds: int):
    """Validation is pure Python and takes microseconds: a call still running after `seconds` hangs."""

    def hung(signum, frame):
        raise AssertionError(f"core.attention still running after {seconds} s on an invalid input")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@profiles.budget("bad_inputs", sharded=False)
# An int too large for a float escaped as OverflowError from the finiteness check.
@example(problem=Problem(), broken=(("sm_scale_not_finite", 4),)).via("discovered failure")
# Sparse and nested tensors reached the launcher (NotImplementedError / a misleading shape error).
@example(problem=Problem(), broken=(("not_strided", 0),)).via("discovered failure")
@example(problem=Problem(), broken=(("not_strided", 2),)).via("discovered failure")
@given(problem=problems(limits=TINY), broken=breakages(CATALOGUE))
def test_invalid_calls_raise_documented_errors(problem, broken):
    report.count_example("bad_inputs")
    inputs = build(Case(problem=problem), DEVICE)
    call = dict(
        q=inputs.q, k=inputs.k, v=inputs.v, causal=problem.causal, sm_scale=problem.sm_scale, return_lse=False
    )
    for name, form in broken:
        CATALOGUE[name].forms[form](call)

    with (
        core.testing.launches_forbidden(),
        hang_guard(HANG_SECONDS),
        pytest.raises((TypeError, ValueError)) as raised,
    ):
        core.attention(**call)
    error = raised.value
    expected = [CATALOGUE[name] for name, _ in broken]
    assert any(isinstance(error, b.error) and re.search(b.message, str(error)) for b in expected), (
        f"{type(error).__name__}({error}) is none of the errors expected for {[name for name, _ in broken]}: "
        + ", ".join(f"{b.error.__name__} matching {b.message!r}" for b in expected)
    )
