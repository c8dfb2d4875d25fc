"""The public entry points, `core.attention` and `core.attention_varlen`: validate, then run the
registered ops (core.ops).

Two routes reach the same kernels. While torch.compile traces, a call validates its (fake) inputs and
records the forward op, whose autograd records the backward op. In eager mode a call skips the
dispatcher: it takes its cached plan (core._plans) straight to the kernels, under core.ops.EagerAttention
when its inputs need gradients, which saves the op's dispatch and autograd bookkeeping on small,
host-bound calls.
"""

from __future__ import annotations

import math

import torch

from core import _plans, ops
from core._runtime import is_interpreted
from core._validation import (
    validate_attention_inputs,
    validate_deterministic,
    validate_kvcache_inputs,
    validate_varlen_inputs,
)
from core.kernels.host import Packed, uses_base_2

# Read once here: the interpreter decision is made when the kernels are imported, and a traced call
# should see a constant rather than trace into the cached lookup.
_INTERPRETED = is_interpreted()

__all__ = ["attention", "attention_varlen"]


def _feature_options(window_size, softcap) -> tuple[int, int, float]:
    """The ops' window_left, window_right and softcap, as the Python types their schemas declare (a
    validated window side may be any integral type, numpy's included)."""
    left, right = window_size
    return int(left), int(right), float(softcap)


