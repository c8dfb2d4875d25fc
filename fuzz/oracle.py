"""Run a case through the kernel and the references, and judge the kernel by the one tolerance policy.

Three implementations answer every case: the kernel (`core.attention`), the float64 truth and the eager
same-dtype reference (`core.attention_reference` with compute_dtype float64 / None). Each returns
`Results`; `check_within_policy` hands each quantity to `core.tolerance.judge`, steers hypothesis
towards large error/bound ratios with `target()`, and records the worst ratios for the session report.

When the eager reference overflows (float16 logits near 65504, or a gradient past float16's range) its
error is inf or NaN and the policy has no yardstick: an infinite bound would pass anything, a NaN bound
would fail even an exact kernel. That one comparison is skipped with a hypothesis event, and nothing else
is: the same example still goes through every other check, including finite-in -> finite-out, and
bfloat16/float32 examples with the same logits (whose eager references do not overflow) are judged in
full. docs/fuzzing.md gives the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from hypothesis import event, target

import core
from core.testing import score_scale
from fuzz import report
from fuzz.cases import Case, Inputs, KvCase, KvInputs, bits

# The kernels run where core was built for: the GPU, or the CPU under TRITON_INTERPRET=1.
DEVICE = "cpu" if core.is_interpreted() else "cuda"


@dataclass
class Results:
    out: torch.Tensor
    lse: torch.Tensor | None  # None when the case does not ask for it (return_lse=False)
    dq: torch.Tensor | None = None  # gradients: None for forward-only runs
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None

    def items(self):
        """(name, tensor) for every quantity present."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]


def _run(attention, case: Case, inputs: Inputs, backward: bool, **reference_kwargs) -> Results:
    problem = case.problem
    return_lse = case.upstream.return_lse
    result = attention(
        inputs.q, inputs.k, inputs.v, causal=problem.causal, sm_scale=problem.sm_scale,
        window_size=problem.window_size, softcap=problem.softcap, return_lse=return_lse, **reference_kwargs,
    )  # fmt: skip
    out, lse = result if return_lse else (result, None)
    results = Results(out.detach(), None if lse is None else lse.detach())
    if backward:
        used = [(t, g) for t, g in ((out, inputs.dout), (lse, inputs.dlse)) if g is not None]
        # The references compute in another dtype: the upstream gradient follows the output it belongs to.
        # A reference whose loss is the LSE alone never touches v: its dv is zeros, as the kernel's is.
        grads = torch.autograd.grad(
            [t for t, _ in used], (inputs.q, inputs.k, inputs.v), [g.to(t.dtype) for t, g in used],
            allow_unused=True, materialize_grads=True,
        )  # fmt: skip
        results.dq, results.dk, results.dv = grads
    return results


def run_kernel(case: Case, inputs: Inputs, backward: bool = True) -> Results:
    return _run(core.attention, case, inputs, backward)


def run_truth(case: Case, inputs: Inputs, backward: bool = True) -> Results:
    return _run(core.attention_reference, case, inputs, backward, compute_dtype=torch.float64)


def run_eager(case: Case, inputs: Inputs, backward: bool = True) -> Results:
    return _run(core.attention_reference, case, inputs, backward, compute_dtype=None)


def run_kvcache(case: KvCase, built: KvInputs, **reference):
    """(out, lse) of core.attention_with_kvcache on the case (appending in place), or with `reference`
    keywords (compute_dtype) of its float64 / eager reference."""
    options = dict(
        cache_seqlens=built.cache_seqlens, k=built.k, v=built.v, block_table=built.block_table,
        cache_batch_idx=built.cache_batch_idx, causal=case.causal, sm_scale=case.sm_scale,
        window_size=case.window, softcap=case.softcap, return_lse=True,
    )  # fmt: skip
    if reference:
        return core.attention_with_kvcache_reference(
            built.q, built.k_cache, built.v_cache, **options, **reference
        )
    return core.attention_with_kvcache(
        built.q, built.k_cache, built.v_cache, num_splits=case.num_splits, **options
    )


