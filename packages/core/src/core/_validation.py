"""Every check on the inputs of `core.attention`, run before anything is launched.

Each message says what was wrong and what is accepted.
"""

from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# CUDA limits grid dimensions y and z (heads, batch) to 65535 programs.
MAX_GRID_YZ = 65535
# The kernels take the scale as a float32, with log2(e) folded in for fp16/bf16
# (core.kernels.host.score_scale): beyond this it is inf, and even a zero logit would come out NaN.
# One limit for every dtype.
MAX_SM_SCALE = torch.finfo(torch.float32).max / math.log2(math.e)  # 2.36e38


def validate_attention_inputs(q, k, v, causal, sm_scale, return_lse, interpreted: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.is_nested or t.layout != torch.strided:
            kind = "nested" if t.is_nested else str(t.layout)
            raise TypeError(f"{name} is a {kind} tensor; core.attention accepts strided (dense) tensors")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}"
            )
    _validate_dtypes(q, k, v)
    _validate_devices(q, k, v, interpreted)
    _validate_shapes(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    _validate_sm_scale(sm_scale)


def _validate_dtypes(q, k, v) -> None:
    accepted = "float16, bfloat16 or float32"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            hint = " (for float64 use core.attention_reference)" if t.dtype == torch.float64 else ""
            raise TypeError(f"{name} has dtype {t.dtype}; core.attention accepts {accepted}{hint}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first "
            "(core.attention never casts silently)"
        )


def _validate_devices(q, k, v, interpreted: bool) -> None:
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type == "cuda" or (interpreted and q.device.type == "cpu"):
        return
    if q.device.type == "cpu":
        raise ValueError(
            "q, k and v are CPU tensors but core's kernels were compiled for the GPU. To run on the CPU "
            "(slowly, for testing), set TRITON_INTERPRET=1 in the environment before importing core."
        )
    raise ValueError(
        f"unsupported device {q.device}; core.attention runs on CUDA (or CPU with TRITON_INTERPRET=1)"
    )


def _validate_shapes(q, k, v) -> None:
    batch, q_heads, n_queries, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (B, Hkv, Nk, D), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    k_batch, kv_heads, n_keys, k_head_dim = k.shape
    if k_batch != batch:
        raise ValueError(f"batch size differs: q has {batch}, k and v have {k_batch}")
    if k_head_dim != head_dim:
        raise ValueError(f"head dim differs: q has {head_dim}, k and v have {k_head_dim}")
    for what, size in (("batch", batch), ("heads", q_heads), ("kv heads", kv_heads), ("Nq", n_queries),
                       ("Nk", n_keys), ("head dim", head_dim)):  # fmt: skip
        if size == 0:
            raise ValueError(f"{what} is 0; every dimension of q, k and v must be >= 1")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"head dim {head_dim} is larger than the supported maximum {MAX_HEAD_DIM} (1..256 accepted)"
        )
    if q_heads % kv_heads != 0:
        raise ValueError(
            f"q has {q_heads} heads, which is not a multiple of k/v's {kv_heads} heads; "
            "GQA/MQA needs Hq % Hkv == 0"
        )
    if q_heads > MAX_GRID_YZ or batch > MAX_GRID_YZ:
        raise ValueError(f"batch ({batch}) and heads ({q_heads}) must each be at most {MAX_GRID_YZ}")


def _validate_sm_scale(sm_scale) -> None:
    if sm_scale is None:
        return
    if isinstance(sm_scale, torch.Tensor):
        raise TypeError(
            "sm_scale must be a Python number, not a tensor: core.attention does not differentiate "
            "with respect to the scale (pass float(scale))"
        )
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise TypeError(f"sm_scale must be a real number or None, got {type(sm_scale).__name__}")
    try:
        as_float = float(sm_scale)
    except OverflowError:  # an int beyond float's range
        as_float = math.inf
    if not math.isfinite(as_float):
        raise ValueError(f"sm_scale must be finite, got {sm_scale!r:.40}")
    if abs(as_float) > MAX_SM_SCALE:
        raise ValueError(
            f"|sm_scale| must be at most {MAX_SM_SCALE:.4g} (the kernels compute in float32 with log2(e) "
            f"folded into the scale), got {sm_scale}"
        )