def _result(out: torch.Tensor, lse: torch.Tensor, return_lse: bool, dtype: torch.dtype):
    """out, or (out, lse in natural log): the kernels keep the LSE in base 2 where uses_base_2 says so."""
    if not return_lse:
        return out
    return out, (lse * math.log(2.0) if uses_base_2(dtype) else lse)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0,  # 0, not 0.0: torch.compile(dynamic=True) would trace a float default symbolically
    return_lse: bool = False,
    deterministic: bool = True,
):
    """Scaled dot-product attention, fused: softmax(cap(q k^T * sm_scale) + mask) v.

    Args:
        q: (B, Hq, Nq, D) query. k, v: (B, Hkv, Nk, D) keys and values, with Hq a multiple of Hkv
            (GQA/MQA: query head h uses key/value head h // (Hq // Hkv); k and v are never repeated).
            float16, bfloat16 or float32, all the same dtype, on one CUDA device (or CPU under
            TRITON_INTERPRET=1), which need not be the current one. Any strides: BSHD views such as
            x.view(B, N, H, D).transpose(1, 2) and sliced views are read in place, never copied.
            1 <= D <= 256, any Nq, Nk >= 1.
        causal: mask key j for query i unless j <= i + (Nk - Nq) (bottom-right aligned, as in
            FlashAttention). Rows that see no key output 0 with LSE -inf and zero gradients.
        sm_scale: the softmax scale; defaults to 1 / sqrt(D).
        window_size: (left, right), FlashAttention's sliding window: query i sees only keys
            i + Nk - Nq - left <= j <= i + Nk - Nq + right; -1 leaves a side unbounded, and causal=True
            makes the right side 0 whatever it says. Work scales with the visible band: blocks outside
            every row's window are skipped, not masked.
        softcap: > 0 replaces each scaled score s by softcap * tanh(s / softcap) before the softmax
            (Gemma 2's logit softcapping; the LSE is over the capped scores). 0 turns it off.
        return_lse: also return the log-sum-exp of each row's scaled, capped, masked scores.
        deterministic: True (the default) sums every gradient element in one fixed order, so a repeated
            backward gives the same bits. False lets a backward that has a faster unordered sum use it
            (the Hopper backward's dQ, added atomically); every other backward is deterministic anyway.

    Returns:
        out with q's shape and dtype (q's strides when q is dense, else contiguous), or (out, lse) with
        lse (B, Hq, Nq) float32 in natural log. Both are differentiable; the backward pass uses O(N)
        memory. Traceable by torch.compile (fullgraph, static or dynamic shapes) and capturable in
        CUDA graphs.
    """
    validate_deterministic(deterministic)
    if torch.compiler.is_compiling():
        validate_attention_inputs(q, k, v, causal, sm_scale, return_lse, _INTERPRETED, window_size, softcap)
        out, lse, _ = ops.attention_forward(
            q, k, v, causal, _plans.default_scale(q, sm_scale), *_feature_options(window_size, softcap),
            deterministic,
        )  # fmt: skip
    else:
        # validates a new signature
        plan = _plans.forward_plan(q, k, v, causal, sm_scale, return_lse, window_size, softcap)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse, _ = ops.EagerAttention.apply(q, k, v, plan, None, deterministic)
        else:
            out, lse, _ = plan(q, k, v, keep_statistics=return_lse)
    return _result(out, lse, return_lse, q.dtype)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0,  # as core.attention's
    return_lse: bool = False,
    deterministic: bool = True,
):
    """core.attention over a batch of variable-length sequences packed end to end (FlashAttention's
    flash_attn_varlen_func): each sequence attends only within itself.

    Args:
        q: (total_q, Hq, D); k, v: (total_k, Hkv, D); any strides (e.g. views of a packed QKV
            projection), dtypes, heads and head dims as core.attention.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 on the inputs' device, contiguous: the cumulative
            lengths 0, n_0, n_0 + n_1, ... Sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] against
            k, v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]. Empty sequences are allowed, and Nq_b != Nk_b
            (chunked prefill: Nk_b >= Nq_b); masks are aligned to each sequence's own bottom-right corner,
            and rows that see no key output 0 with LSE -inf.
        max_seqlen_q, max_seqlen_k: Python ints >= 1, upper bounds of the longest query and key
            sequence; they size the grid (a larger bound costs only idle programs).
        causal, sm_scale, window_size, softcap, return_lse, deterministic: as core.attention.

    Returns:
        out (total_q, Hq, D), laid out like q when q is dense, else contiguous; with return_lse also the
        LSE as FlashAttention returns it: (Hq, total_q) float32, natural log.

    Nothing here reads cu_seqlens on the host, so a call never waits for the GPU. What validation
    therefore cannot check is the caller's contract: cu_seqlens start at 0, never decrease and end at
    total_q / total_k; no sequence is longer than max_seqlen_q / max_seqlen_k. Rows of q past
    cu_seqlens_q[-1] (and their LSE) are left unwritten. Checked before any launch: dtypes, devices,
    ranks and shapes (k and v alike, one length B + 1 for both cu_seqlens), and the options.
    """
    validate_deterministic(deterministic)
    if torch.compiler.is_compiling():
        validate_varlen_inputs(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, return_lse,
            _INTERPRETED, window_size, softcap,
        )  # fmt: skip
        out, lse, _ = ops.attention_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            _plans.default_scale(q, sm_scale), *_feature_options(window_size, softcap), deterministic,
        )  # fmt: skip
    else:
        plan = _plans.varlen_forward_plan(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, return_lse,
            window_size, softcap,
        )  # fmt: skip
        packed = Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse, _ = ops.EagerAttention.apply(q, k, v, plan, packed, deterministic)
        else:
            out, lse, _ = plan(q, k, v, keep_statistics=return_lse, packed=packed)
    return _result(out, lse, return_lse, q.dtype)


