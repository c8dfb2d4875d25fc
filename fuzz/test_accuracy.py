"""The kernel against the float64 truth, judged by core.tolerance, on every input the strategies reach.

Each example also goes through `check_sound`: inputs and canaries untouched (an out-of-view write),
finite in -> finite out (an out-of-view read finds a NaN canary), and exact zeros for rows that see no
key. Kernel outputs start NaN-poisoned (fuzz/conftest.py), so an element never written cannot pass.

The @example cases are failures the fuzzer found, pinned forever (docs/fuzzing.md: how to pin one).
"""

from __future__ import annotations

import torch
from hypothesis import assume, event, example, given

from fuzz import profiles, report, sharding
from fuzz.cases import Case, Layout, Problem, Upstream, Values, build
from fuzz.oracle import DEVICE, check_sound, check_within_policy, run_eager, run_kernel, run_truth
from fuzz.strategies import FORWARD_ONLY, cases, extreme_scales, problems


def check_against_float64(case: Case, backward: bool) -> None:
    inputs = build(case, DEVICE)
    kernel = run_kernel(case, inputs, backward)
    eager = run_eager(case, inputs, backward)
    check_sound(case, inputs, kernel, eager)
    check_within_policy(case, kernel, run_truth(case, inputs, backward), eager)


@sharding.per_kernel
@profiles.budget("forward")
# float32 LSE ~3x the eager reference's error on plain inputs (N(0,1), default scale): the base-2 LSE
# is converted to natural log by one more float32 rounding.
@example(
    case=Case(
        problem=Problem(n_queries=1, n_keys=2, head_dim=200, dtype=torch.float32, causal=False),
        upstream=Upstream(lse="unused"),
    )
).via("discovered failure")
# float32 output past the bound at large logits: folding log2(e) into the scale rounds every logit once more.
@example(
    case=Case(
        problem=Problem(q_heads=2, kv_heads=2, n_queries=44, n_keys=43, head_dim=1, dtype=torch.float32,
                        sm_scale=1.3542555469368927),
        values=Values("huge_logits", seed=2323178520, level=0.5),
        upstream=Upstream(lse="unused"),
    )
).via("discovered failure")  # fmt: skip
@given(case=cases(upstream=FORWARD_ONLY))
def test_forward_matches_float64(kernel, case):
    assume(sharding.belongs(kernel, case))  # a pinned case runs in its own family only
    report.count_example("forward")
    check_against_float64(case, backward=False)


@sharding.per_kernel
@profiles.budget("gradients")
# The LSE's gradient was read as if contiguous: a (B, N, H)-ordered dLSE gave dq, dk off by O(1).
@example(
    case=Case(
        problem=Problem(q_heads=2, dtype=torch.float32),
        upstream=Upstream(out="unused", lse="dense", lse_layout=Layout(order=(0, 2, 1))),
    )
).via("discovered failure")
# dq was NaN: keys past Nk (loaded as zeros) got P = exp2(0 - LSE2) = inf once a row's LSE2 < -128.
@example(
    case=Case(
        problem=Problem(n_queries=1, n_keys=1, head_dim=1, causal=False),
        values=Values("huge_logits", seed=77981, level=0.5551930187114733),
        upstream=Upstream(out="sum"),
    )
).via("discovered failure")
# Peaky softmax, float32: P recomputed in the backward is off by ~eps32 * |logit| relative (dv 233x).
@example(case=Case(problem=Problem(head_dim=64, dtype=torch.float32, causal=False, sm_scale=100.0))).via(
    "discovered failure"
)
# One-hot rows, float16: dS = P (dP - Delta) keeps float32 cancellation noise where the eager reference
# gets exactly 0, and sm_scale multiplies it into dq and dk (6.6x the bound).
@example(
    case=Case(
        problem=Problem(q_heads=2, kv_heads=2, n_queries=4, n_keys=4, head_dim=127, causal=False,
                        sm_scale=9416.101252726812),
        values=Values("huge_logits", seed=226799, level=0.597923571315075),
    )
).via("discovered failure")  # fmt: skip
@given(case=cases())
def test_gradients_match_float64(kernel, case):
    assume(sharding.belongs(kernel, case))  # a pinned case runs in its own family only
    report.count_example("gradients")
    check_against_float64(case, backward=True)


@sharding.per_kernel
@profiles.budget("extreme_scales")
# Logits past float32's range (|q.k| * sm_scale * log2(e) > 3.4e38): inf/NaN gradients.
@example(case=Case(problem=Problem(dtype=torch.float32, causal=False, sm_scale=1e37))).via(
    "discovered failure"
)
# sm_scale * log2(e) at float32's largest value: the LSE comes out inf.
@example(case=Case(problem=Problem(n_queries=1, n_keys=1, head_dim=1, sm_scale=2.3586572558024336e38))).via(
    "discovered failure"
)
@given(case=cases(problem=problems(scales=lambda head_dim: extreme_scales())))
def test_every_finite_scale_is_accurate_or_rejected(kernel, case):
    """Validation accepts any finite sm_scale: each one must give a result within the policy, unless
    core rejects it with a ValueError about sm_scale."""
    assume(sharding.belongs(kernel, case))  # a pinned case runs in its own family only
    report.count_example("extreme_scales")
    try:
        check_against_float64(case, backward=True)
    except ValueError as rejected:
        if "sm_scale" not in str(rejected):
            raise
        event("sm_scale rejected with a ValueError")
