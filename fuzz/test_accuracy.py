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
from fuzz.oracle import (
    DEVICE,
    check_sound,
    check_within_policy,
    logits_in_kernel_range,
    run_eager,
    run_kernel,
    run_truth,
)
from fuzz.strategies import FORWARD_ONLY, cases, extreme_scales, problems


def check_against_float64(case: Case, backward: bool) -> None:
    inputs = build(case, DEVICE)
    kernel = run_kernel(case, inputs, backward)
    eager = run_eager(case, inputs, backward)
    truth = run_truth(case, inputs, backward)
    in_range = logits_in_kernel_range(case, inputs)
    check_sound(case, inputs, kernel, eager, truth, logits_in_range=in_range)
    if in_range:
        check_within_policy(case, kernel, truth, eager)
    else:
        event("scaled logits beyond the kernels' float32 range: accuracy not judged")


@sharding.per_kernel
@profiles.budget("forward")
# float32 LSE ~3x the eager reference's error on plain inputs (N(0,1), default scale): the base-2 LSE
# was converted to natural log by one more float32 rounding. float32 now works in natural base.
@example(
    case=Case(
        problem=Problem(n_queries=1, n_keys=2, head_dim=200, dtype=torch.float32, causal=False),
        upstream=Upstream(lse="unused"),
    )
).via("discovered failure")
# float32 output past the bound at large logits: folding log2(e) into the scale rounded every logit once
# more. float32 now works in natural base.
@example(
    case=Case(
        problem=Problem(q_heads=2, kv_heads=2, n_queries=44, n_keys=43, head_dim=1, dtype=torch.float32,
                        sm_scale=1.3542555469368927),
        values=Values("huge_logits", seed=2323178520, level=0.5),
        upstream=Upstream(lse="unused"),
    )
).via("discovered failure")  # fmt: skip
# float32 on an H100, one key per row: the LSE is the score itself, and the score's sequential FMA-chain
# dot over D = 64 was 4 ulps off (1.12x the bound). Scores are now float64-summed dots
# (core.kernels.shared._dot_parts).
@example(
    case=Case(
        problem=Problem(n_queries=348, n_keys=1, head_dim=64, dtype=torch.float32, sm_scale=-0.125),
        layouts=(Layout(order=(0, 2, 1, 3)),) * 3,
        values=Values("normal", seed=5271),
        upstream=Upstream(lse="unused"),
    )
).via("discovered failure")
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
# Peaky softmax, float32: P recomputed in the backward was off by ~eps32 * |LSE| relative (dv 233x):
# fixed by the two-part LSE (the portable forward kernel) and order-independent interpreter dots
# (core._runtime).
@example(case=Case(problem=Problem(head_dim=64, dtype=torch.float32, causal=False, sm_scale=100.0))).via(
    "discovered failure"
)
# One-hot rows, float16: dS = P (dP - Delta) kept float32 cancellation noise where the eager reference
# gets exactly 0, and sm_scale multiplied it into dq and dk (6.6x the bound): Delta is now the same dot
# as dP (core.kernels.portable.backward, backward_preprocess_kernel).
@example(
    case=Case(
        problem=Problem(q_heads=2, kv_heads=2, n_queries=4, n_keys=4, head_dim=127, causal=False,
                        sm_scale=9416.101252726812),
        values=Values("huge_logits", seed=226799, level=0.597923571315075),
    )
).via("discovered failure")  # fmt: skip
# Tied rows, float16, sm_scale 1e4: the true dq is beyond 65504 and the kernel's is inf, where eager
# float16 attention saturates at 65504. A fuzzer bug: "finite" is now required only where the truth fits.
@example(
    case=Case(
        problem=Problem(q_heads=3, kv_heads=1, n_queries=33, n_keys=9, head_dim=235, causal=False,
                        sm_scale=9974.66065778928),
        layouts=(Layout(),
                 Layout(order=(3, 1, 2, 0), steps=(2, 1, 3, 3), pads=(0, 0, 1, 0), offset=32,
                        broadcast=(0, 1)),
                 Layout(order=(1, 3, 2, 0), steps=(1, 1, 1, 2), pads=(2, 3, 3, 3), offset=17,
                        broadcast=(1,))),
        values=Values("ties", seed=213),
        upstream=Upstream(out_layout=Layout(order=(0, 2, 1, 3)), lse="unused"),
    )
).via("discovered failure")  # fmt: skip
# float32 on an H100 (the FMA-chain score dot again): dq 1.33x and dk 1.19x the bound at D = 128, and
# the LSE 1.17x at sm_scale -8438.
@example(
    case=Case(
        problem=Problem(batch=4, n_queries=1, n_keys=212, head_dim=128, dtype=torch.float32, causal=False,
                        sm_scale=2.0854301379905067),
        layouts=(Layout(order=(0, 2, 1, 3)), Layout(), Layout(order=(0, 2, 1, 3))),
        values=Values("normal", seed=65711),
        upstream=Upstream(out="sum"),
    )
).via("discovered failure")  # fmt: skip
@example(
    case=Case(
        problem=Problem(batch=2, q_heads=4, kv_heads=2, n_queries=2, n_keys=1, head_dim=128,
                        dtype=torch.float32, sm_scale=-8437.928284377833),
        values=Values("uniform", seed=19796),
        upstream=Upstream(out="sum", lse="sum"),
    )
).via("discovered failure")  # fmt: skip
# float32 on an H100 (gpu-2k run 4): out 1.69x the bound (3.5e-7 against eager's 4.5e-8) at sm_scale
# -9880: two keys 8.7 apart in logit at ~4e4, whose gap the dot's rounding to float32 moved by 1.2e-3. The
# scores now keep that rounding error (core.kernels.shared._scores): 0.29x on the GPU. The inputs are
# generated on the device, so the CPU run sees other values (it passed there before the fix too).
@example(
    case=Case(
        problem=Problem(batch=4, q_heads=4, kv_heads=2, n_queries=31, n_keys=32, head_dim=64,
                        dtype=torch.float32, sm_scale=-9880.672000451868),
        layouts=(Layout(order=(0, 2, 1, 3)),) * 3,
        values=Values("uniform", seed=4, level=1.0),
        upstream=Upstream(out="unused", lse="sum"),
    )
).via("discovered failure")  # fmt: skip
# float32 on an H100 (gpu-2k run 5): dk 2.14x and dq 1.41x the bound at sm_scale 295. Nearly one-hot rows:
# dP - Delta ~1e-6 lost its precision to the roundings of Delta (then dO . O), dP and the largest P. The
# backward now sums Delta = sum P dP / sum P in float64 and keeps dP and Delta in two parts
# (core.kernels.portable.backward). With the GPU's inputs replayed on the CPU: dk 2.14x -> 0.00x.
@example(
    case=Case(
        problem=Problem(batch=2, q_heads=2, kv_heads=1, n_queries=32, n_keys=3350, head_dim=64,
                        dtype=torch.float32, causal=False, sm_scale=295.2038364815685),
        layouts=(Layout(), Layout(), Layout(order=(0, 2, 1, 3))),
        values=Values("normal", seed=83682),
        upstream=Upstream(out="sum"),
    )
).via("discovered failure")  # fmt: skip
# bf16 on the H200 (2026-12-02 gpu-2k): dq 3.84x and 2.50x the bound with a gradient on the LSE. q = 0 and
# two equal keys ("ties"), so the softmax part of dq is exactly 0 and dq = dLSE sm_scale k, which eager
# attention gets exactly; Delta = dO . O used O rounded to bf16, and dS summed over the row missed dLSE by
# dO . (O - O rounded). With a dLSE the dQ kernel now sums Delta from P and dP (the portable backward). The
# second reproduces on the CPU (1.82x before the fix, exact after).
@example(
    case=Case(
        problem=Problem(batch=3, q_heads=2, kv_heads=1, n_queries=1, n_keys=2, head_dim=64,
                        dtype=torch.bfloat16, causal=True, sm_scale=1.0),
        values=Values("ties", seed=1874624),
        upstream=Upstream(out="dense", lse="sum", out_layout=Layout(order=(0, 2, 1, 3))),
    )
).via("discovered failure")  # fmt: skip
@example(
    case=Case(
        problem=Problem(batch=2, q_heads=1, kv_heads=1, n_queries=1, n_keys=2, head_dim=128,
                        dtype=torch.bfloat16, causal=False, sm_scale=256.0),
        layouts=(Layout(), Layout(), Layout(order=(0, 2, 1, 3))),
        values=Values("ties", seed=989),
        upstream=Upstream(out="dense", lse="sum", out_layout=Layout(order=(0, 2, 1, 3))),
    )
).via("discovered failure")  # fmt: skip
# float16 on an H100 (gpu-1k, 2026-12-07): dq 3.9e4x the bound (18.8 where the truth is 0) at sm_scale 3852,
# no gradient on the LSE. The same q = 0 row over two equal keys as above: dS summed over the row was
# dO . (O - O rounded) instead of 0, and sm_scale k multiplied it into dq; 1.4-1.9x the bound at the
# default sm_scale too (replayed on the CPU). fp16/bf16 now take the Delta pass as well
# (core.kernels.portable.plans.PreciseDelta).
@example(
    case=Case(
        problem=Problem(batch=3, q_heads=2, kv_heads=2, n_queries=1, n_keys=2, head_dim=64, causal=False,
                        sm_scale=3851.8099347614557),
        layouts=(Layout(), Layout(order=(0, 2, 1, 3)), Layout()),
        values=Values("ties", seed=1270),
        upstream=Upstream(out="sum", lse="unused"),
    )
).via("discovered failure")  # fmt: skip
@example(
    case=Case(
        problem=Problem(batch=3, q_heads=2, kv_heads=2, n_queries=1, n_keys=2, head_dim=64, causal=False),
        layouts=(Layout(), Layout(order=(0, 2, 1, 3)), Layout()),
        values=Values("ties", seed=1270),
        upstream=Upstream(out="sum", lse="unused"),
    )
).via("discovered failure")  # fmt: skip
# float16, sm_scale 1e4, ties with queries shrunk 1e-4 and a loss on the LSE (CPU fuzz ci, 2026-12-07):
# dq of a q = 0 row is sm_scale x (the dLSE's share) ~ the float16 limit; truth 65504, eager 65472, and
# the kernel's, within the policy's error, at or past 65520, which rounds to inf. The check's demand of a
# finite result there was stricter than the policy; it now accepts an inf where the truth is within the
# element's allowance of the overflow threshold (fuzz/oracle.py: check_sound).
@example(
    case=Case(
        problem=Problem(q_heads=3, n_queries=33, n_keys=9, head_dim=235, causal=False,
                        sm_scale=9974.66065778928),
        layouts=(Layout(), Layout(order=(3, 1, 2, 0), steps=(2, 1, 3, 3), pads=(0, 0, 1, 0), offset=32,
                                  broadcast=(0, 1)),
                 Layout(order=(1, 3, 2, 0), steps=(1, 1, 1, 2), pads=(2, 3, 3, 3), offset=17,
                        broadcast=(1,))),
        values=Values("ties", seed=3983, level=0.0001),
        upstream=Upstream(lse="sum", out_layout=Layout(order=(0, 2, 1, 3))),
    )
).via("discovered failure")  # fmt: skip
@given(case=cases())
def test_gradients_match_float64(kernel, case):
    assume(sharding.belongs(kernel, case))  # a pinned case runs in its own family only
    report.count_example("gradients")
    check_against_float64(case, backward=True)


