"""The decode family's host side: one plan per call signature (tiles, split count, grids, every integer
argument and a bound launch per kernel, core.kernels.launch), and calling a plan allocates its outputs
and scratch and launches: the append (when new keys come), the split kernel and, with several splits,
the merge. No validation here (core._validation runs first), no copies, and nothing that reads a tensor's
values: a plan's launches are capturable in a CUDA graph.
"""

from __future__ import annotations

import dataclasses

import torch

from core._runtime import is_interpreted, patch_interpreter
from core.kernels.decode import config as _config
from core.kernels.decode.forward import decode_merge_kernel, decode_split_kernel, kvcache_append_kernel
from core.kernels.host import (
    PLAIN,
    Features,
    OnDevice,
    ceil_div,
    layout_of_new_buffer,
    new_buffer,
    score_scale,
)
from core.kernels.launch import BoundLaunch
from core.kernels.portable.config import padded_head_dim
from core.kernels.portable.plans import BackwardPlan, _precision_flags

APPEND_BLOCK_T = 16  # new tokens per append program


class AttendPlan(OnDevice):
    """Attention of q against a KV cache: dense (B_cache, Hkv, N_cache, D), or paged (blocks, Hkv, page,
    D) with a block table. One call signature; `n_new` keys past each sequence's cached ones (appended
    by an AppendPlan first) are attended to as well.

    `plan(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx)` returns (out, lse, lse_low)
    with the conventions of core.kernels.host (lse in the kernels' base). An int cache_seqlens is part
    of the signature (the kernels take it as a constant); a tensor is read on the device. With
    keep_statistics False the LSE and its low parts go to one throwaway buffer and come back as None.
    `num_splits` and `row_tile` (query rows a program holds) replace the split rule's and the tile
    table's choices when given.
    """

    def __init__(self, q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, *, n_new: int,
                 causal: bool, sm_scale: float, window_size: tuple[int, int] = (-1, -1),
                 softcap: float = 0.0, num_splits: int | None = None,
                 row_tile: int | None = None):  # fmt: skip
        super().__init__(q)
        batch, q_heads, n_queries, head_dim = q.shape
        kv_heads = k_cache.shape[1]
        kv_group = q_heads // kv_heads
        interpreted = _prepare_launch()
        block_d = padded_head_dim(head_dim)
        rows = kv_group * n_queries
        config = _config.decode_config(rows, block_d, q.dtype, block_table is not None, interpreted)
        if row_tile:
            config = dataclasses.replace(config, block_m=row_tile)
        self.row_tile = config.block_m
        row_blocks = ceil_div(rows, config.block_m)
        window_left, window_right = window_size
        capacity = _capacity(k_cache, block_table)
        if num_splits:
            splits = num_splits
        else:
            splits = _config.split_count(
                batch * kv_heads * row_blocks,
                ceil_div(
                    _visible_span(capacity, n_queries, causal, window_left, window_right), config.block_n
                ),
                _config.multiprocessors(q.device, interpreted),
            )
        self.splits = splits
        self.lse_shape = (batch, q_heads, n_queries)
        self.low_shape = (2 if q.dtype == torch.float32 else 1, *self.lse_shape)
        self.partial_shape = (batch, kv_heads, splits, rows, head_dim)
        self.stats_shape = (3 if q.dtype == torch.float32 else 2, batch, kv_heads, splits, rows)

        dot_precision, base_2, precise_exp = _precision_flags(q.dtype, interpreted)
        if softcap:
            qk_scale, cap_scale = sm_scale / softcap, score_scale(q.dtype, softcap)
        else:
            qk_scale, cap_scale = score_scale(q.dtype, sm_scale), 1.0
        vectors, addressing = _addressing(k_cache, cache_seqlens, block_table, cache_batch_idx)
        out_layout = layout_of_new_buffer(q)
        overlap = _config.overlaps_merge(splits, q.device, interpreted)
        self.split = BoundLaunch(
            decode_split_kernel,
            (row_blocks * splits, kv_heads, batch),
            (*q.stride(), *k_cache.stride(), *v_cache.stride(), *out_layout, *vectors, q_heads, kv_group,
             n_queries, capacity, _fixed_seqlen(cache_seqlens), n_new, window_left, window_right, splits),
            (qk_scale, cap_scale),
            (("HEAD_DIM", head_dim), ("BLOCK_M", config.block_m), ("BLOCK_N", config.block_n),
             ("BLOCK_D", block_d), ("CAUSAL", causal), ("WINDOW_LEFT", window_left >= 0),
             ("WINDOW_RIGHT", window_right >= 0), ("SOFTCAP", bool(softcap)), *addressing,
             ("SINGLE_SPLIT", splits == 1), dot_precision, base_2, precise_exp, ("LAUNCH_MERGE", overlap)),
            (("num_warps", config.num_warps), ("num_stages", config.num_stages)),
        )  # fmt: skip
        self.merge = None
        if splits > 1:
            # float64 arithmetic: libdevice's exp/log where compiled (the interpreter has none).
            block_s = _config.merge_block_s(splits, block_d)
            self.merge = BoundLaunch(
                decode_merge_kernel,
                (rows, kv_heads, batch),
                (*out_layout, q_heads, kv_group, n_queries, splits),
                (),
                (("HEAD_DIM", head_dim), ("BLOCK_S", block_s), ("BLOCK_D", block_d),
                 ("ONE_READ", splits <= block_s), ("COMPENSATE", q.dtype == torch.float32), base_2,
                 ("PRECISE_EXP", not interpreted), ("WAIT_FOR_SPLITS", overlap)),
                (("num_warps", 4), ("num_stages", 1), *((("launch_pdl", True),) if overlap else ())),
            )  # fmt: skip

    def __call__(self, q, k_cache, v_cache, cache_seqlens, block_table=None, cache_batch_idx=None,
                 keep_statistics: bool = True):  # fmt: skip
        return self.on_device(
            self._run, q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, keep_statistics
        )

    def _run(self, q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, keep_statistics):
        seqlens, table, rows_of = _vector_arguments(q, cache_seqlens, block_table, cache_batch_idx)
        out = new_buffer(q)
        if keep_statistics:
            lse, lse_low = new_buffer(q, self.lse_shape), new_buffer(q, self.low_shape)
        else:
            # The kernels write the rows' LSE and their low parts into this one buffer, unread.
            lse = lse_low = new_buffer(q, self.low_shape)
        if self.merge is None:
            self.split(self.index, q, k_cache, v_cache, seqlens, table, rows_of, out, lse, lse_low, q, q)
        else:
            partial, stats = new_buffer(q, self.partial_shape), new_buffer(q, self.stats_shape)
            self.split(
                self.index, q, k_cache, v_cache, seqlens, table, rows_of, out, lse, lse_low, partial, stats
            )
            self.merge(self.index, partial, stats, out, lse, lse_low)
        return (out, lse, lse_low) if keep_statistics else (out, None, None)