def _ulp(value: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype`'s numbers at `value` (a normal number)."""
    return math.ldexp(torch.finfo(dtype).eps, math.frexp(value)[1] - 1)


def _gradient_scale(truth: Results) -> float | None:
    """The policy measures dq, dk and dv against one floor, set by the largest of the three true
    gradients (None without a backward)."""
    gradients = [t for t in (truth.dq, truth.dk, truth.dv) if t is not None]
    return core.tolerance.largest_finite(*gradients) if gradients else None


def check_within_policy(case: Case, kernel: Results, truth: Results, eager: Results) -> None:
    """Judge every quantity the kernel produced against the float64 truth, as core.tolerance says."""
    failures = []
    gradient_scale = _gradient_scale(truth)
    for name, actual in kernel.items():
        family_scale = gradient_scale if name in ("dq", "dk", "dv") else None
        verdict = core.tolerance.judge(
            name, actual, getattr(truth, name), getattr(eager, name),
            input_dtype=case.problem.dtype, family_scale=family_scale,
        )  # fmt: skip
        if not math.isfinite(verdict.eager_error):
            event(f"{name}: eager {case.problem.dtype} reference overflowed, policy comparison skipped")
            continue
        if math.isfinite(verdict.ratio):
            target(verdict.ratio, label=f"{name} error / bound")
        report.record(case, verdict)
        if not verdict.ok:
            failures.append(str(verdict))
    assert not failures, "kernel outside the tolerance policy:\n  " + "\n  ".join(failures)


def all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def logits_in_kernel_range(case: Case, inputs: Inputs) -> bool:
    """Whether every logit as the kernels hold it (q.k times core.testing.score_scale: sm_scale, times
    log2(e) in base 2) fits float32 (taken in float64). README's support matrix states the same range.

    Beyond it a kernel's scores are inf and its outputs may be too, where eager attention in a wider
    format (bf16 holds up to 3.39e38, float32's 2.36e38 * log2(e) = 3.4e38) may still be finite."""
    problem = case.problem
    q, k = inputs.q.detach().double(), inputs.k.detach().double()
    k = k.repeat_interleave(problem.q_heads // problem.kv_heads, dim=1)
    largest_dot = (q @ k.transpose(-2, -1)).abs().nan_to_num(0.0, 0.0, 0.0).max().item()
    return largest_dot * abs(score_scale(problem.dtype, problem.scale)) <= torch.finfo(torch.float32).max


def check_sound(
    case: Case, inputs: Inputs, kernel: Results, eager: Results, truth: Results, logits_in_range: bool
) -> None:
    """What every run must satisfy whatever its accuracy: inputs untouched, shapes as documented,
    finite in -> finite out (while the scaled logits are within the kernels' float32 range), and exact
    zeros for the query rows that see no key (the causal mask's or a window's, Problem.empty_rows)."""
    problem = case.problem
    assert inputs.canaries_untouched(), (
        "the kernel wrote into the storage of its inputs (canary or value changed)"
    )
    assert kernel.out.shape == problem.q_shape and kernel.out.dtype == problem.dtype, (
        "out: wrong shape or dtype"
    )
    if kernel.lse is not None:
        assert kernel.lse.shape == problem.lse_shape and kernel.lse.dtype == torch.float32, (
            "lse: wrong shape or dtype"
        )

    empty = problem.empty_rows
    if logits_in_range and all_finite(inputs.q, inputs.k, inputs.v):
        # An out-of-view read hits a NaN canary and lands here too.
        assert all_finite(kernel.out), "finite inputs gave a non-finite output"
        if kernel.lse is not None:
            assert all_finite(kernel.lse[:, :, empty:]), (
                "finite inputs gave a non-finite LSE for a row that sees keys"
            )
        # A gradient may legitimately leave the dtype's range; the kernel must be finite wherever the
        # true gradient is within that range and the eager same-dtype reference manages to be finite too.
        # (Eager float16 attention can saturate at 65504 where the truth is beyond it.) Near the edge
        # of the range, an error the policy allows can carry a result past the dtype's overflow
        # threshold (largest + half an ulp: 65520 in float16), where rounding makes it inf; so an inf is
        # accepted where the truth is within the element's own allowance of that threshold: the policy's
        # factor times the eager reference's error there, plus its floor (found by the fuzzer: truth
        # 65504, eager 65472, the kernel's dq rounded to inf, at sm_scale 1e4 with a loss on the LSE).
        largest = torch.finfo(problem.dtype).max
        overflow = largest + _ulp(largest, problem.dtype) / 2
        gradient_scale = _gradient_scale(truth)
        for name in ("dq", "dk", "dv"):
            actual, plain, true = getattr(kernel, name), getattr(eager, name), getattr(truth, name)
            if actual is not None:
                allowance = core.tolerance.allowance(
                    name, true, plain, input_dtype=problem.dtype, family_scale=gradient_scale
                )
                may_round_to_inf = true.abs() + allowance >= overflow
                representable = torch.isfinite(plain) & (true.abs() <= largest) & ~may_round_to_inf
                assert bool(torch.isfinite(actual)[representable].all()), (
                    f"{name}: non-finite where the truth is within {problem.dtype}'s range and the eager "
                    f"{problem.dtype} reference is finite"
                )

    if empty:
        assert bool((kernel.out[:, :, :empty] == 0).all()), "rows that see no key must output exactly 0"
        if kernel.lse is not None:
            assert bool((kernel.lse[:, :, :empty] == float("-inf")).all()), (
                "rows that see no key must have LSE -inf"
            )
        if kernel.dq is not None:
            assert bool((kernel.dq[:, :, :empty] == 0).all()), "rows that see no key must get a zero dq"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and the sign of zero included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(bits(a.contiguous()), bits(b.contiguous()))
