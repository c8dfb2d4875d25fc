"""Host launchers: allocate outputs, pick tile shapes, launch the kernels. No validation here
(`core._validation` runs first) and no copies of the inputs: every kernel takes strides.
"""

from __future__ import annotations

import math

import torch
import triton

from core import _config
from core._bwd_kernel import backward_dkdv_kernel, backward_dq_kernel, backward_preprocess_kernel
from core._fwd_kernel import attention_forward_kernel
from core._runtime import is_interpreted, patch_interpreter_bf16

LOG2E = math.log2(math.e)


def new_buffer(like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Uninitialised kernel output on `like`'s device.

    Without `shape`: the layout of `like` (its strides when it is dense, else contiguous). With `shape`:
    a contiguous float32 buffer (LSE, Delta). Every kernel output is allocated here, so the tests can
    poison them all (NaN-fill) by patching this one function.
    """
    if shape is None:
        return torch.empty_like(like)
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def _precision_flags(dtype: torch.dtype, interpreted: bool) -> dict:
    """float32 inputs get float32 arithmetic throughout: full-precision dots ("ieee", not TF32) and
    libdevice's exp2 instead of the hardware approximation. fp16/bf16 ignore DOT_PRECISION (their dots
    are exact products summed in fp32) and keep the fast exp2. The interpreter's exp2 is numpy's, which
    is already precise (and it has no libdevice)."""
    full_fp32 = dtype == torch.float32
    return dict(DOT_PRECISION="ieee" if full_fp32 else "tf32", PRECISE_EXP2=full_fp32 and not interpreted)


def _prepare_launch(q: torch.Tensor):
    interpreted = is_interpreted()
    if interpreted and q.dtype == torch.bfloat16:
        patch_interpreter_bf16()
    return interpreted, _config.padded_head_dim(q.shape[-1])


def attention_forward(q, k, v, causal: bool, sm_scale: float, config: _config.KernelConfig | None = None):
    """Returns (out, lse2): out like q; lse2 (B, Hq, Nq) float32 contiguous, the log-sum-exp in base 2
    of the base-2 scores S * sm_scale * log2(e) (natural LSE = lse2 * ln 2)."""
    batch, q_heads, n_queries, head_dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    interpreted, block_d = _prepare_launch(q)
    config = config or _config.forward_config(block_d, q.dtype, interpreted)
    out = new_buffer(q)
    lse = new_buffer(q, (batch, q_heads, n_queries))
    grid = (triton.cdiv(n_queries, config.block_m), q_heads, batch)
    attention_forward_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        q_heads, q_heads // kv_heads, n_queries, n_keys, sm_scale * LOG2E,
        HEAD_DIM=head_dim, CAUSAL=causal,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d,
        num_warps=config.num_warps, num_stages=config.num_stages, **_precision_flags(q.dtype, interpreted),
    )  # fmt: skip
    return out, lse


def attention_backward(dout, dlse2, q, k, v, out, lse2, causal: bool, sm_scale: float):
    """Returns (dq, dk, dv), each laid out like its input. lse2 is attention_forward's base-2 LSE and
    dlse2 its gradient, or None when the LSE was not used."""
    batch, q_heads, n_queries, head_dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    interpreted, block_d = _prepare_launch(q)
    dkdv_config, dq_config = _config.backward_configs(block_d, q.dtype, interpreted)

    delta = new_buffer(q, lse2.shape)
    rows_per_program = _config.preprocess_block_m(interpreted)
    backward_preprocess_kernel[(triton.cdiv(n_queries, rows_per_program), q_heads, batch)](
        out, dout, dlse2 if dlse2 is not None else lse2, delta,
        *out.stride(), *dout.stride(), q_heads, n_queries,
        HEAD_DIM=head_dim, HAS_DLSE=dlse2 is not None, BLOCK_M=rows_per_program, BLOCK_D=block_d,
    )  # fmt: skip

    dq, dk, dv = new_buffer(q), new_buffer(k), new_buffer(v)
    common = dict(HEAD_DIM=head_dim, CAUSAL=causal, BLOCK_D=block_d, **_precision_flags(q.dtype, interpreted))
    backward_dkdv_kernel[(triton.cdiv(n_keys, dkdv_config.block_n), kv_heads, batch)](
        q, k, v, dout, lse2, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        q_heads, q_heads // kv_heads, n_queries, n_keys, sm_scale, sm_scale * LOG2E,
        BLOCK_M=dkdv_config.block_m, BLOCK_N=dkdv_config.block_n,
        num_warps=dkdv_config.num_warps, num_stages=dkdv_config.num_stages, **common,
    )  # fmt: skip
    backward_dq_kernel[(triton.cdiv(n_queries, dq_config.block_m), q_heads, batch)](
        q, k, v, dout, lse2, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        q_heads, q_heads // kv_heads, n_queries, n_keys, sm_scale, sm_scale * LOG2E,
        BLOCK_M=dq_config.block_m, BLOCK_N=dq_config.block_n,
        num_warps=dq_config.num_warps, num_stages=dq_config.num_stages, **common,
    )  # fmt: skip
    return dq, dk, dv