class AppendPlan(OnDevice):
    """Writes new keys k and values v (B, Hkv, Nnew, D) into a cache in place, at each sequence's
    cached length (dense rows or pages, as AttendPlan reads them). One call signature;
    `plan(k, v, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx)`."""

    def __init__(self, k, v, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx):
        super().__init__(k)
        batch, kv_heads, n_new, head_dim = k.shape
        interpreted = _prepare_launch()
        vectors, addressing = _addressing(k_cache, cache_seqlens, block_table, cache_batch_idx)
        self.launch = BoundLaunch(
            kvcache_append_kernel,
            (ceil_div(n_new, APPEND_BLOCK_T), kv_heads, batch),
            (*k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *vectors,
             _capacity(k_cache, block_table), _fixed_seqlen(cache_seqlens), n_new),
            (),
            (("HEAD_DIM", head_dim), ("BLOCK_T", APPEND_BLOCK_T), ("BLOCK_D", padded_head_dim(head_dim)),
             *addressing),
            (("num_warps", 1 if interpreted else 4), ("num_stages", 1)),
        )  # fmt: skip

    def __call__(self, k, v, k_cache, v_cache, cache_seqlens, block_table=None, cache_batch_idx=None):
        seqlens, table, rows_of = _vector_arguments(k, cache_seqlens, block_table, cache_batch_idx)
        self.on_device(self.launch, self.index, k, v, k_cache, v_cache, seqlens, table, rows_of)


class KvCachePlan:
    """core.attention_with_kvcache's eager call: the append (when k, v come) then the attention."""

    def __init__(self, q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, **options):
        self.append = None
        if k is not None:
            self.append = AppendPlan(k, v, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx)
        n_new = 0 if k is None else k.shape[2]
        self.attend = AttendPlan(
            q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, n_new=n_new, **options
        )

    def __call__(self, q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx,
                 keep_statistics: bool = True):  # fmt: skip
        if self.append is not None:
            self.append(k, v, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx)
        return self.attend(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, keep_statistics)


