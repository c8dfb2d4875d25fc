"""FlashAttention 2's Python interface over core, so that code written for `flash_attn` switches by
changing one import:

    from core.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same signatures, layouts and semantics as `flash_attn.flash_attn_interface`: q (B, N, H, D), k and v
(B, N, Hkv, D) (read through transposed views of core's (B, H, N, D) convention, never copied);
bottom-right causal masks; window_size=(left, right) with -1 unbounded; softcap; LSE (B, H, N) float32 in
natural log. The KV cache is (B_cache, N_cache, Hkv, D), or paged (num_blocks, page_size, Hkv, D) with
block_table, and new keys are appended in place.

What core does not have is refused with a ValueError before anything runs, never ignored: dropout_p > 0,
alibi_slopes, and in flash_attn_with_kvcache rotary embeddings (rotary_cos/sin) and cache_leftpad.
deterministic is core.attention's, with FlashAttention's default (False: where a backward has a faster
unordered sum, it may use it). return_attn_probs=True returns
(out, softmax_lse, None): core never forms the attention probabilities (FlashAttention documents its
own as for testing only).
"""

from __future__ import annotations

import torch

from core.api import attention, attention_varlen, attention_with_kvcache

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]


def _refuse(dropout_p: float = 0.0, alibi_slopes=None, **others) -> None:
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: core has no dropout (pass 0.0, as at inference)")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes: core has no ALiBi bias")
    for name, value in others.items():
        if value is not None:
            raise ValueError(f"{name}: not supported by core's flash_attn_with_kvcache")


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) -> core's (B, H, N, D): a view."""
    return t.transpose(1, 2)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (B, Nq, Hq, D), k and v (B, Nk, Hkv, D). Returns out (B, Nq, Hq, D), or with return_attn_probs
    (out, softmax_lse (B, Hq, Nq) float32, None)."""
    _refuse(dropout_p, alibi_slopes)
    result = attention(
        _heads_first(q), _heads_first(k), _heads_first(v), causal=causal, sm_scale=softmax_scale,
        window_size=window_size, softcap=softcap, return_lse=return_attn_probs, deterministic=deterministic,
    )  # fmt: skip
    if not return_attn_probs:
        return _heads_first(result)
    out, lse = result
    return _heads_first(out), lse, None


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """q (total_q, Hq, D), k and v (total_k, Hkv, D), cu_seqlens int32 (B + 1,): core.attention_varlen.
    Returns out (total_q, Hq, D), or with return_attn_probs (out, softmax_lse (Hq, total_q), None)."""
    _refuse(dropout_p, alibi_slopes, block_table=block_table)
    result = attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        sm_scale=softmax_scale, window_size=window_size, softcap=softcap, return_lse=return_attn_probs,
        deterministic=deterministic,
    )  # fmt: skip
    return (*result, None) if return_attn_probs else result


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """q (B, Nq, Hq, D); k_cache and v_cache (B_cache, N_cache, Hkv, D), or (num_blocks, page_size, Hkv, D)
    pages with block_table (B, max_blocks) int32; k and v (B, Nnew, Hkv, D) appended in place at
    cache_seqlens (an int32 (B,) tensor or an int; None: every cache is full, nothing to append).
    num_splits 0 lets core choose. Returns out (B, Nq, Hq, D), or (out, softmax_lse (B, Hq, Nq))."""
    _refuse(0.0, alibi_slopes, rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_leftpad=cache_leftpad)
    if cache_seqlens is None:  # FlashAttention: every sequence's cache is full
        if k is not None:
            raise ValueError("appending k and v needs cache_seqlens: where each sequence's new keys go")
        cache_seqlens = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    result = attention_with_kvcache(
        _heads_first(q), _heads_first(k_cache), _heads_first(v_cache), cache_seqlens=cache_seqlens,
        k=None if k is None else _heads_first(k), v=None if v is None else _heads_first(v),
        block_table=block_table, cache_batch_idx=cache_batch_idx, causal=causal, sm_scale=softmax_scale,
        window_size=window_size, softcap=softcap, num_splits=num_splits or None,
        return_lse=return_softmax_lse,
    )  # fmt: skip
    if not return_softmax_lse:
        return _heads_first(result)
    out, lse = result
    return _heads_first(out), lse
