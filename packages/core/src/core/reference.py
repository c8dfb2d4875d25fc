"""Plain (non-fused) attention with exactly the semantics of `core.attention`.

This is the ground truth for the tests, the fuzzer and the numerics lab. It materialises the full
N x N score matrix, so it is for checking, not for speed.

Two uses, one function:
- `compute_dtype=torch.float64` (the default): inputs are upcast and every step runs in float64.
  This is what "the truth" means everywhere in this repository.
- `compute_dtype=None`: the *eager same-dtype reference*. Scores, probabilities and the output are
  rounded to the input dtype at each step, as a straightforward PyTorch implementation would do
  (FlashAttention's `attention_ref(upcast=False)`). Its error against float64 is the yardstick that
  the tolerance policy (`core.tolerance`) scales.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_reference", "visible_keys_mask"]


def visible_keys_mask(n_queries: int, n_keys: int, causal: bool, device=None) -> torch.Tensor:
    """Boolean (Nq, Nk) mask: True where query i may attend to key j.

    Causal masks are bottom-right aligned (FlashAttention's convention): query i sees key j iff
    j <= i + (Nk - Nq). When Nq > Nk the first Nq - Nk queries therefore see no key at all.
    """
    if not causal:
        return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    i = torch.arange(n_queries, device=device)[:, None]
    j = torch.arange(n_keys, device=device)[None, :]
    return j <= i + (n_keys - n_queries)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = torch.float64,
):
    """softmax(q k^T * sm_scale + mask) v, differentiable, for q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D).

    Returns the output in `compute_dtype` (or the input dtype when `compute_dtype` is None), and with
    `return_lse=True` also the natural-log logsumexp of the scaled, masked scores, shape (B, Hq, Nq).
    A query row that sees no key gets output 0 and LSE -inf, with zero (never NaN) gradients.
    """
    dtype = q.dtype if compute_dtype is None else compute_dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # GQA/MQA: query head h reads key/value head h // group
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)

    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    visible = visible_keys_mask(q.shape[2], k.shape[2], causal, device=q.device)
    row_sees_a_key = visible.any(dim=-1, keepdim=True)
    # Empty rows are softmaxed over zeros and then multiplied by an all-False mask: the output and
    # every gradient through them is exactly 0 instead of NaN from softmax over all -inf.
    scores = scores.masked_fill(~visible, float("-inf"))
    scores = torch.where(row_sees_a_key, scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1) * visible
    out = torch.matmul(probs, v)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores.float() if dtype != torch.float64 else scores, dim=-1)
    lse = torch.where(row_sees_a_key.squeeze(-1), lse, torch.full_like(lse, float("-inf")))
    return out, lse
