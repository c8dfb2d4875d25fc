"""The non-fused attentions our kernel is compared with.

`standard_attention` is written out step by step on purpose: with `compute_dtype=None` the scores S and
the probabilities P are each rounded to the input dtype, which is the "standard attention in FP16" of
FlashAttention-3's Table 3 (and core.attention_reference(compute_dtype=None)). SDPA's MATH backend is
*not* that baseline: it upcasts fp16/bf16 to fp32 inside (unless told otherwise), so it measures the
fp32-inside floor instead; `standard_attention(compute_dtype=torch.float32)` is its CPU stand-in.
"""

from __future__ import annotations

import math

import torch

from core.reference import visible_keys_mask

__all__ = ["SDPA_BACKENDS", "sdpa", "standard_attention"]


def standard_attention(q, k, v, *, causal: bool = False, sm_scale=None, compute_dtype=None) -> torch.Tensor:
    """softmax(q k^T * scale) v with S and P stored in `compute_dtype` (default: q's dtype); output in q's
    dtype. One (batch, head) at a time so that the N x N matrices of a 16k sequence fit on the GPU."""
    dtype = compute_dtype or q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    group = q.shape[1] // k.shape[1]
    mask = visible_keys_mask(q.shape[2], k.shape[2], causal, device=q.device)
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qh, kh, vh = q[b, h].to(dtype), k[b, h // group].to(dtype), v[b, h // group].to(dtype)
            scores = torch.matmul(qh, kh.transpose(0, 1)) * scale  # S, rounded to dtype
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # P, rounded to dtype
            out[b, h] = torch.matmul(probs, vh).to(q.dtype)
    return out


SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def sdpa(q, k, v, backend: str, *, causal: bool = False) -> torch.Tensor | None:
    """torch's scaled_dot_product_attention forced onto one backend; None where it cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    except (RuntimeError, AttributeError):
        return None
