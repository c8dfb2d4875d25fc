"""The one tolerance policy of this repository (tests, fuzzer and numerics lab all use it).

A kernel result passes when its largest error against the float64 truth is at most

    factor x (largest error of the eager same-dtype reference against the truth) + floor

with `floor = floor_ulps x eps(dtype of the quantity) x max|truth|`. This is how PyTorch's and
FlashAttention's own tests judge fused attention: a fused kernel is not expected to be exact, only to
be no worse than a small multiple of what a plain implementation in the same dtype already is.

Why these factors (docs/numerics-policy.md has the longer argument; the numerics lab measures them):
- out, lse: 2. The kernel keeps scores and softmax statistics in float32 where the eager reference
  rounds them to the input dtype, so it is usually *better* than eager; both round P to the input dtype
  before P.V. 2 leaves room for the online rescaling (one extra fp32 multiply per block) and for the
  different summation order, and is FlashAttention's factor for the forward pass.
- dq, dk, dv: 3. The backward recomputes P from the saved LSE and sums dS over every query or key
  block in float32, then rounds dS to the input dtype for two more dots. It has more rounding steps
  than the forward pass, so it gets FlashAttention-3's wider factor.
- floor: 1 ulp of the largest true value of the quantity's family: the output for out, the LSE for lse,
  the largest of the three gradients for dq, dk and dv. The output is finally rounded to its dtype, so
  half an ulp is unavoidable even for a perfect kernel; where the eager reference happens to be exact
  (a single key, say) the floor alone must cover that last rounding. The gradients share one family
  because they come out of one computation (dS feeds dq and dk) and dq, dk can be exactly zero (one
  key, or sm_scale = 0) while the fp32 cancellation in dP - Delta that produces them still rounds at
  the scale of the other gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "POLICY",
    "Tolerance",
    "Verdict",
    "allowance",
    "assert_within_tolerance",
    "judge",
    "largest_finite",
]


@dataclass(frozen=True)
class Tolerance:
    factor: float
    floor_ulps: float


_LOW_PRECISION = {
    "out": Tolerance(factor=2.0, floor_ulps=1.0),
    "lse": Tolerance(factor=2.0, floor_ulps=1.0),
    "dq": Tolerance(factor=3.0, floor_ulps=1.0),
    "dk": Tolerance(factor=3.0, floor_ulps=1.0),
    "dv": Tolerance(factor=3.0, floor_ulps=1.0),
}
# float32 gradients: 8 ulps of floor. The backward recomputes P = exp2(S*c - LSE2) instead of storing
# it; the exponent carries an absolute rounding error of about eps32 * (|S*c| + |LSE2|), i.e. a relative
# error in P of a few ulps for logits of order 1-10. In fp16/bf16 that is far below one output ulp; in
# fp32 it is not, and where the eager reference is exact (a single key: its P is exactly 1) only the
# floor can cover it.
_FLOAT32 = {**_LOW_PRECISION, **{q: Tolerance(factor=3.0, floor_ulps=8.0) for q in ("dq", "dk", "dv")}}

# dtype of the kernel's inputs -> quantity -> rule
POLICY: dict[torch.dtype, dict[str, Tolerance]] = {
    torch.float16: _LOW_PRECISION,
    torch.bfloat16: _LOW_PRECISION,
    torch.float32: _FLOAT32,
}


@dataclass(frozen=True)
class Verdict:
    quantity: str
    error: float  # max |actual - truth|
    eager_error: float  # max |eager - truth|
    bound: float  # factor * eager_error + floor

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # NaN error compares False: NaN never passes

    @property
    def ratio(self) -> float:
        """error / bound: below 1 passes; the fuzzer climbs this with hypothesis.target()."""
        return self.error / self.bound if self.bound > 0 else (0.0 if self.error == 0 else float("inf"))

    def __str__(self) -> str:
        return (
            f"{self.quantity}: max error {self.error:.3e} vs bound {self.bound:.3e} "
            f"(eager same-dtype error {self.eager_error:.3e}, ratio {self.ratio:.2f})"
        )


def _max_abs_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    # An infinity where the truth, rounded to the actual's dtype, is the same infinity is exact agreement,
    # not an infinite error: the LSE -inf of a row that sees no key, and a gradient beyond float16's
    # 65504, whose correctly rounded value is inf (found by the fuzzer: eager float16 attention
    # saturated at a finite value there and looked better than the kernel's exact inf).
    rounded_truth = truth.detach().to(actual.dtype).double().cpu()
    actual, truth = actual.detach().double().cpu(), truth.detach().double().cpu()
    diff = (actual - truth).abs()
    same_inf = torch.isinf(actual) & (actual == rounded_truth)
    diff = torch.where(same_inf, torch.zeros_like(diff), diff)
    if diff.numel() == 0:
        return 0.0
    if torch.isnan(diff).any():
        return float("nan")
    return diff.max().item()


def largest_finite(*tensors: torch.Tensor) -> float:
    """max |x| over the finite elements of all `tensors` (0 if there are none)."""
    values = torch.cat([t.detach().double().abs().flatten().cpu() for t in tensors])
    values = values[torch.isfinite(values)]
    return values.max().item() if values.numel() else 0.0


def judge(
    quantity: str,
    actual: torch.Tensor,
    truth: torch.Tensor,
    eager: torch.Tensor,
    *,
    input_dtype: torch.dtype | None = None,
    family_scale: float | None = None,
) -> Verdict:
    """Measure `actual` (kernel) and `eager` (same-dtype reference) against the float64 `truth`.

    `input_dtype` (the dtype of q, k, v) selects the row of POLICY; it defaults to `actual.dtype`, which
    is right for everything but the LSE (always float32). The floor is measured in ulps of
    `actual.dtype` at `family_scale`, which defaults to the largest finite true value of this quantity;
    for dq, dk and dv pass `largest_finite(true_dq, true_dk, true_dv)` (see the module docstring).
    """
    rule = POLICY[input_dtype or actual.dtype][quantity]
    scale = largest_finite(truth) if family_scale is None else family_scale
    eager_error = _max_abs_error(eager, truth)
    bound = rule.factor * eager_error + _floor(rule, actual.dtype, scale)
    return Verdict(quantity, _max_abs_error(actual, truth), eager_error, bound)


def allowance(
    quantity: str,
    truth: torch.Tensor,
    eager: torch.Tensor,
    *,
    input_dtype: torch.dtype | None = None,
    family_scale: float | None = None,
) -> torch.Tensor:
    """The policy's bound element by element, float64 on truth's device: factor x (the eager reference's
    own error at that element) + the floor, as `judge` takes them (its bound is this with the largest
    eager error). The floor is in ulps of `eager.dtype`, the result's; NaN where eager is NaN."""
    rule = POLICY[input_dtype or eager.dtype][quantity]
    scale = largest_finite(truth) if family_scale is None else family_scale
    eager_error = (eager.detach().double() - truth.detach().double()).abs()
    return rule.factor * eager_error + _floor(rule, eager.dtype, scale)


def _floor(rule: Tolerance, dtype: torch.dtype, scale: float) -> float:
    """floor_ulps x eps(dtype) x scale: the policy's absolute term."""
    return rule.floor_ulps * torch.finfo(dtype).eps * scale


def assert_within_tolerance(quantity: str, actual, truth, eager, **options) -> Verdict:
    verdict = judge(quantity, actual, truth, eager, **options)
    assert verdict.ok, str(verdict)
    return verdict
