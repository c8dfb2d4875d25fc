"""The portable family's fused backward (core.testing.portable.fused_plans, behind a switch): its
gradients against the float64 truth under the one tolerance policy, against the split backward, and
against themselves from run to run. It takes what the forward saved (the LSE in the kernels' base and
its low part), so the passes are reached through core.testing.
"""

from __future__ import annotations

import math

import pytest
import torch

import core
import core.testing
from core.tolerance import Verdict, judge, largest_finite

from .conftest import ON_GPU
from .helpers import make_qkv

DTYPES = (torch.float16, torch.bfloat16)
fused_plans = core.testing.portable.fused_plans

# ((B, Hq, Hkv, Nq, Nk, D), dtype): whole and ragged query and key blocks, Nq < Nk and Nq > Nk, GQA,
# D 16/64 (and 128 on the GPU). The GPU list is short: each (D, dtype, causal, mode, whole blocks) is a
# compile of a large kernel.
if ON_GPU:
    CASES = [
        ((2, 4, 4, 1024, 1024, 64), torch.float16),
        ((1, 8, 2, 1000, 1500, 128), torch.bfloat16),
        ((1, 4, 4, 777, 333, 16), torch.bfloat16),
    ]
else:
    CASES = [
        (shape, dtype)
        for shape in [
            (1, 2, 2, 17, 17, 64),
            (2, 2, 1, 33, 64, 64),
            (1, 2, 2, 100, 20, 16),
            (1, 1, 1, 1, 37, 64),
            (1, 4, 2, 48, 48, 16),
            (1, 3, 1, 50, 81, 16),
        ]
        for dtype in DTYPES
    ]


@pytest.fixture(autouse=True)
def family():
    """The fused backward belongs to the portable family, whose forward these tests call: once, not once
    per family."""
    with core.testing.use_family("portable"):
        yield "portable"


def case_id(case):
    (b, hq, hkv, nq, nk, d), dtype = case
    return f"B{b}-H{hq}/{hkv}-Nq{nq}-Nk{nk}-D{d}-{str(dtype).removeprefix('torch.')}"


class Problem:
    """One backward problem: inputs, dO (and dLSE), the forward's saved statistics, and the float64 truth
    and eager same-dtype gradients of the same loss."""

    def __init__(self, q, k, v, *, causal, sm_scale=None, with_dlse=False, seed=0):
        self.q, self.k, self.v = (t.detach() for t in (q, k, v))
        self.causal = causal
        self.sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        with core.testing.use_family("portable"):
            self.out, self.lse, self.lse_low = core.testing.forward(
                self.q, self.k, self.v, causal=causal, sm_scale=self.sm_scale
            )
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        self.dout = torch.randn(q.shape, generator=gen).to(device=q.device, dtype=q.dtype)
        # The loss is sum(out * dO) + sum(LSE * dLSE) with the natural LSE; the kernels' LSE is in base 2,
        # LSE2 = LSE / ln 2, so its gradient is dLSE * ln 2.
        self.dlse = torch.randn(self.lse.shape, generator=gen).to(q.device) if with_dlse else None
        self.truth = self._autograd_gradients(torch.float64)
        self.eager = self._autograd_gradients(None)

    def _autograd_gradients(self, compute_dtype):
        leaves = [t.to(compute_dtype or t.dtype).requires_grad_() for t in (self.q, self.k, self.v)]
        out, lse = core.attention_reference(
            *leaves, causal=self.causal, sm_scale=self.sm_scale, return_lse=True, compute_dtype=compute_dtype
        )
        loss = (out * self.dout.to(out.dtype)).sum()
        if self.dlse is not None:
            loss = loss + (lse * self.dlse.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, leaves)

    def kernel_dlse(self):
        return None if self.dlse is None else self.dlse * math.log(2.0)

    def fused(self, deterministic=True):
        dlse, inputs = self.kernel_dlse(), (self.q, self.k, self.v)
        plan = fused_plans.FusedBackwardPlan(
            self.dout, dlse, *inputs, self.causal, self.sm_scale, deterministic
        )
        return plan(self.dout, dlse, *inputs, self.out, self.lse, self.lse_low)

    def split(self):
        """Today's three-launch backward."""
        with core.testing.use_family("portable"), core.testing.fused_backward(False):
            return core.testing.backward(
                self.dout, self.kernel_dlse(), self.q, self.k, self.v, self.out, self.lse, self.lse_low,
                causal=self.causal, sm_scale=self.sm_scale,
            )  # fmt: skip

    def verdicts(self, gradients, against=None) -> list[Verdict]:
        """One verdict per gradient under the policy; `against` replaces the eager reference (e.g. by
        today's backward: then no gradient may be further from the truth than the policy allows it to be
        from today's)."""
        scale = largest_finite(*self.truth)
        baseline = self.eager if against is None else against
        return [
            judge(name, got, true, approx, family_scale=scale)
            for name, got, true, approx in zip(("dq", "dk", "dv"), gradients, self.truth, baseline)
        ]


def assert_all_ok(verdicts: list[Verdict]) -> None:
    failed = [str(v) for v in verdicts if not v.ok]
    assert not failed, "outside the tolerance policy:\n" + "\n".join(failed)


