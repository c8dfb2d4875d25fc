"""Sliding windows, logit softcapping and packed variable-length batches (core.attention's window_size
and softcap, core.attention_varlen).

- windows and softcaps: the kernel against the float64 truth by the tolerance policy, forward and
  backward, on every problem, layout, value distribution and upstream gradient the other properties
  draw, plus a window, a softcap or both; rows a window leaves without keys are exact zeros
  (fuzz/oracle.py: check_sound).
- varlen: every sequence of a ragged packed batch (lengths 0 and 1 included, Nq != Nk both ways) gives
  bit for bit what a dense core.attention call on that sequence alone gives, forward and backward;
  sequences without keys output 0 with LSE -inf, and keys no query sees get zero gradients.
- bad windows and softcaps: a clear TypeError/ValueError before any launch.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import core
import core.testing
from fuzz import profiles, report, sharding
from fuzz.cases import Case, VarlenCase, build, build_varlen
from fuzz.oracle import (
    DEVICE,
    check_sound,
    check_within_policy,
    logits_in_kernel_range,
    run_eager,
    run_kernel,
    run_truth,
    same_bits,
)
from fuzz.strategies import cases, varlen_cases, windowed_problems


@sharding.per_kernel
@profiles.budget("window_softcap")
@given(case=cases(problem=windowed_problems()))
def test_windows_and_softcaps_match_float64(kernel, case: Case):
    assume(sharding.belongs(kernel, case))  # a pinned case runs in its own family only
    report.count_example("window_softcap")
    inputs = build(case, DEVICE)
    results = run_kernel(case, inputs), run_eager(case, inputs), run_truth(case, inputs)
    in_range = logits_in_kernel_range(case, inputs)
    check_sound(case, inputs, *results, logits_in_range=in_range)
    if in_range:
        check_within_policy(case, results[0], results[2], results[1])


def _varlen_results(case: VarlenCase, inputs):
    """(out, lse, dq, dk, dv) of core.attention_varlen on the case's packed batch."""
    leaves = [t.detach().requires_grad_() for t in (inputs.q, inputs.k, inputs.v)]
    out, lse = core.attention_varlen(
        *leaves, inputs.cu_seqlens_q, inputs.cu_seqlens_k, max(*case.lens_q, 1), max(*case.lens_k, 1),
        **case.options, return_lse=True,
    )  # fmt: skip
    out.backward(inputs.dout)
    return out.detach(), lse.detach(), *(t.grad for t in leaves)


@sharding.per_kernel
@profiles.budget("varlen")
@given(case=varlen_cases())
def test_each_packed_sequence_equals_its_dense_call(kernel, case: VarlenCase):
    """The varlen kernels run the tiles of each sequence in the same order on the same numbers as a
    dense call on that sequence alone, in the portable family (which runs every varlen call; a dense
    decode-shaped call would otherwise take the decode family's split kernels): every output and
    gradient is bitwise the dense call's."""
    assume((case.dtype, case.causal) == kernel)
    report.count_example("varlen")
    inputs = build_varlen(case, DEVICE)
    out, lse, dq, dk, dv = _varlen_results(case, inputs)
    starts_q, starts_k = inputs.cu_seqlens_q.tolist(), inputs.cu_seqlens_k.tolist()
    for b, (n_queries, n_keys) in enumerate(zip(case.lens_q, case.lens_k, strict=True)):
        rows, keys = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        if n_keys == 0:
            assert bool((out[rows] == 0).all()), f"sequence {b} has no keys: its output must be 0"
            assert bool((lse[:, rows] == -math.inf).all()), f"sequence {b} has no keys: its LSE must be -inf"
            assert bool((dq[rows] == 0).all()), f"sequence {b} has no keys: its dq must be 0"
        if n_queries == 0:
            assert bool((dk[keys] == 0).all() and (dv[keys] == 0).all()), f"sequence {b}: unseen keys' grads"
        if n_queries == 0 or n_keys == 0:
            continue
        dense = [t.detach()[s].transpose(0, 1).unsqueeze(0).requires_grad_()
                 for t, s in ((inputs.q, rows), (inputs.k, keys), (inputs.v, keys))]  # fmt: skip
        with core.testing.use_family("portable"):
            dense_out, dense_lse = core.attention(*dense, **case.options, return_lse=True)
            dense_out.backward(inputs.dout[rows].transpose(0, 1).unsqueeze(0))
        pairs = {
            "out": (out[rows], dense_out[0].detach().transpose(0, 1)),
            "lse": (lse[:, rows], dense_lse[0].detach()),
            "dq": (dq[rows], dense[0].grad[0].transpose(0, 1)),
            "dk": (dk[keys], dense[1].grad[0].transpose(0, 1)),
            "dv": (dv[keys], dense[2].grad[0].transpose(0, 1)),
        }
        for name, (packed, alone) in pairs.items():
            assert same_bits(packed, alone), (
                f"sequence {b} ({n_queries} x {n_keys}): {name} != its dense call"
            )


VALID_WINDOWS = st.tuples(st.integers(-1, 9), st.integers(-1, 9))
BAD_SIDES = st.one_of(
    st.integers(max_value=-2), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2)
)
BAD_WINDOWS = st.one_of(
    st.tuples(BAD_SIDES, st.integers(-1, 9)),
    st.tuples(st.integers(-1, 9), BAD_SIDES),
    st.lists(st.integers(-1, 9), max_size=4).filter(lambda w: len(w) != 2),
    st.integers(),
)
VALID_SOFTCAPS = st.one_of(st.just(0.0), st.floats(1e-30, 1e30), st.integers(0, 100))
BAD_SOFTCAPS = st.one_of(
    st.floats(max_value=-1e-300),
    st.sampled_from((math.inf, -math.inf, math.nan, 1e39, 10**400)),
    st.text(max_size=2),
    st.none(),
    st.booleans(),
)


@profiles.budget("window_softcap", sharded=False)
@given(broken=st.sampled_from(("window_size", "softcap")), data=st.data())
def test_bad_windows_and_softcaps_are_refused(broken, data):
    """A window side below -1 or not an int, a window that is not a pair, a softcap below 0, non-finite,
    beyond float32 or not a number: a TypeError/ValueError naming it, before anything is launched."""
    window = data.draw(BAD_WINDOWS if broken == "window_size" else VALID_WINDOWS, label="window_size")
    softcap = data.draw(BAD_SOFTCAPS if broken == "softcap" else VALID_SOFTCAPS, label="softcap")
    q = torch.zeros(1, 1, 4, 16, dtype=torch.float16, device=DEVICE)
    with core.testing.launches_forbidden(), pytest.raises((TypeError, ValueError), match=broken):
        core.attention(q, q, q, window_size=window, softcap=softcap)
