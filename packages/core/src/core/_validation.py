"""Every check on the inputs of `core.attention`, `core.attention_varlen` and
`core.attention_with_kvcache`, run before anything is launched.

Each message says what was wrong and what is accepted. A varlen call's cumulative sequence lengths live on
the device: reading them would wait for the GPU, so only what their metadata shows is checked (dtype,
device, shape, contiguity), never their values (see validate_varlen_inputs).
"""

from __future__ import annotations

import math
import numbers

import torch

from core.kernels.decode.config import MAX_SPLITS

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# CUDA limits grid dimensions y and z (heads, batch) to 65535 programs.
MAX_GRID_YZ = 65535
# The kernels take the scale as a float32, with log2(e) folded in for fp16/bf16
# (core.kernels.host.score_scale): beyond this it is inf, and even a zero logit would come out NaN.
# One limit for every dtype.
MAX_SM_SCALE = torch.finfo(torch.float32).max / math.log2(math.e)  # 2.36e38
# A paged cache's pages hold at least one interpreter-sized key tile (and every page size in use does).
MIN_PAGE_SIZE = 16


def validate_attention_inputs(
    q, k, v, causal, sm_scale, return_lse, interpreted: bool, window_size=(-1, -1), softcap=0.0
) -> None:
    _validate_tensors(q, k, v, 4, "(batch, heads, seq_len, head_dim)")
    _validate_dtypes(q, k, v)
    _validate_devices(q, k, v, interpreted)
    _validate_shapes(q, k, v)
    _validate_options(causal, sm_scale, return_lse, window_size, softcap)


def validate_varlen_inputs(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, return_lse,
    interpreted: bool, window_size=(-1, -1), softcap=0.0,
) -> None:  # fmt: skip
    """core.attention_varlen's checks. Not checked, since it would read cu_seqlens on the host (a sync):
    that cu_seqlens start at 0, never decrease and end at the packed totals, and that no sequence is
    longer than max_seqlen_q / max_seqlen_k. Breaking these leaves rows unwritten or attends across
    sequences: they are the caller's contract, as in FlashAttention."""
    _validate_tensors(q, k, v, 3, "(total_tokens, heads, head_dim)")
    _validate_dtypes(q, k, v)
    _validate_devices(q, k, v, interpreted)
    _validate_packed_shapes(q, k, v)
    _validate_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k)
    for name, longest in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        validate_max_seqlen(name, longest)
    _validate_options(causal, sm_scale, return_lse, window_size, softcap)


