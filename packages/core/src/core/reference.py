"""Plain (non-fused) attention with exactly the semantics of `core.attention` and `core.attention_varlen`.

This is the ground truth for the tests, the fuzzer and the numerics lab. It materialises the full
N x N score matrix, so it is for checking, not for speed.

Two uses, one function:
- `compute_dtype=torch.float64` (the default): inputs are upcast and every step runs in float64.
  This is what "the truth" means everywhere in this repository.
- `compute_dtype=None`: the *eager same-dtype reference*. Scores, probabilities and the output are
  rounded to the input dtype at each step, as a straightforward PyTorch implementation would do
  (FlashAttention's `attention_ref(upcast=False)`, softcap included: s / softcap, tanh, times softcap,
  each rounded). Its error against float64 is the yardstick that the tolerance policy
  (`core.tolerance`) scales.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention_reference",
    "attention_varlen_reference",
    "attention_with_kvcache_reference",
    "visible_keys_mask",
]


def visible_keys_mask(
    n_queries: int, n_keys: int, causal: bool, device=None, window_size: tuple[int, int] = (-1, -1)
) -> torch.Tensor:
    """Boolean (Nq, Nk) mask: True where query i may attend to key j.

    FlashAttention's rule, bottom-right aligned: with d = Nk - Nq, query i sees key j iff
    i + d - left <= j <= i + d + right, for window_size = (left, right), -1 leaving a side unbounded;
    causal sets right to 0 (whatever window_size says). So a causal mask alone is j <= i + d, and when
    Nq > Nk the first Nq - Nk queries see no key at all; a window can leave rows without keys too.
    """
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(n_queries, device=device)[:, None]
    j = torch.arange(n_keys, device=device)[None, :]
    offset = j - i - (n_keys - n_queries)
    visible = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= offset >= -left
    if right >= 0:
        visible &= offset <= right
    return visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = torch.float64,
):
    """softmax(cap(q k^T * sm_scale) + mask) v, differentiable, for q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D).

    cap(s) = softcap * tanh(s / softcap) when softcap > 0, else s; the mask is visible_keys_mask's.
    Returns the output in `compute_dtype` (or the input dtype when `compute_dtype` is None), and with
    `return_lse=True` also the natural-log logsumexp of the capped, scaled, masked scores, shape
    (B, Hq, Nq). A query row that sees no key gets output 0 and LSE -inf, with zero (never NaN) gradients.
    """
    dtype = q.dtype if compute_dtype is None else compute_dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # GQA/MQA: query head h reads key/value head h // group
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)

    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    visible = visible_keys_mask(q.shape[2], k.shape[2], causal, device=q.device, window_size=window_size)
    row_sees_a_key = visible.any(dim=-1, keepdim=True)
    # Empty rows are softmaxed over zeros and then multiplied by an all-False mask: the output and
    # every gradient through them is exactly 0 instead of NaN from softmax over all -inf.
    scores = scores.masked_fill(~visible, float("-inf"))
    scores = torch.where(row_sees_a_key, scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1) * visible
    out = torch.matmul(probs, v)
    if not return_lse:
        return out
    if compute_dtype is None:
        lse = torch.logsumexp(scores.float() if dtype != torch.float64 else scores, dim=-1)
    else:
        lse = _LogSumExp.apply(scores)
    lse = torch.where(row_sees_a_key.squeeze(-1), lse, torch.full_like(lse, float("-inf")))
    return out, lse


class _LogSumExp(torch.autograd.Function):
    """logsumexp over the last dim, whose gradient is softmax(x) * grad.

    torch.logsumexp's backward is exp(x - lse) * grad with the rounded lse: beyond |lse| ~ 2^53 (float64)
    the rounding swallows log(l) whole, and a row tied between two keys gets P = 1 for each instead of
    1/2. The fuzzer found the float64 truth wrong that way at sm_scale 2e16 (dk off by half, the
    kernel right). softmax subtracts the max first, so its P is exact for any logits. The eager
    reference keeps torch.logsumexp: that is what a plain PyTorch implementation computes."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.logsumexp(x, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad[..., None] * torch.softmax(x, dim=-1)


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = torch.float64,
):
    """attention_reference on each packed sequence, with `core.attention_varlen`'s layout: q (total_q, Hq, D),
    k and v (total_k, Hkv, D), sequence b being rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and
    cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v, each attending within itself (masks aligned to its
    own lengths). Returns out (total_q, Hq, D) and with return_lse the LSE (Hq, total_q), natural log.

    It reads cu_seqlens on the host (a reference may wait for the device); max_seqlen_q/k are accepted
    for the same signature and not needed. Rows past cu_seqlens_q[-1] come out 0 (LSE -inf)."""
    del max_seqlen_q, max_seqlen_k
    dtype = q.dtype if compute_dtype is None else compute_dtype
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q_b = q[starts_q[b] : starts_q[b + 1]].transpose(0, 1).unsqueeze(0)
        k_b = k[starts_k[b] : starts_k[b + 1]].transpose(0, 1).unsqueeze(0)
        v_b = v[starts_k[b] : starts_k[b + 1]].transpose(0, 1).unsqueeze(0)
        out_b, lse_b = attention_reference(
            q_b, k_b, v_b, causal=causal, sm_scale=sm_scale, window_size=window_size, softcap=softcap,
            return_lse=True, compute_dtype=compute_dtype,
        )  # fmt: skip
        outs.append(out_b[0].transpose(0, 1))
        lses.append(lse_b[0])
    rest = q.shape[0] - starts_q[-1]
    outs.append(q.new_zeros((rest, *q.shape[1:]), dtype=dtype))
    lses.append(torch.full((q.shape[1], rest), float("-inf"), dtype=lses[0].dtype, device=q.device))
    out = torch.cat(outs, dim=0)
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=1)


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
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    batch = q.shape[0]
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
        out, lse = attention_reference(
            q[b : b + 1], keys[None], values[None], causal=causal, sm_scale=scale, window_size=window_size,
            softcap=softcap, return_lse=True, compute_dtype=compute_dtype,
        )  # fmt: skip
        outs.append(out[0])
        lses.append(lse[0])
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
