"""The autograd Function binding the forward and backward plans (core._launch)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class FlashAttentionFunction(torch.autograd.Function):
    """(q, k, v) -> (out, lse), lse the log-sum-exp the kernels share, in their base
    (core._launch.uses_base_2). `plan` is the call's core._launch.ForwardPlan. Both outputs are
    differentiable; double backward is not supported."""

    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse, lse_low = plan(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse, lse_low)
        ctx.plan = plan
        # Unused outputs arrive in backward as None instead of materialised zero tensors.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, lse_low = ctx.saved_tensors
        if dout is None:  # only the LSE was used: dO = 0 leaves just the LSE term
            dout = torch.zeros_like(out)
        if dlse is not None:
            # The preprocess kernel reads dLSE as a contiguous (B, Hq, Nq) float32 vector; autograd may hand
            # it over in any layout (e.g. from lse.transpose(1, 2)). It is one float per row: copy it.
            dlse = dlse.contiguous()
        backward = ctx.plan.backward_plan(dout, dlse, q, k, v)
        dq, dk, dv = backward(dout, dlse, q, k, v, out, lse, lse_low)
        return dq, dk, dv, None