def _validate_tensors(q, k, v, rank: int, dims: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.is_nested or t.layout != torch.strided:
            kind = "nested" if t.is_nested else str(t.layout)
            raise TypeError(f"{name} is a {kind} tensor; core.attention accepts strided (dense) tensors")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dims {dims}, got shape {tuple(t.shape)}")


def validate_deterministic(deterministic) -> None:
    """The backward's `deterministic` switch; checked on every call, as the plan cache does not key it."""
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")


def _validate_options(causal, sm_scale, return_lse, window_size, softcap) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    _validate_sm_scale(sm_scale)
    _validate_window_size(window_size)
    _validate_softcap(softcap)


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
    _validate_head_dim_and_groups(head_dim, q_heads, kv_heads, "k/v's")
    if q_heads > MAX_GRID_YZ or batch > MAX_GRID_YZ:
        raise ValueError(f"batch ({batch}) and heads ({q_heads}) must each be at most {MAX_GRID_YZ}")


def _validate_head_dim_and_groups(head_dim: int, q_heads: int, kv_heads: int, kv_holder: str) -> None:
    """D within the kernels' range, and Hq a multiple of Hkv (kv_holder: whose heads, for the message)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"head dim {head_dim} is larger than the supported maximum {MAX_HEAD_DIM} (1..256 accepted)"
        )
    if q_heads % kv_heads != 0:
        raise ValueError(
            f"q has {q_heads} heads, which is not a multiple of {kv_holder} {kv_heads} heads; "
            "GQA/MQA needs Hq % Hkv == 0"
        )


def _validate_packed_shapes(q, k, v) -> None:
    _, q_heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (total_k, Hkv, D), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    _, kv_heads, k_head_dim = k.shape
    if k_head_dim != head_dim:
        raise ValueError(f"head dim differs: q has {head_dim}, k and v have {k_head_dim}")
    for what, size in (("heads", q_heads), ("kv heads", kv_heads), ("head dim", head_dim)):
        if size == 0:
            raise ValueError(f"{what} is 0; heads and head dim of q, k and v must be >= 1")
    _validate_head_dim_and_groups(head_dim, q_heads, kv_heads, "k/v's")
    if q_heads > MAX_GRID_YZ:
        raise ValueError(f"heads ({q_heads}) must be at most {MAX_GRID_YZ}")


def _validate_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k) -> None:
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of int32 (batch + 1,), got {type(cu).__name__}")
        if cu.is_nested or cu.layout != torch.strided:
            raise TypeError(f"{name} must be a strided (dense) int32 tensor")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} has dtype {cu.dtype}; cumulative sequence lengths must be torch.int32")
        if cu.device != q.device:
            raise ValueError(
                f"{name} is on {cu.device} but q, k and v are on {q.device}: cumulative sequence lengths "
                "must be on the inputs' device (the kernels read them there, never the host)"
            )
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(
                f"{name} must be 1-D of length batch + 1 >= 2 (0, len_0, len_0 + len_1, ...), got shape "
                f"{tuple(cu.shape)}"
            )
        if cu.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous (stride 1), got stride {cu.stride(0)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got {cu_seqlens_q.shape[0]} "
            f"and {cu_seqlens_k.shape[0]}"
        )
    if cu_seqlens_q.shape[0] - 1 > MAX_GRID_YZ:
        raise ValueError(f"batch ({cu_seqlens_q.shape[0] - 1} sequences) must be at most {MAX_GRID_YZ}")


def validate_max_seqlen(name: str, longest) -> None:
    """max_seqlen_q / max_seqlen_k: a Python int >= 1 (it sizes the grid; it is not a tensor, so no sync
    reads it). Checked on every call, also when the rest of the signature is cached."""
    if isinstance(longest, bool) or not isinstance(longest, (int, torch.SymInt)):
        raise TypeError(
            f"{name} must be a Python int (an upper bound of the longest sequence), "
            f"got {type(longest).__name__}"
        )
    if longest < 1:
        raise ValueError(f"{name} must be >= 1, got {longest}")


def _validate_window_size(window_size) -> None:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(
            "window_size must be a pair (left, right) of ints, -1 for an unbounded side, "
            f"got {window_size!r:.60}"
        )
    for side, size in zip(("left", "right"), window_size):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(
                f"window_size's {side} side must be an int (-1: unbounded), got {type(size).__name__}"
            )
        if size < -1:
            raise ValueError(f"window_size's {side} side must be -1 (unbounded) or >= 0, got {size}")


def _validate_softcap(softcap) -> None:
    if isinstance(softcap, torch.Tensor):
        raise TypeError("softcap must be a Python number, not a tensor (pass float(softcap))")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number (0 for none), got {type(softcap).__name__}")
    if softcap == 0:
        return  # off (reading the float limit below would make torch.compile trace it symbolically)
    try:
        as_float = float(softcap)
    except OverflowError:  # an int beyond float's range
        as_float = math.inf
    if not _finite(as_float) or as_float < 0:
        raise ValueError(f"softcap must be finite and >= 0 (0 turns it off), got {softcap!r:.40}")
    if as_float > MAX_SM_SCALE:
        raise ValueError(
            f"softcap must be at most {MAX_SM_SCALE:.4g} (the kernels take it as a float32 with log2(e) "
            f"folded in), got {softcap}"
        )


def _finite(x: float) -> bool:
    """math.isfinite, written with comparisons: torch.compile(dynamic=True) traces a float option that is
    not a literal (a model's attribute) as a SymFloat, which math.isfinite cannot take."""
    return x == x and abs(x) != math.inf


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
    if not _finite(as_float):
        raise ValueError(f"sm_scale must be finite, got {sm_scale!r:.40}")
    if abs(as_float) > MAX_SM_SCALE:
        raise ValueError(
            f"|sm_scale| must be at most {MAX_SM_SCALE:.4g} (the kernels compute in float32 with log2(e) "
            f"folded into the scale), got {sm_scale}"
        )


def validate_kvcache_inputs(
    q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, causal, sm_scale, window_size,
    softcap, num_splits, return_lse, interpreted: bool,
) -> None:  # fmt: skip
    """The checks of core.attention_with_kvcache: everything that needs no look at tensor values (no
    host sync). What they cannot see, cache_seqlens past the cache and block ids out of range, is
    documented there instead."""
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    if (k is None) != (v is None):
        raise ValueError("k and v (the new keys and values to append) must be given together, or neither")
    if k is not None:
        named += [("k", k), ("v", v)]
    for name, t in named:
        _check_strided_4d(name, t, "core.attention_with_kvcache")
    for name, t in named:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; core.attention_with_kvcache accepts float16, bfloat16 or "
                "float32"
            )
    if len({t.dtype for _, t in named}) != 1:
        listed = ", ".join(f"{name} {t.dtype}" for name, t in named)
        raise TypeError(
            f"{' '.join(n for n, _ in named)} must share one dtype, got {listed}; cast them first"
        )
    _check_one_device(named, q, interpreted)

    batch, q_heads, n_queries, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must have the same shape, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    cache_rows, kv_heads, cache_len, cache_head_dim = k_cache.shape
    for what, size in (("batch", batch), ("heads", q_heads), ("Nq", n_queries), ("head dim", head_dim),
                       ("cache batch (or blocks)", cache_rows), ("cache heads", kv_heads),
                       ("cache length (or page size)", cache_len)):  # fmt: skip
        if size == 0:
            raise ValueError(f"{what} is 0; every dimension of q, k_cache and v_cache must be >= 1")
    if cache_head_dim != head_dim:
        raise ValueError(f"head dim differs: q has {head_dim}, k_cache and v_cache have {cache_head_dim}")
    _validate_head_dim_and_groups(head_dim, q_heads, kv_heads, "the cache's")
    if q_heads > MAX_GRID_YZ or batch > MAX_GRID_YZ:
        raise ValueError(f"batch ({batch}) and heads ({q_heads}) must each be at most {MAX_GRID_YZ}")

    if block_table is not None:
        capacity = _validate_block_table(block_table, q, batch, cache_len, cache_batch_idx, interpreted)
    else:
        capacity = cache_len
        if cache_batch_idx is not None:
            _validate_index_vector("cache_batch_idx", cache_batch_idx, q, batch, interpreted)
        elif cache_rows < batch:
            raise ValueError(
                f"the dense cache holds {cache_rows} sequences but q has batch {batch}; k_cache's first dim "
                "must be >= batch (or pass cache_batch_idx to pick each sequence's row)"
            )
    n_new = 0
    if k is not None:
        n_new = _validate_new_keys(k, v, batch, kv_heads, head_dim, capacity)
    _validate_cache_seqlens(cache_seqlens, q, batch, n_new, capacity, interpreted)

    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    _validate_sm_scale(sm_scale)
    _validate_window_size(window_size)
    _validate_softcap(softcap)
    _validate_num_splits(num_splits)


def _check_strided_4d(name, t, where: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:
        kind = "nested" if t.is_nested else str(t.layout)
        raise TypeError(f"{name} is a {kind} tensor; {where} accepts strided (dense) tensors")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dims, got shape {tuple(t.shape)}")


def _check_one_device(named, q, interpreted: bool) -> None:
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        listed = ", ".join(f"{name} {t.device}" for name, t in named)
        raise ValueError(f"every tensor must be on one device, got {listed}")
    if q.device.type == "cuda" or (interpreted and q.device.type == "cpu"):
        return
    if q.device.type == "cpu":
        raise ValueError(
            "the inputs are CPU tensors but core's kernels were compiled for the GPU. To run on the CPU "
            "(slowly, for testing), set TRITON_INTERPRET=1 in the environment before importing core."
        )
    raise ValueError(f"unsupported device {q.device}; core runs on CUDA (or CPU with TRITON_INTERPRET=1)")


def _validate_index_vector(name, t, q, batch: int, interpreted: bool) -> None:
    """An int32 (B,) tensor on q's device: cache_seqlens, cache_batch_idx."""
    if not isinstance(t, torch.Tensor) or t.is_nested or t.layout != torch.strided:
        raise TypeError(f"{name} must be a strided torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor, got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape (batch,) = ({batch},), got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}; it is read on q's device")


def _validate_block_table(block_table, q, batch, page_size, cache_batch_idx, interpreted: bool) -> int:
    """The paged cache's block table; returns the keys a sequence can hold (pages x page size)."""
    if (
        not isinstance(block_table, torch.Tensor)
        or block_table.is_nested
        or block_table.layout != torch.strided
    ):
        raise TypeError(f"block_table must be a strided torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be an int32 tensor, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise ValueError(
            f"block_table must have shape (batch, max_blocks) = ({batch}, >= 1), "
            f"got {tuple(block_table.shape)}"
        )
    if block_table.device != q.device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}")
    if page_size < MIN_PAGE_SIZE:
        raise ValueError(
            f"a paged cache's page size (k_cache.shape[2]) must be at least {MIN_PAGE_SIZE}, got {page_size}"
        )
    if cache_batch_idx is not None:
        raise ValueError(
            "cache_batch_idx selects rows of a dense cache; a paged cache takes block_table alone"
        )
    return block_table.shape[1] * page_size


def _validate_new_keys(k, v, batch, kv_heads, head_dim, capacity) -> int:
    """k and v to append, (B, Hkv, Nnew, D) each; returns Nnew."""
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    new_batch, new_heads, n_new, new_head_dim = k.shape
    if (new_batch, new_heads, new_head_dim) != (batch, kv_heads, head_dim) or n_new == 0:
        raise ValueError(
            f"k and v must have shape (batch, cache heads, Nnew >= 1, head dim) = ({batch}, {kv_heads}, "
            f"Nnew, {head_dim}), got {tuple(k.shape)}"
        )
    if n_new > capacity:
        raise ValueError(f"k and v bring {n_new} new keys but each sequence's cache holds only {capacity}")
    return n_new


def _validate_cache_seqlens(cache_seqlens, q, batch, n_new, capacity, interpreted: bool) -> None:
    if isinstance(cache_seqlens, torch.Tensor):
        _validate_index_vector("cache_seqlens", cache_seqlens, q, batch, interpreted)
        return
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, numbers.Integral):
        raise TypeError(
            "cache_seqlens must be an int or an int32 tensor of shape (batch,), "
            f"got {type(cache_seqlens).__name__}"
        )
    if cache_seqlens < 0 or cache_seqlens + n_new > capacity:
        raise ValueError(
            f"cache_seqlens {cache_seqlens} with {n_new} new keys does not fit a cache of {capacity} keys "
            "per sequence (0 <= cache_seqlens and cache_seqlens + Nnew <= capacity)"
        )


def _validate_num_splits(num_splits) -> None:
    if num_splits is None:
        return
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int or None, got {type(num_splits).__name__}")
    if not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(
            f"num_splits must be between 1 and {MAX_SPLITS} (0 or None: chosen from the shapes), "
            f"got {num_splits}"
        )