def _prepare_launch() -> bool:
    interpreted = is_interpreted()
    if interpreted:
        patch_interpreter()
    return interpreted


def _capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """The keys a sequence's cache holds: N_cache, or its block table's pages times the page size."""
    return k_cache.shape[2] if block_table is None else block_table.shape[1] * k_cache.shape[2]


def _fixed_seqlen(cache_seqlens) -> int:
    return 0 if isinstance(cache_seqlens, torch.Tensor) else int(cache_seqlens)


def _addressing(k_cache, cache_seqlens, block_table, cache_batch_idx) -> tuple[tuple, tuple]:
    """(strides of the vector arguments, their constexpr flags), as the append and split kernels take
    them: cache_seqlens, block_table (both dims) and cache_batch_idx strides, 0 for those absent."""
    seqlens_in_tensor = isinstance(cache_seqlens, torch.Tensor)
    paged = block_table is not None
    strides = (
        cache_seqlens.stride(0) if seqlens_in_tensor else 0,
        *(block_table.stride() if paged else (0, 0)),
        0 if cache_batch_idx is None else cache_batch_idx.stride(0),
    )
    flags = (
        ("SEQLENS_IN_TENSOR", seqlens_in_tensor), ("PAGED", paged),
        ("PAGE_SIZE", k_cache.shape[2] if paged else 1), ("CACHE_BATCH_INDEX", cache_batch_idx is not None),
    )  # fmt: skip
    return strides, flags


def _vector_arguments(like, cache_seqlens, block_table, cache_batch_idx) -> tuple:
    """The kernels' SeqLens, BlockTable and CacheBatch pointers: a pointer the kernel never reads (its
    flag is off) still needs a tensor, and `like` stands in."""
    seqlens = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else like
    return (
        seqlens,
        like if block_table is None else block_table,
        like if cache_batch_idx is None else cache_batch_idx,
    )


def _visible_span(capacity: int, n_queries: int, causal: bool, window_left: int, window_right: int) -> int:
    """The most keys a query tile can see: the cache, or a window's width over the tile's queries."""
    if window_left >= 0 and (causal or window_right >= 0):
        right = 0 if causal else window_right
        return min(capacity, window_left + right + n_queries)
    return capacity


class ForcedPlan:
    """The split count and row tile of core.attention's decode-shaped calls where set
    (core.testing.plan_like), instead of the split rule's and decode_config's. Both follow the query rows
    per KV head, so two calls that must agree bit for bit (grouped k/v, and the same k/v repeated per
    query head) could otherwise split their keys apart, or multiply on different tensor-core
    instructions (a 64-row tile and a 16-row one sum a row's products in different orders)."""

    splits: int | None = None
    row_tile: int | None = None


class ForwardPlan:
    """The family contract's forward (core.kernels): a decode-shaped core.attention call, run as
    attention against a dense cache that is k, v themselves, every sequence holding all Nk keys. Its
    backward is the portable family's, which reads this forward's LSE conventions."""

    def __init__(self, q, k, v, causal: bool, sm_scale: float, features: Features = PLAIN):
        self.causal, self.sm_scale, self.features = causal, sm_scale, features
        self.n_keys = k.shape[2]
        self.attend = AttendPlan(
            q, k, v, self.n_keys, None, None, n_new=0, causal=causal, sm_scale=sm_scale,
            window_size=(features.window_left, features.window_right), softcap=features.softcap,
            num_splits=ForcedPlan.splits, row_tile=ForcedPlan.row_tile,
        )  # fmt: skip
        self.backward_plans: dict[tuple, BackwardPlan] = {}

    def __call__(self, q, k, v, keep_statistics: bool = True):
        return self.attend(q, k, v, self.n_keys, keep_statistics=keep_statistics)

    def backward_plan(self, dout, dlse, q, k, v, deterministic: bool = True) -> BackwardPlan:
        """The portable backward for these inputs and a dO of dout's layout (and a dLSE or none); it is
        deterministic whatever `deterministic` says."""
        key = (dout.stride(), dout.dtype, dout.data_ptr() & 15, dlse is None)
        plan = self.backward_plans.get(key)
        if plan is None:
            if len(self.backward_plans) >= 64:
                self.backward_plans.clear()
            plan = self.backward_plans[key] = BackwardPlan(
                dout, dlse, q, k, v, self.causal, self.sm_scale, self.features
            )
        return plan
