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
- floor: 1 ulp of the largest true value. The output is finally rounded to its dtype, so half an ulp of
  error is unavoidable even for a perfect kernel; where the eager reference happens to be exact (a single
  key, say) the floor alone must cover that last rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["POLICY", "Tolerance", "Verdict", "assert_within_tolerance", "judge"]


@dataclass(frozen=True)
class Tolerance:
    factor: float
    floor_ulps: float


POLICY: dict[str, Tolerance] = {
    "out": Tolerance(factor=2.0, floor_ulps=1.0),
    "lse": Tolerance(factor=2.0, floor_ulps=1.0),
    "dq": Tolerance(factor=3.0, floor_ulps=1.0),
    "dk": Tolerance(factor=3.0, floor_ulps=1.0),
    "dv": Tolerance(factor=3.0, floor_ulps=1.0),
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
    actual, truth = actual.detach().double().cpu(), truth.detach().double().cpu()
    diff = (actual - truth).abs()
    # Matching infinities (LSE -inf of rows that see no key) are exact agreement, not NaN.
    same_inf = torch.isinf(actual) & torch.isinf(truth) & (actual == truth)
    diff = torch.where(same_inf, torch.zeros_like(diff), diff)
    if diff.numel() == 0:
        return 0.0
    if torch.isnan(diff).any():
        return float("nan")
    return diff.max().item()


def judge(quantity: str, actual: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor, dtype=None) -> Verdict:
    """Measure `actual` (kernel) and `eager` (same-dtype reference) against the float64 `truth`.

    `dtype` is the dtype whose epsilon sets the floor; it defaults to `actual.dtype` (float32 for LSE).
    """
    rule = POLICY[quantity]
    eps = torch.finfo(dtype or actual.dtype).eps
    finite_truth = truth.detach().double().abs()
    finite_truth = finite_truth[torch.isfinite(finite_truth)]
    scale = finite_truth.max().item() if finite_truth.numel() else 0.0
    eager_error = _max_abs_error(eager, truth)
    floor = rule.floor_ulps * eps * scale
    return Verdict(quantity, _max_abs_error(actual, truth), eager_error, rule.factor * eager_error + floor)


def assert_within_tolerance(quantity: str, actual, truth, eager, dtype=None) -> Verdict:
    verdict = judge(quantity, actual, truth, eager, dtype)
    assert verdict.ok, str(verdict)
    return verdict