@pytest.mark.parametrize("deterministic", [True, False], ids=["ordered", "atomic"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradients_within_policy(case, causal, deterministic):
    shape, dtype = case
    q, k, v = make_qkv(*shape, dtype, seed=hash((shape, causal)) % 2**31)
    problem = Problem(q, k, v, causal=causal)
    gradients = problem.fused(deterministic)
    assert_all_ok(problem.verdicts(gradients))
    assert_all_ok(problem.verdicts(gradients, against=problem.split()))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_gradient_within_policy(causal):
    """With a dLSE, Delta comes from P and dP (the Delta pass) instead of dO . O."""
    shape = (1, 4, 2, 1000, 1200, 64) if ON_GPU else (1, 4, 2, 40, 50, 64)
    q, k, v = make_qkv(*shape, torch.bfloat16, seed=21)
    problem = Problem(q, k, v, causal=causal, with_dlse=True)
    for deterministic in (True, False):
        gradients = problem.fused(deterministic)
        assert_all_ok(problem.verdicts(gradients))
        assert_all_ok(problem.verdicts(gradients, against=problem.split()))


@pytest.mark.parametrize("layout", ["bshd", "sliced"])
def test_layouts(layout):
    """BSHD views read through tensor descriptors, sliced views (misaligned for them) by pointer loads;
    gradients come back laid out like their inputs."""
    n = 700 if ON_GPU else 40
    q, k, v = make_qkv(2, 4, 2, n, n + 9, 64, torch.float16, seed=5, layout=layout)
    problem = Problem(q, k, v, causal=True)
    gradients = problem.fused()
    assert_all_ok(problem.verdicts(gradients))
    for gradient, like in zip(gradients, (q, k, v)):
        assert gradient.shape == like.shape and gradient.dtype == like.dtype


def test_deterministic_mode_is_bitwise_reproducible():
    """Many key blocks add to each query block (and the GPU runs them side by side): the ordered sum
    must still come out the same to the bit."""
    shape = (2, 8, 2, 2500, 3000, 64) if ON_GPU else (1, 4, 2, 70, 90, 16)
    q, k, v = make_qkv(*shape, torch.bfloat16, seed=8)
    for causal in (True, False):
        problem = Problem(q, k, v, causal=causal)
        first = problem.fused()
        for _ in range(3):
            for a, b in zip(first, problem.fused()):
                assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [True, False], ids=["ordered", "atomic"])
def test_rows_that_see_no_key_get_zero_gradients(deterministic):
    n_queries, n_keys = (700, 150) if ON_GPU else (45, 9)
    q, k, v = make_qkv(1, 2, 1, n_queries, n_keys, 64, torch.float16, seed=5)
    problem = Problem(q, k, v, causal=True)
    dq, dk, dv = problem.fused(deterministic)
    assert torch.all(dq[:, :, : n_queries - n_keys] == 0)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert_all_ok(problem.verdicts((dq, dk, dv)))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ragged_keys_of_rows_with_very_negative_lse(causal):
    """Every score is far below 0 (LSE2 < -128): keys past Nk, loaded as zeros, would get
    P = exp2(0 - LSE2) = inf, and their zero keys would turn it into NaN in dQ, unless masked."""
    n_queries, n_keys = (300, 333) if ON_GPU else (40, 37)
    q, k, v = make_qkv(1, 2, 2, n_queries, n_keys, 64, torch.float16, seed=4)
    q, k = q.detach().abs() + 0.5, k.detach().abs() + 0.5
    problem = Problem(q, k, v, causal=causal, sm_scale=-8.0)
    assert problem.lse[:, :, -1].max() < -128
    for deterministic in (True, False):
        assert_all_ok(problem.verdicts(problem.fused(deterministic)))


def test_supports():
    q, k, v = make_qkv(1, 2, 1, 8, 8, 64, torch.float16, seed=0, requires_grad=False)
    assert fused_plans.supports(q, k, v, torch.zeros_like(q), True)
    as_float32 = [t.float() for t in (q, k, v)]
    assert not fused_plans.supports(*as_float32, as_float32[0], False)
    wide = make_qkv(1, 2, 1, 8, 8, 256, torch.bfloat16, seed=0, requires_grad=False)
    assert not fused_plans.supports(*wide, torch.zeros_like(wide[0]), True)
    assert not fused_plans.supports(q, k, v, torch.zeros_like(q, dtype=torch.bfloat16), True)
    other = "cpu" if ON_GPU else "meta"
    moved = [t.to(other) for t in (q, k, v)]
    assert not fused_plans.supports(*moved, moved[0], True)


def test_the_switch_routes_core_attention_through_the_fused_backward(monkeypatch):
    """core.attention's backward takes the fused kernel while the switch is on, with gradients within the
    policy; off, it takes the split backward."""
    q, k, v = make_qkv(1, 2, 1, 40, 56, 16, torch.float16, seed=5)
    problem = Problem(q, k, v, causal=True)
    calls = []
    run = fused_plans.FusedBackwardPlan.__call__
    monkeypatch.setattr(fused_plans.FusedBackwardPlan, "__call__", lambda *a: calls.append(1) or run(*a))
    for enabled in (True, False):
        with core.testing.fused_backward(enabled), core.testing.use_family("portable"):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            core.attention(*leaves, causal=True).backward(problem.dout)
        assert len(calls) == 1, "the fused backward ran while off, or not while on"
        assert_all_ok(problem.verdicts([t.grad for t in leaves]))