@sharding.per_kernel
@profiles.budget("extreme_scales")
# float32, sm_scale 1e37: one-hot rows whose backward recomputed scores differed from the forward's in
# the last bit (interpreter dots summed in shape-dependent order), and eps32 * 1e38 made P inf/NaN.
@example(case=Case(problem=Problem(dtype=torch.float32, causal=False, sm_scale=1e37))).via(
    "discovered failure"
)
# sm_scale * log2(e) at float32's largest value: logits past the kernels' range (now judged by the
# documented range, fuzz/oracle.py: logits_in_kernel_range).
@example(case=Case(problem=Problem(n_queries=1, n_keys=1, head_dim=1, sm_scale=2.3586572558024336e38))).via(
    "discovered failure"
)
# bfloat16, sm_scale -9e15 (H100 gpu-2k run 3): rows tied between two keys. Beyond |m| = 2^24 the saved
# LSE m + log2(2) rounded to m, so the backward's P was 1 for each key instead of 1/2: dk 47x the bound.
# The LSE is now two-part for every dtype.
@example(
    case=Case(
        problem=Problem(q_heads=2, kv_heads=1, n_queries=9, n_keys=239, head_dim=80, dtype=torch.bfloat16,
                        sm_scale=-9007199254740992.0),
        layouts=(Layout(order=(0, 2, 1, 3)),) * 3,
        values=Values("ties", seed=17369, level=1.0),
        upstream=Upstream(out="sum", lse="absent"),
    )
).via("discovered failure")  # fmt: skip
# float32, sm_scale 2e16, ties (H100 gpu-1k run): dk twice the bound, but the kernel was right and the
# float64 truth wrong. torch.logsumexp's backward, exp(s - lse), lost log 2 in the rounded LSE at |s| ~
# 1e18 (P = 1 per tied key); the reference's LSE gradient is now the softmax (core.reference._LogSumExp).
@example(
    case=Case(
        problem=Problem(q_heads=2, kv_heads=2, n_queries=2047, n_keys=5, head_dim=128, dtype=torch.float32,
                        causal=False, sm_scale=1.979981584498168e16),
        layouts=(Layout(), Layout(order=(0, 2, 1, 3)), Layout()),
        values=Values("ties", seed=16588),
        upstream=Upstream(out="unused", lse="dense"),
    )
).via("discovered failure")  # fmt: skip
@given(case=cases(problem=problems(scales=lambda head_dim: extreme_scales())))
def test_every_finite_scale_is_accurate_or_rejected(kernel, case):
    """Every finite sm_scale gives a result within the policy, unless core rejects it with a ValueError
    about sm_scale (|sm_scale| beyond float32's range once log2(e) is folded in)."""
    assume(sharding.belongs(kernel, case))  # a pinned case runs in its own family only
    report.count_example("extreme_scales")
    try:
        check_against_float64(case, backward=True)
    except ValueError as rejected:
        if "sm_scale" not in str(rejected):
            raise
        event("sm_scale rejected with a ValueError")
