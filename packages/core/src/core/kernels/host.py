"""Host-side conventions every kernel family follows: what a call asks beyond plain attention (Features,
Packed), how outputs are allocated, the base of the LSE the forward saves for the backward, grid
arithmetic, the GPU's size, and launching on the inputs' device."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class Features:
    """What a call asks of the kernels beyond causal or full attention, part of core.kernels' contract.

    window_left, window_right: FlashAttention's window_size after its causal rule. Query i sees key j iff
    i + Nk - Nq - window_left <= j <= i + Nk - Nq + window_right, -1 leaving that side unbounded; a causal
    call's right side is 0, which its causal flag already says, so a causal call keeps window_right -1
    unless it has a left bound too (then it is (left, 0)). softcap: each scaled score s becomes
    softcap * tanh(s / softcap) before the softmax (0: off). varlen: q, k, v are packed sequences
    (total, H, D), described per call by a Packed.
    """

    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    varlen: bool = False

    @staticmethod
    def of(causal: bool, window_size=(-1, -1), softcap: float = 0.0, varlen: bool = False) -> Features:
        """The features of a validated call, in the normal form above."""
        left, right = (int(side) for side in window_size)
        if causal:
            right = 0 if left >= 0 else -1
        return Features(left, right, float(softcap), varlen)

    @property
    def windowed(self) -> bool:
        """Whether the window bounds a side that the causal flag does not."""
        return self.window_left >= 0 or self.window_right >= 0


PLAIN = Features()


class Packed(NamedTuple):
    """The sequences of one varlen call: cumulative lengths (int32, (B + 1,), on the inputs' device, never
    read on the host) and upper bounds of the longest query and key sequence, which size the grid."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


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


@functools.cache
def multiprocessors(device: torch.device) -> int | None:
    """The GPU's SM count, for grids sized to the card (cached: the query costs host time); None off a
    GPU (the interpreter, or the compile probe's plans over CPU tensors, which launch nothing)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


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
