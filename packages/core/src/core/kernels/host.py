"""Host-side conventions every kernel family follows: how outputs are allocated, the base of the LSE the
forward saves for the backward, grid arithmetic, and launching on the inputs' device."""

from __future__ import annotations

import math

import torch

LOG2E = math.log2(math.e)


class OutputPoison:
    """NaN-fill every kernel output on allocation (core.testing.poisoned_outputs), so that an element a
    kernel forgot to write fails the test that reads it."""

    enabled: bool = False


def new_buffer(like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Uninitialised kernel output on `like`'s device. Every kernel output is allocated here.

    Without `shape`: the layout of `like` (its strides when it is dense, else contiguous: torch.empty_like's
    rule, which the ops' fake kernels use too). With `shape`: a contiguous float32 buffer (LSE, Delta).
    """
    buffer = torch.empty_like(like) if shape is None else like.new_empty(shape, dtype=torch.float32)
    if OutputPoison.enabled:
        buffer.fill_(float("nan"))
    return buffer


def layout_of_new_buffer(like: torch.Tensor) -> tuple[int, ...]:
    """The strides new_buffer(like) will have, without allocating."""
    return torch.empty_like(like, device="meta").stride()


def uses_base_2(dtype: torch.dtype) -> bool:
    """Whether the kernels work in base 2 for this input dtype (fp16/bf16: the scale folded into exp2) or
    in natural base (float32: one rounding fewer per logit, see core.kernels.portable.forward). The LSE
    that a forward saves and a backward reads is in this base, in every family."""
    return dtype != torch.float32


def score_scale(dtype: torch.dtype, sm_scale: float) -> float:
    """The kernels' qk_scale: sm_scale * log2(e) in base 2, sm_scale itself in natural base."""
    return sm_scale * LOG2E if uses_base_2(dtype) else sm_scale


def ceil_div(a: int, b: int) -> int:
    """Grid sizes. Plain Python: triton.cdiv is a constexpr_function in triton >= 3.9, whose wrapper
    costs host time on every call."""
    return -(-a // b)


class OnDevice:
    """Runs launches on the inputs' GPU: Triton launches on the current device, which need not be the
    tensors' (a process driving several GPUs). Checking costs a lookup; switching happens only then."""

    def __init__(self, like: torch.Tensor):
        self.index = like.device.index if like.device.type == "cuda" else None

    def on_device(self, run, *args):
        if self.index is not None and torch.cuda.current_device() != self.index:
            with torch.cuda.device(self.index):
                return run(*args)
        return run(*args)
