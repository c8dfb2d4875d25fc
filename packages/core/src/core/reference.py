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

__all__ = ["attention_reference", "attention_with_kvcache_reference", "visible_keys_mask"]


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


def attention_with_kvcache_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: torch.Tensor | int,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    causal: bool = True,
    sm_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = torch.float64,
):
    """`core.attention_with_kvcache`'s semantics, plainly: each sequence's cached keys and values are
    gathered (dense rows or pages), the new k, v appended after them (here in a copy: the cache is not
    written), and the sequence attended to on its own. Reads cache_seqlens on the host.

    Query i of sequence b, with Nk_b keys (cached + new) and d = Nk_b - Nq, sees key j iff (causal)
    j <= i + d, (window_size[0] >= 0) j >= i + d - window_size[0] and (window_size[1] >= 0)
    j <= i + d + window_size[1]; softcap > 0 replaces each scaled score s by softcap * tanh(s / softcap).
    Returns out (B, Hq, Nq, D) in `compute_dtype` (the input dtype when None, rounding at every step as
    attention_reference does), and with return_lse the natural-log LSE (B, Hq, Nq).
    """
    dtype = q.dtype if compute_dtype is None else compute_dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    batch, _, n_queries, _ = q.shape
    lengths = (
        cache_seqlens.tolist() if isinstance(cache_seqlens, torch.Tensor) else [int(cache_seqlens)] * batch
    )
    outs, lses = [], []
    for b, n_cached in enumerate(lengths):
        keys, values = (
            _cached_rows(cache, b, n_cached, block_table, cache_batch_idx) for cache in (k_cache, v_cache)
        )
        if k is not None:
            keys, values = torch.cat([keys, k[b]], dim=1), torch.cat([values, v[b]], dim=1)
        visible = _kvcache_visible_keys(n_queries, keys.shape[1], causal, window_size, q.device)
        out, lse = _masked_attention(
            q[b].to(dtype), keys.to(dtype), values.to(dtype), visible, scale, softcap
        )
        outs.append(out)
        lses.append(lse)
    out = torch.stack(outs)
    return (out, torch.stack(lses)) if return_lse else out


def _cached_rows(cache, b, n_cached, block_table, cache_batch_idx) -> torch.Tensor:
    """(Hkv, n_cached, D): the first n_cached keys (or values) of sequence b in a dense or paged cache."""
    if block_table is None:
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        return cache[row, :, :n_cached]
    positions = torch.arange(n_cached, device=cache.device)
    page_size = cache.shape[2]
    pages = block_table[b].to(cache.device).long()[positions // page_size]
    return cache[pages, :, positions % page_size].transpose(0, 1)


def _kvcache_visible_keys(n_queries, n_keys, causal, window_size, device) -> torch.Tensor:
    """(Nq, Nk) bool: the bottom-right causal mask and FlashAttention's local window."""
    i = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)
    j = torch.arange(n_keys, device=device)[None, :]
    visible = visible_keys_mask(n_queries, n_keys, causal, device=device)
    left, right = window_size
    if left >= 0:
        visible = visible & (j >= i - left)
    if right >= 0:
        visible = visible & (j <= i + right)
    return visible


def _masked_attention(q, k, v, visible, scale, softcap):
    """(out, natural LSE) of one sequence: q (Hq, Nq, D), k/v (Hkv, Nk, D), visible (Nq, Nk). Steps in
    q's dtype, as attention_reference takes them; rows that see no key give 0 and -inf."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    row_sees_a_key = visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf"))
    scores = torch.where(row_sees_a_key, scores, torch.zeros_like(scores))
    out = torch.matmul(torch.softmax(scores, dim=-1) * visible, v)
    lse = torch.logsumexp(scores.float() if q.dtype != torch.float64 else scores, dim=-1)
    return out, torch.where(row_sees_a_key.squeeze(-1), lse, torch.full_like(lse, float("-inf")))
