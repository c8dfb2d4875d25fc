"""The autograd Function binding the forward and backward launchers."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from core._launch import attention_backward, attention_forward


class FlashAttentionFunction(torch.autograd.Function):
    """(q, k, v) -> (out, lse2), lse2 the base-2 log-sum-exp the kernels share. Both outputs are
    differentiable; double backward is not supported."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float):
        out, lse2 = attention_forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        # Unused outputs arrive in backward as None instead of materialised zero tensors.
        ctx.set_materialize_grads(False)
        return out, lse2

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse2):
        q, k, v, out, lse2 = ctx.saved_tensors
        if dout is None:  # only the LSE was used: dO = 0 leaves just the LSE term
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward(dout, dlse2, q, k, v, out, lse2, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None
