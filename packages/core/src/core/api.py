"""The public entry point, `core.attention`: validate, then run the registered ops (core.ops).

Two routes reach the same kernels. While torch.compile traces, the call validates its (fake) inputs
and records `torch.ops.core.attention_forward`, whose autograd records the backward op. In eager mode
a call that needs no graph skips the dispatcher: it takes its cached plan (core._plans) straight to the
kernels, which saves the op's dispatch and autograd bookkeeping on small, host-bound calls.
"""

from __future__ import annotations

import math

import torch

from core import _plans, ops
from core._runtime import is_interpreted
from core._validation import validate_attention_inputs
from core.kernels.host import uses_base_2

# Read once here: the interpreter decision is made when the kernels are imported, and a traced call
# should see a constant rather than trace into the cached lookup.
_INTERPRETED = is_interpreted()


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
        deterministic (no atomics) and uses O(N) memory. Traceable by torch.compile (fullgraph, static
        or dynamic shapes) and capturable in CUDA graphs.
    """
    if torch.compiler.is_compiling():
        validate_attention_inputs(q, k, v, causal, sm_scale, return_lse, _INTERPRETED)
        out, lse, _ = ops.attention_forward(q, k, v, causal, _plans.default_scale(q, sm_scale))
    else:
        plan = _plans.forward_plan(q, k, v, causal, sm_scale, return_lse)  # validates a new signature
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse, _ = ops.attention_forward(q, k, v, causal, plan.sm_scale)
        else:
            out, lse, _ = plan(q, k, v, keep_statistics=return_lse)
    if not return_lse:
        return out
    return out, (lse * math.log(2.0) if uses_base_2(q.dtype) else lse)