def attention_with_kvcache(
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
    num_splits: int | None = None,
    return_lse: bool = False,
):
    """Attention of new queries against a KV cache, FlashAttention's `flash_attn_with_kvcache` in core's
    (B, H, N, D) convention: optionally append new keys and values to the cache in place first, then
    attend to every cached key. Forward only (inference). Split-KV (flash-decoding): the keys are split
    over several programs whose results are merged by their LSE, so that a decode step fills the GPU.

    Args:
        q: (B, Hq, Nq, D) queries, Nq >= 1 (speculative decoding: several).
        k_cache, v_cache: (B_cache, Hkv, N_cache, D) with B_cache >= B (dense), or with `block_table`
            (num_blocks, Hkv, page_size, D) pages, page_size >= 16. Hq a multiple of Hkv (GQA/MQA). Any
            strides: a FlashAttention/vLLM-layout cache (..., N, H, D) is read (and written) through its
            view `.transpose(1, 2)`, never copied.
        cache_seqlens: how many keys each sequence has cached: an int32 (B,) tensor on q's device, or a
            Python int for all.
        k, v: (B, Hkv, Nnew, D) new keys and values, or None. Written into the cache in place at
            positions cache_seqlens[b], ..., + Nnew - 1 (pages too) and attended to in the same call: a
            sequence then has cache_seqlens[b] + Nnew keys. cache_seqlens itself is not updated.
        block_table: (B, max_blocks) int32 on q's device: key j of sequence b lives in page
            block_table[b, j // page_size] at slot j % page_size. A sequence holds up to
            max_blocks * page_size keys.
        cache_batch_idx: (B,) int32 on q's device: sequence b uses row cache_batch_idx[b] of a dense
            cache (default: row b). Rows repeated while appending: which write wins is not defined.
        causal: query i of a sequence with Nk keys sees key j only if j <= i + Nk - Nq (bottom-right, so
            the Nq new queries are the last Nq positions). Rows that see no key output 0, LSE -inf.
        sm_scale: softmax scale, default 1 / sqrt(D).
        window_size: (left, right), -1 for unlimited: query i sees only keys with
            i + Nk - Nq - left <= j <= i + Nk - Nq + right (FlashAttention's local attention).
        softcap: > 0 replaces each scaled score s by softcap * tanh(s / softcap); 0 turns it off.
        num_splits: how many programs share one KV head's keys; None (or 0) chooses from the shapes alone
            (no host sync, capturable in CUDA graphs), 1 does not split, up to 128.
        return_lse: also return the natural-log LSE of each row, (B, Hq, Nq) float32.

    Returns:
        out with q's shape and dtype (q's strides when q is dense), or (out, lse). Deterministic: the
        splits are merged in a fixed order. torch.compile traces it (fullgraph) as two ops: the append,
        which mutates k_cache and v_cache, and the attention (core.ops).

    Not checked (that would need the tensors' values on the host, i.e. a sync): cache_seqlens values
    outside [0, capacity - Nnew], and block ids outside the cache. Keys and appends past a sequence's
    capacity are never read or written (cache_seqlens is clamped there), so a dense cache is safe from
    both; a block id out of range reads or writes outside the paged cache. An int cache_seqlens is
    checked.
    """
    options = (causal, sm_scale, window_size, softcap, num_splits)
    if torch.compiler.is_compiling():
        validate_kvcache_inputs(
            q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, *options, return_lse,
            _INTERPRETED,
        )  # fmt: skip
        out, lse = _kvcache_through_ops(
            q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, *options
        )
    else:
        plan = _plans.kvcache_plan(
            q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, *options, return_lse
        )  # validates a new signature
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
            # The op's outputs carry its backward, which says clearly that there is none.
            out, lse = _kvcache_through_ops(
                q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, *options
            )  # fmt: skip
        else:
            out, lse, _ = plan(
                q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, return_lse
            )
    return _result(out, lse, return_lse, q.dtype)


def _kvcache_through_ops(q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, causal,
                         sm_scale, window_size, softcap, num_splits):  # fmt: skip
    """attention_with_kvcache as its two registered ops (validated inputs): what torch.compile records."""
    in_tensor = isinstance(cache_seqlens, torch.Tensor)
    seqlens, fixed = (cache_seqlens, 0) if in_tensor else (None, cache_seqlens)
    if k is not None:
        ops.kvcache_append(k_cache, v_cache, k, v, seqlens, fixed, block_table, cache_batch_idx)
    window_left, window_right = window_size
    n_new = 0 if k is None else k.shape[2]
    return ops.attention_with_kvcache(
        q, k_cache, v_cache, seqlens, fixed, n_new, block_table, cache_batch_idx, causal,
        _plans.default_scale(q, sm_scale), window_left, window_right, float(softcap), num_splits or 0,
    )  # fmt: skip
