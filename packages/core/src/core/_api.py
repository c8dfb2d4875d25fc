"""The public entry point, `core.attention`."""

from __future__ import annotations

import math

import torch

from core._autograd import FlashAttentionFunction
from core._launch import uses_base_2
from core._plans import forward_plan


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    return_lse: bool = False,
):
    """Scaled dot-product attention, fused: softmax(q k^T * sm_scale + mask) v.

    Args:
        q: (B, Hq, Nq, D) query. k, v: (B, Hkv, Nk, D) keys and values, with Hq a multiple of Hkv
            (GQA/MQA: query head h uses key/value head h // (Hq // Hkv); k and v are never repeated).
            float16, bfloat16 or float32, all the same dtype, on one CUDA device (or CPU under
            TRITON_INTERPRET=1), which need not be the current one. Any strides: BSHD views such as
            x.view(B, N, H, D).transpose(1, 2) and sliced views are read in place, never copied.
            1 <= D <= 256, any Nq, Nk >= 1.
        causal: mask key j for query i unless j <= i + (Nk - Nq) (bottom-right aligned, as in
            FlashAttention). Rows that see no key output 0 with LSE -inf and zero gradients.
        sm_scale: the softmax scale; defaults to 1 / sqrt(D).
        return_lse: also return the log-sum-exp of each row's scaled, masked scores.

    Returns:
        out with q's shape and dtype (q's strides when q is dense, else contiguous), or (out, lse) with
        lse (B, Hq, Nq) float32 in natural log. Both are differentiable; the backward pass is
        deterministic (no atomics) and uses O(N) memory.

    The checks and launch parameters of a call are kept per call signature (core._plans), so a
    repeated call with the same shapes, strides, dtypes and options only allocates and launches.
    """
    plan = forward_plan(q, k, v, causal, sm_scale, return_lse)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = FlashAttentionFunction.apply(q, k, v, plan)
    else:  # no graph to record: skip the autograd Function's ~10 us of host time
        out, lse, _ = plan(q, k, v, keep_statistics=return_lse)
    if not return_lse:
        return out
    return out, (lse * math.log(2.0) if uses_base_2(q.dtype) else lse)
