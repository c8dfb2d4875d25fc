"""Host launchers: allocate outputs, pick tile shapes, launch the kernels. No validation here
(`core._validation` runs first) and no copies of the inputs: every kernel takes strides.
"""

from __future__ import annotations

import functools
import math

import torch

from core import _config
from core._bwd_kernel import backward_dkdv_kernel, backward_dq_kernel, backward_preprocess_kernel
from core._fwd_kernel import attention_forward_kernel
from core._launch_cache import CachedKernel
from core._runtime import install_scratch_allocator, is_interpreted, patch_interpreter

LOG2E = math.log2(math.e)

# Every launch goes through these: a repeated (shape, stride, alignment) skips Triton's argument binding.
FORWARD = CachedKernel(attention_forward_kernel)
PREPROCESS = CachedKernel(backward_preprocess_kernel)
DKDV = CachedKernel(backward_dkdv_kernel)
DQ = CachedKernel(backward_dq_kernel)


def _ceil_div(a: int, b: int) -> int:
    """Grid sizes. Plain Python: triton.cdiv is a constexpr_function in triton >= 3.9, whose wrapper
    cost ~8 us of host time per call (measured on the CPU machine)."""
    return -(-a // b)


def new_buffer(like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Uninitialised kernel output on `like`'s device.

    Without `shape`: the layout of `like` (its strides when it is dense, else contiguous). With `shape`:
    a contiguous float32 buffer (LSE, Delta). Every kernel output is allocated here, so the tests can
    poison them all (NaN-fill) by patching this one function.
    """
    if shape is None:
        return torch.empty_like(like)
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def _or_unused(optional: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel never reads (dLSE when the LSE was not used) still needs a tensor."""
    return stand_in if optional is None else optional


def uses_base_2(dtype: torch.dtype) -> bool:
    """Whether the kernels work in base 2 for this input dtype (fp16/bf16: the scale folded into exp2) or
    in natural base (float32: one rounding fewer per logit, see core._fwd_kernel). The LSE that the
    forward saves and the backward reads is in this base."""
    return dtype != torch.float32


def score_scale(dtype: torch.dtype, sm_scale: float) -> float:
    """The kernels' qk_scale: sm_scale * log2(e) in base 2, sm_scale itself in natural base."""
    return sm_scale * LOG2E if uses_base_2(dtype) else sm_scale


@functools.cache
def _precision_flags(dtype: torch.dtype, interpreted: bool) -> tuple:
    """float32 inputs get float32 arithmetic throughout: full-precision dots ("ieee", not TF32), natural
    base, and libdevice's exp/log instead of the hardware approximations. fp16/bf16 ignore DOT_PRECISION
    (their dots are exact products summed in fp32) and keep the fast exp2. The interpreter's exp is
    numpy's, which is already precise (and it has no libdevice)."""
    full_fp32 = dtype == torch.float32
    return (
        ("DOT_PRECISION", "ieee" if full_fp32 else "tf32"),
        ("BASE_2", uses_base_2(dtype)),
        ("PRECISE_EXP", full_fp32 and not interpreted),
    )


def descriptors_fit(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may read these (B, H, N, D) tensors through tensor descriptors (the copy
    engine, TMA): unit stride along D, and 16-byte aligned start, batch, head and row steps, with rows
    that do not overlap. Any other layout is read with pointer loads, which take every stride."""
    for t in tensors:
        size = t.element_size()
        batch_stride, head_stride, row_stride, d_stride = t.stride()
        if d_stride != 1 or t.data_ptr() % 16 or (t.shape[-1] * size) % 16 or row_stride < t.shape[-1]:
            return False
        if (batch_stride * size) % 16 or (head_stride * size) % 16 or (row_stride * size) % 16:
            return False
    return True


@functools.cache
def _attention_meta(
    head_dim: int, causal: bool, block_d: int, config, dtype, interpreted: bool, descriptors: bool
):
    """(constexprs, options) of the forward, dK/dV and dQ kernels, which share their constexpr list, in
    signature order (core._launch_cache passes constexprs by position). Cached: built once per shape."""
    constexprs = (
        ("HEAD_DIM", head_dim), ("CAUSAL", causal),
        ("BLOCK_M", config.block_m), ("BLOCK_N", config.block_n), ("BLOCK_D", block_d),
        *_precision_flags(dtype, interpreted),
        ("TENSOR_DESCRIPTORS", descriptors),
    )  # fmt: skip
    return constexprs, (("num_warps", config.num_warps), ("num_stages", config.num_stages))


def _use_descriptors(config: _config.KernelConfig, interpreted: bool, *tensors: torch.Tensor) -> bool:
    """Tensor descriptors where the table asks for them and the layout allows (descriptors_fit); the
    scratch memory the kernels build them in comes from core's allocator unless the caller set one."""
    if not (config.descriptors and descriptors_fit(*tensors)):
        return False
    if not interpreted:
        install_scratch_allocator()
    return True


def _prepare_launch(q: torch.Tensor):
    interpreted = is_interpreted()
    if interpreted:
        patch_interpreter()
    return interpreted, _config.padded_head_dim(q.shape[-1])


def attention_forward(q, k, v, causal: bool, sm_scale: float, config: _config.KernelConfig | None = None):
    """Returns (out, lse, lse_low): out like q; lse (B, Hq, Nq) float32 contiguous, the log-sum-exp of
    the scaled scores in the kernels' base (`uses_base_2`: natural LSE = lse * ln 2 in base 2); lse_low
    its low parts for the backward, (1, B, Hq, Nq) for fp16/bf16 and (2, B, Hq, Nq) for float32, whose
    second plane is the row max's low part (core._fwd_kernel)."""
    batch, q_heads, n_queries, head_dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    interpreted, block_d = _prepare_launch(q)
    config = config or _config.forward_config(block_d, q.dtype, interpreted)
    out = new_buffer(q)
    lse = new_buffer(q, (batch, q_heads, n_queries))
    lse_low = new_buffer(q, (2 if q.dtype == torch.float32 else 1, *lse.shape))
    FORWARD.launch(
        (_ceil_div(n_queries, config.block_m), q_heads, batch),
        (q, k, v, out, lse, lse_low),
        (*q.stride(), *k.stride(), *v.stride(), *out.stride(), q_heads, q_heads // kv_heads, n_queries,
         n_keys),
        (score_scale(q.dtype, sm_scale),),
        *_attention_meta(head_dim, causal, block_d, config, q.dtype, interpreted,
                         _use_descriptors(config, interpreted, k, v)),
    )  # fmt: skip
    return out, lse, lse_low


def attention_backward(dout, dlse, q, k, v, out, lse, lse_low, causal: bool, sm_scale: float):
    """Returns (dq, dk, dv), each laid out like its input. lse is attention_forward's LSE (in the
    kernels' base) and dlse its gradient, or None when the LSE was not used; lse_low is the forward's."""
    batch, q_heads, n_queries, head_dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    interpreted, block_d = _prepare_launch(q)
    dkdv_config, dq_config = _config.backward_configs(block_d, q.dtype, interpreted)

    dot_precision, base_2, _ = _precision_flags(q.dtype, interpreted)

    # float32 saves Delta in two parts (core._bwd_kernel.backward_dq_kernel), like the LSE's low parts.
    delta = new_buffer(q, (2 if q.dtype == torch.float32 else 1, *lse.shape))
    rows_per_program = _config.preprocess_block_m(interpreted)
    PREPROCESS.launch(
        (_ceil_div(n_queries, rows_per_program), q_heads, batch),
        (out, dout, _or_unused(dlse, lse), delta),
        (*out.stride(), *dout.stride(), q_heads, n_queries),
        (),
        (("HEAD_DIM", head_dim), ("HAS_DLSE", dlse is not None), base_2, dot_precision,
         ("BLOCK_M", rows_per_program), ("BLOCK_D", block_d)),
        (),
    )  # fmt: skip

    dq, dk, dv = new_buffer(q), new_buffer(k), new_buffer(v)
    sizes = (q_heads, q_heads // kv_heads, n_queries, n_keys)
    scales = (sm_scale, score_scale(q.dtype, sm_scale))
    input_strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    # dQ first: for float32 it completes Delta, which the dK/dV kernel reads (core._bwd_kernel).
    DQ.launch(
        (_ceil_div(n_queries, dq_config.block_m), q_heads, batch),
        (q, k, v, dout, lse, lse_low, delta, dq),
        (*input_strides, *dq.stride(), *sizes),
        scales,
        *_attention_meta(head_dim, causal, block_d, dq_config, q.dtype, interpreted,
                         _use_descriptors(dq_config, interpreted, k, v)),
    )  # fmt: skip
    DKDV.launch(
        (_ceil_div(n_keys, dkdv_config.block_n), kv_heads, batch),
        (q, k, v, dout, lse, lse_low, delta, dk, dv),
        (*input_strides, *dk.stride(), *dv.stride(), *sizes),
        scales,
        *_attention_meta(head_dim, causal, block_d, dkdv_config, q.dtype, interpreted,
                         _use_descriptors(dkdv_config, interpreted, q, dout)),
    )  # fmt: skip
    return dq, dk, dv
