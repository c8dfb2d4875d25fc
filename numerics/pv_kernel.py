"""A minimal flash-attention forward kernel whose P.V arithmetic can be switched, for E9's GPU timings.

It is not core's kernel and is never used outside the lab: non-causal only, contiguous (B, H, N, D)
tensors, N a multiple of both tiles, D a power of two. Its loop is core's (fp32 dot scaled into base 2,
fp32 running max and Kahan-compensated running sum, exp2, P cast before the tensor-core P.V dot), so that
switching one thing at a time measures that thing's cost. The switches:

- COMPENSATED: P = hi + lo, both in the P.V dtype (lo = P - hi, rounded), and a second dot for lo, so
  that the P.V product sees P to twice the precision, for one more dot per key block.
- SUM_ROUNDED: the running sum l adds the rounded P that multiplies V (hi + lo when compensated)
  instead of the unrounded fp32 p, so that the weights applied to V sum exactly to l.
- P_FP16: with bf16 inputs, cast P to fp16 (3 more significand bits; P is in [0, 1]) and convert the V
  tile to fp16 for the dot, exact for |v| in fp16's range.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["VARIANTS", "attention"]

LOG2E = math.log2(math.e)

# name -> (COMPENSATED, SUM_ROUNDED, P_FP16)
VARIANTS = {
    "P cast to input dtype (core's)": (False, False, False),
    "l sums the rounded P": (False, True, False),
    "compensated P.V (hi + lo)": (True, False, False),
    "compensated P.V + l sums it": (True, True, False),
    "P in fp16 (bf16 inputs)": (False, False, True),
    "P in fp16 + l sums it (bf16 inputs)": (False, True, True),
}


@triton.jit
def _forward(
    Q, K, V, Out, n, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPENSATED: tl.constexpr, SUM_ROUNDED: tl.constexpr, P_FP16: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = tl.program_id(1).to(tl.int64) * n * HEAD_DIM
    q = tl.load(Q + base + rows[:, None] * HEAD_DIM + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_comp = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        keys = start + offs_n
        kT = tl.load(K + base + keys[None, :] * HEAD_DIM + offs_d[:, None])
        v = tl.load(V + base + keys[:, None] * HEAD_DIM + offs_d[None, :])
        scores = tl.dot(q, kT) * qk_scale
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        if P_FP16:
            v = v.to(tl.float16)
        p_hi = p.to(v.dtype)
        in_dot = p_hi.to(tl.float32)
        if COMPENSATED:
            p_lo = (p - in_dot).to(v.dtype)
            in_dot += p_lo.to(tl.float32)
        if SUM_ROUNDED:
            row_sum = tl.sum(in_dot, 1)
        else:
            row_sum = tl.sum(p, 1)
        # Kahan-compensated, in core's order of operations.
        l_i = l_i * alpha
        l_comp = l_comp * alpha
        row_sum = row_sum - l_comp
        l_new = l_i + row_sum
        l_comp = (l_new - l_i) - row_sum
        l_i = l_new
        acc = acc * alpha[:, None]
        acc = tl.dot(p_hi, v, acc)
        if COMPENSATED:
            acc = tl.dot(p_lo, v, acc)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + base + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty))


def attention(
    q, k, v, variant: str, block_m: int = 128, block_n: int = 64, num_warps: int = 8, num_stages: int = 3
):
    """softmax(q k^T / sqrt(D)) v for contiguous (B, H, N, D) fp16/bf16 tensors, with one P.V variant."""
    batch, heads, n, head_dim = q.shape
    if n % block_m or n % block_n:
        raise ValueError(f"N={n} must be a multiple of the tiles {block_m} x {block_n}")
    q, k, v = (x.contiguous() for x in (q, k, v))
    from core.testing import is_interpreted, patch_interpreter

    if is_interpreted():  # the interpreter's bf16 casts and all its dots, made the GPU's (as core does)
        patch_interpreter()
    out = torch.empty_like(q)
    compensated, sum_rounded, p_fp16 = VARIANTS[variant]
    _forward[(n // block_m, batch * heads)](
        q, k, v, out, n, (1.0 / math.sqrt(head_dim)) * LOG2E,  # as core: sm_scale * log2(e)
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        COMPENSATED=compensated, SUM_ROUNDED=sum_rounded, P_FP16=p_fp16,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
