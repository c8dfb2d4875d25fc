"""The split-KV (flash-decoding) kernels: few queries against many cached keys.

A decode step has one (or a few) query rows per head. The portable forward's one program per query tile
and head then holds a nearly empty tile, each head of a GQA group streams the same keys again, and the
B x Hq programs, each as long as the cache, fill the GPU in few uneven waves (at small batch not at
all). Here:

1. `decode_split_kernel`, grid (row blocks x splits, Hkv, B): a program takes every query row of one KV
   head (its GQA group x the queries, so each key tile is read once for the whole group) and one split
   of the keys those rows can see. It streams them with the portable forward's online softmax and
   writes its unnormalised accumulator and row statistics (max, sum) to float32 scratch; with a single
   split it finishes the rows itself.
2. `decode_merge_kernel`, grid (rows, Hkv, B): combines the splits of each row in float64, reading many
   splits at once, in a fixed order (deterministic), and writes the output, the LSE and its low parts
   with the conventions every family shares (core.kernels.host).

Keys are addressed per key: a dense cache row is `batch * stride_b + key * stride_n`; a paged cache
finds key j in page `block_table[b, j // PAGE_SIZE]` at slot `j % PAGE_SIZE`. Either way any strides
work, so a (..., N, H, D) cache is read through its transposed view.

Masks, per sequence b with Nk_b keys (its cached keys plus the appended ones) and diagonal
Nk_b - Nq: query i sees key j iff j < Nk_b and (causal) j <= i + diagonal, (window left) j >=
i + diagonal - left, (window right) j <= i + diagonal + right. Softcapping replaces each scaled score
s by softcap * tanh(s / softcap) before the softmax.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from core.kernels.shared import _accumulate_dot, _exp, _hide_keys, _load_tile, _log, _scores

# |LSE2| below which fp16/bf16 save no low part for the LSE: the portable forward's rule
# (core.kernels.portable.forward.LOW_PART_NEGLIGIBLE_BELOW), which the shared backward expects.
LOW_PART_NEGLIGIBLE_BELOW = tl.constexpr(256.0)
# The interpreter has no libdevice (see core.kernels.shared.ROUND_SCORES_EXPLICITLY).
COMPILED = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def _tanh(x):
    """tanh in float32: libdevice's when compiled; under the interpreter from exp in float64, whose
    absolute error (~1e-16, also near 0) is far below float32's rounding of the result."""
    if COMPILED:
        return libdevice.tanh(x)
    else:
        wide = x.to(tl.float64)
        return (1.0 - 2.0 / (tl.exp(2.0 * wide) + 1.0)).to(tl.float32)


@triton.jit
def _tile_rows(row_block, kv_head, kv_group, n_queries, BLOCK_M: tl.constexpr):
    """The rows of one KV head's tile, query-major (row r is query r // group of query head
    kv_head * group + r % group), so that a row block covers consecutive queries: (rows, their query
    heads, their query indices, which rows exist)."""
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    heads = kv_head * kv_group + rows % kv_group
    queries = rows // kv_group
    return rows, heads, queries, rows < kv_group * n_queries


@triton.jit
def _finish_rows(m, l_i, acc, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr, COMPENSATE: tl.constexpr):
    """(out, lse, lse_low) of rows with running max m, sum l_i and accumulator acc:
    the portable forward's epilogue, so both families save the same statistics. Rows that saw no key
    (l_i = 0) give out 0, LSE -inf and low part 0."""
    sees_a_key = l_i > 0.0
    l_safe = tl.where(sees_a_key, l_i, 1.0)
    out = tl.where(sees_a_key[:, None], tl.math.div_rn(acc, l_safe[:, None]), 0.0)
    log_l = _log(l_safe, BASE_2, PRECISE_EXP)
    lse = tl.where(sees_a_key, m + log_l, float("-inf"))
    log_l_part = lse - m
    lse_low = tl.where(sees_a_key, (m - (lse - log_l_part)) + (log_l - log_l_part), 0.0)
    if not COMPENSATE:
        lse_low = tl.where(tl.abs(lse) < LOW_PART_NEGLIGIBLE_BELOW, 0.0, lse_low)
    return out, lse, lse_low


@triton.jit
def _store_rows(Out, Lse, LseLow, out, lse, lse_low, m_low, batch, heads, queries, row_ok, offs_d, d_ok,
                stride_ob, stride_oh, stride_om, stride_od, n_q_heads, n_queries, rows_in_all_heads,
                COMPENSATE: tl.constexpr):  # fmt: skip
    """Write finished rows: out at (batch, head, query), the LSE and its low parts (core.kernels.host's
    layout: (B, Hq, Nq) contiguous, the max's low part as LseLow's second plane for float32)."""
    o_ptrs = (
        Out + batch.to(tl.int64) * stride_ob + heads.to(tl.int64)[:, None] * stride_oh
        + queries.to(tl.int64)[:, None] * stride_om + offs_d[None, :] * stride_od
    )  # fmt: skip
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    row_offsets = (batch.to(tl.int64) * n_q_heads + heads) * n_queries + queries
    tl.store(Lse + row_offsets, lse, mask=row_ok)
    tl.store(LseLow + row_offsets, lse_low, mask=row_ok)
    if COMPENSATE:
        tl.store(LseLow + rows_in_all_heads + row_offsets, m_low, mask=row_ok)


@triton.jit
def _key_places(cols, col_ok, tile_start, batch, cache_batch, BlockTable, stride_table_b, stride_table_p,
                PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, WHOLE_PAGE_TILES: tl.constexpr):  # fmt: skip
    """(cache row, slot) of keys `cols` of one sequence, 64-bit: its dense row and the key's position,
    or the page the block table names and the key's slot in it. K and V share them (each has its own
    strides). WHOLE_PAGE_TILES: `cols` is one tile from `tile_start`, a multiple of the tile size, which
    divides PAGE_SIZE: the tile lies in one page, whose id is one table entry instead of one per key."""
    table_row = BlockTable + batch.to(tl.int64) * stride_table_b
    if PAGED and WHOLE_PAGE_TILES:
        page = tl.load(table_row + (tile_start // PAGE_SIZE) * stride_table_p)
        return page.to(tl.int64), (cols % PAGE_SIZE).to(tl.int64)
    elif PAGED:
        pages = tl.load(table_row + (cols // PAGE_SIZE) * stride_table_p, mask=col_ok, other=0)
        return pages.to(tl.int64), (cols % PAGE_SIZE).to(tl.int64)
    else:
        return cache_batch.to(tl.int64), cols.to(tl.int64)


@triton.jit
def _sequence_keys(SeqLens, stride_seqlens, batch, fixed_seqlen, n_new, capacity,
                   SEQLENS_IN_TENSOR: tl.constexpr):  # fmt: skip
    """Nk_b: the cached keys of sequence `batch` plus the n_new appended ones, clamped to the cache (a
    cache_seqlens past the cache is not checked on the host, which would need a sync: no key beyond
    the cache is ever read)."""
    if SEQLENS_IN_TENSOR:
        seqlen = tl.load(SeqLens + batch.to(tl.int64) * stride_seqlens)
    else:
        seqlen = fixed_seqlen
    return tl.minimum(tl.maximum(seqlen + n_new, 0), capacity)


@triton.jit(
    do_not_specialize=["n_queries", "capacity", "fixed_seqlen", "n_new", "window_left", "window_right",
                       "n_splits"]
)  # fmt: skip
def decode_split_kernel(
    Q, KCache, VCache, SeqLens, BlockTable, CacheBatch, Out, Lse, LseLow, Partial, PartialStats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_seqlens, stride_table_b, stride_table_p, stride_cache_batch,
    n_q_heads, kv_group, n_queries, capacity, fixed_seqlen, n_new, window_left, window_right, n_splits,
    qk_scale, cap_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    SEQLENS_IN_TENSOR: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    CACHE_BATCH_INDEX: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    LAUNCH_MERGE: tl.constexpr,
):  # fmt: skip
    """One split of the keys for the query rows of one (batch, KV head, row block).

    Pointers (any strides; 64-bit offsets):
      Q      (B, Hq, Nq, HEAD_DIM)
      KCache, VCache  dense (B_cache, Hkv, N_cache, HEAD_DIM), or paged (blocks, Hkv, PAGE_SIZE, HEAD_DIM)
      SeqLens (B,) int32 cached keys per sequence (SEQLENS_IN_TENSOR; else fixed_seqlen for all)
      BlockTable (B, max_blocks) int32 page ids (PAGED); CacheBatch (B,) int32 cache rows
          (CACHE_BATCH_INDEX; else sequence b reads cache row b)
      Out, Lse, LseLow as the portable forward's (SINGLE_SPLIT), else unused
      Partial (B, Hkv, n_splits, rows, HEAD_DIM) float32 contiguous, rows = kv_group * Nq: each split's
          unnormalised accumulator; PartialStats (planes, B, Hkv, n_splits, rows): its row max, row sum
          and (float32) the max's low part (not SINGLE_SPLIT)
    Each sequence's keys are Nk_b = min(cached + n_new, capacity), capacity the keys the cache holds.
    qk_scale = sm_scale * log2(e) when BASE_2, else sm_scale. With SOFTCAP, qk_scale = sm_scale / softcap
    (the tanh's argument) and cap_scale = softcap, times log2(e) when BASE_2.
    Grid: (row blocks * n_splits, Hkv, B). LAUNCH_MERGE (config.OVERLAP_MERGE_FROM_SPLITS): each program
    lets the merge kernel launch at once (griddepcontrol.launch_dependents); the merge waits for this
    whole grid to finish before it reads a partial, so the early launch only overlaps the launch gap.
    """
    if LAUNCH_MERGE:
        tl.extra.cuda.gdc_launch_dependents()
    COMPENSATE: tl.constexpr = Q.dtype.element_ty == tl.float32
    WHOLE_PAGE_TILES: tl.constexpr = PAGED and PAGE_SIZE % BLOCK_N == 0
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    split = tl.program_id(0) % n_splits
    row_block = tl.program_id(0) // n_splits
    rows, heads, queries, row_ok = _tile_rows(row_block, kv_head, kv_group, n_queries, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    q_ptrs = (
        Q + batch.to(tl.int64) * stride_qb + heads.to(tl.int64)[:, None] * stride_qh
        + queries.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    )  # fmt: skip
    q = _load_tile(q_ptrs, row_ok, d_ok, False, EVEN_D)

    n_keys = _sequence_keys(SeqLens, stride_seqlens, batch, fixed_seqlen, n_new, capacity, SEQLENS_IN_TENSOR)
    diagonal = n_keys - n_queries
    # The keys some row of this tile may see: [key_lo, key_hi).
    first_query = (row_block * BLOCK_M) // kv_group
    last_query = (tl.minimum(row_block * BLOCK_M + BLOCK_M, kv_group * n_queries) - 1) // kv_group
    key_lo = 0
    key_hi = n_keys
    if WINDOW_LEFT:
        key_lo = tl.maximum(first_query + diagonal - window_left, 0)
    if CAUSAL:
        key_hi = tl.minimum(key_hi, last_query + diagonal + 1)
    if WINDOW_RIGHT:
        key_hi = tl.minimum(key_hi, last_query + diagonal + window_right + 1)
    key_hi = tl.maximum(key_hi, key_lo)
    # Tiles start at multiples of BLOCK_N (the keys below key_lo in the first one are masked), so that
    # with WHOLE_PAGE_TILES no tile straddles two pages.
    key_lo = (key_lo // BLOCK_N) * BLOCK_N
    # This split's share: whole tiles, the same count for every split of the row block.
    tiles_per_split = tl.cdiv(tl.cdiv(key_hi - key_lo, BLOCK_N), n_splits)
    key_start = key_lo + split * tiles_per_split * BLOCK_N
    key_end = tl.minimum(key_hi, key_start + tiles_per_split * BLOCK_N)

    if CACHE_BATCH_INDEX:
        cache_batch = tl.load(CacheBatch + batch.to(tl.int64) * stride_cache_batch)
    else:
        cache_batch = batch
    k_head = KCache + kv_head.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd
    v_head = VCache + kv_head.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m_low = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_comp = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    comp = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for block_start in range(key_start, key_end, BLOCK_N):
        cols = block_start + offs_n
        col_ok = cols < key_end
        row, slot = _key_places(cols, col_ok, block_start, batch, cache_batch, BlockTable, stride_table_b,
                                stride_table_p, PAGED, PAGE_SIZE, WHOLE_PAGE_TILES)  # fmt: skip
        kT = _load_tile(k_head + (row * stride_kb + slot * stride_kn)[None, :], d_ok, col_ok, EVEN_D, False)
        scores, scores_low = _scores(q, kT, qk_scale, DOT_PRECISION, COMPENSATE)
        if SOFTCAP:
            capped = _tanh(scores)
            # d tanh(t) = (1 - tanh^2) dt carries the score's low part through the cap (float32).
            scores_low = (cap_scale * (1.0 - capped * capped)) * scores_low
            scores = capped * cap_scale
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= (queries + diagonal)[:, None])
        if WINDOW_LEFT:
            visible = visible & (cols[None, :] >= (queries + diagonal - window_left)[:, None])
        if WINDOW_RIGHT:
            visible = visible & (cols[None, :] <= (queries + diagonal + window_right)[:, None])
        scores, scores_low = _hide_keys(scores, scores_low, visible, COMPENSATE)

        # The portable forward's online softmax (core.kernels.portable.forward._attend_to_key_blocks):
        # a row that has seen no visible key yet keeps m = -inf and subtracts 0 instead.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if COMPENSATE:
            low_at_max = tl.max(tl.where(scores == m_new[:, None], scores_low, float("-inf")), 1)
            m_low_new = tl.where(m_i == m_new, tl.maximum(m_low, low_at_max), low_at_max)
            m_low_new = tl.where(m_new == float("-inf"), 0.0, m_low_new)
            p = _exp((scores - m_new_safe[:, None]) + (scores_low - m_low_new[:, None]), BASE_2, PRECISE_EXP)
            alpha = _exp((m_i - m_new_safe) + (m_low - m_low_new), BASE_2, PRECISE_EXP)
            m_low = m_low_new
        else:
            p = _exp(scores - m_new_safe[:, None], BASE_2, PRECISE_EXP)
            alpha = _exp(m_i - m_new_safe, BASE_2, PRECISE_EXP)
        l_i = l_i * alpha
        l_comp = l_comp * alpha
        row_sum = tl.sum(p, 1) - l_comp
        l_new = l_i + row_sum
        l_comp = (l_new - l_i) - row_sum
        l_i = l_new
        v = _load_tile(v_head + (row * stride_vb + slot * stride_vn)[:, None], col_ok, d_ok, False, EVEN_D)
        acc = acc * alpha[:, None]
        if COMPENSATE:
            comp = comp * alpha[:, None]
        acc, comp = _accumulate_dot(acc, comp, p.to(v.dtype), v, DOT_PRECISION, COMPENSATE)
        m_i = m_new

    if SINGLE_SPLIT:
        out, lse, lse_low = _finish_rows(m_i, l_i, acc, BASE_2, PRECISE_EXP, COMPENSATE)
        rows_in_all_heads = tl.num_programs(2).to(tl.int64) * n_q_heads * n_queries
        _store_rows(Out, Lse, LseLow, out, lse, lse_low, m_low, batch, heads, queries, row_ok, offs_d, d_ok,
                    stride_ob, stride_oh, stride_om, stride_od, n_q_heads, n_queries, rows_in_all_heads,
                    COMPENSATE)  # fmt: skip
    else:
        n_rows = kv_group * n_queries
        slot = ((batch.to(tl.int64) * tl.num_programs(1) + kv_head) * n_splits + split) * n_rows + rows
        tl.store(
            Partial + slot[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :]
        )
        stats_plane = tl.num_programs(2).to(tl.int64) * tl.num_programs(1) * n_splits * n_rows
        tl.store(PartialStats + slot, m_i, mask=row_ok)
        tl.store(PartialStats + stats_plane + slot, l_i, mask=row_ok)
        if COMPENSATE:
            tl.store(PartialStats + 2 * stats_plane + slot, m_low, mask=row_ok)


@triton.jit
def _read_splits(Partial, PartialStats, first_slot, first_split, n_splits, n_rows, stats_plane, offs_s,
                 offs_d, d_ok, HEAD_DIM: tl.constexpr, COMPENSATE: tl.constexpr,
                 PARTIALS: tl.constexpr):  # fmt: skip
    """BLOCK_S splits of one row from first_split on: their max, sum and (COMPENSATE) the max's low part,
    and (PARTIALS) their accumulators (BLOCK_S, BLOCK_D); what is not read is 0. Splits past n_splits
    read as empty (m -inf, l 0, zero accumulator)."""
    splits = first_split + offs_s
    split_ok = splits < n_splits
    slots = first_slot + splits.to(tl.int64) * n_rows
    m_split = tl.load(PartialStats + slots, mask=split_ok, other=float("-inf"))
    l_split = 0.0
    low_split = 0.0
    part = 0.0
    if COMPENSATE:
        low_split = tl.load(PartialStats + 2 * stats_plane + slots, mask=split_ok, other=0.0)
    if PARTIALS:
        l_split = tl.load(PartialStats + stats_plane + slots, mask=split_ok, other=0.0)
        part = tl.load(
            Partial + slots[:, None] * HEAD_DIM + offs_d[None, :],
            mask=split_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
    return m_split, l_split, low_split, part


@triton.jit
def _weighted_sums(m_split, l_split, low_split, part, m_safe, m_low, COMPENSATE: tl.constexpr,
                   BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr):  # fmt: skip
    """In float64, a block of splits' contributions to a row's sum and accumulator: each split weighted
    by exp(m_s - m) (0 for splits that saw no key, m_s = -inf), summed over the block in a fixed tree."""
    exponent = m_split.to(tl.float64) - m_safe
    if COMPENSATE:
        exponent += (low_split - m_low).to(tl.float64)
    weight = _exp(exponent, BASE_2, PRECISE_EXP)
    total = tl.sum(weight * l_split.to(tl.float64), 0, keep_dims=True)
    acc = tl.sum(weight[:, None] * part.to(tl.float64), 0, keep_dims=True)
    return total, acc


@triton.jit(do_not_specialize=["n_queries", "n_splits"])
def decode_merge_kernel(
    Partial, PartialStats, Out, Lse, LseLow,
    stride_ob, stride_oh, stride_om, stride_od,
    n_q_heads, kv_group, n_queries, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ONE_READ: tl.constexpr,
    COMPENSATE: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    WAIT_FOR_SPLITS: tl.constexpr,
):  # fmt: skip
    """Merge the splits of one query row of (batch, KV head). Grid (kv_group * Nq, Hkv, B).
    WAIT_FOR_SPLITS: launched before the split kernel ends (programmatic dependent launch,
    config.OVERLAP_MERGE_FROM_SPLITS), so it waits for that grid's completion and writes (griddepcontrol.wait)
    before its first read.

    Pointers: Partial, PartialStats as decode_split_kernel writes them; Out, Lse, LseLow as its
    SINGLE_SPLIT ones. BLOCK_S splits are read at once (a tile of partials, vectors of statistics): a
    loop with one dependent load per split was a chain of memory latencies, the longest part of a
    one-sequence decode step. ONE_READ (n_splits <= BLOCK_S, the usual case): statistics and partials
    come in one read. Otherwise one pass over the blocks finds the row max, a second one sums.

    In float64, from float32 partials: the row max m is the largest split max (exact), each split's
    weight exp(m_s - m) (with the max's low parts for float32), L = sum of weighted sums, out =
    sum of weighted accumulators / L, LSE = m + log L rounded once, its low part what that rounding
    lost. The low parts then mean what the portable forward's do (m + log l = LSE + low exactly, up
    to float32's rounding of the low part itself), so the shared backward can consume them. The sums
    run in a fixed order (a fixed tree within each BLOCK_S splits, the blocks in split order): the
    merge is deterministic, and one read sums exactly as a single block of the two-pass loop.
    """
    if WAIT_FOR_SPLITS:
        tl.extra.cuda.gdc_wait()
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    # One row, as one-element vectors (the stores are the split kernel's, for tiles of rows).
    _rows, heads, queries, row_ok = _tile_rows(tl.program_id(0), kv_head, kv_group, n_queries, 1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_rows = kv_group * n_queries
    first_slot = (batch.to(tl.int64) * tl.num_programs(1) + kv_head) * n_splits * n_rows + tl.program_id(0)
    stats_plane = tl.num_programs(2).to(tl.int64) * tl.num_programs(1) * n_splits * n_rows

    # Each lane keeps the max of its splits (and the max's low part: that of the split holding it, the
    # largest among ties); the row's are then the lanes' max and the largest low part of a lane at it.
    if ONE_READ:
        m_lanes, l_split, low_lanes, part = _read_splits(
            Partial, PartialStats, first_slot, 0, n_splits, n_rows, stats_plane, offs_s, offs_d, d_ok,
            HEAD_DIM, COMPENSATE, True,
        )  # fmt: skip
    else:
        m_lanes = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
        low_lanes = tl.zeros([BLOCK_S], dtype=tl.float32)
        for first_split in range(0, n_splits, BLOCK_S):
            m_split, _sums, low_split, _partials = _read_splits(
                Partial, PartialStats, first_slot, first_split, n_splits, n_rows, stats_plane, offs_s,
                offs_d, d_ok, HEAD_DIM, COMPENSATE, False,
            )  # fmt: skip
            if COMPENSATE:
                low_lanes = tl.where(
                    m_split > m_lanes,
                    low_split,
                    tl.where(m_split == m_lanes, tl.maximum(low_lanes, low_split), low_lanes),
                )
            m_lanes = tl.maximum(m_lanes, m_split)
    m = tl.max(m_lanes, 0, keep_dims=True)
    m_low = tl.max(tl.where(m_lanes == m, low_lanes, float("-inf")), 0, keep_dims=True)
    m_safe = tl.where(m == float("-inf"), 0.0, m).to(tl.float64)
    m_low = tl.where(m == float("-inf"), 0.0, m_low)

    if ONE_READ:
        total, acc = _weighted_sums(
            m_lanes, l_split, low_lanes, part, m_safe, m_low, COMPENSATE, BASE_2, PRECISE_EXP
        )
    else:
        total = tl.zeros([1], dtype=tl.float64)
        acc = tl.zeros([1, BLOCK_D], dtype=tl.float64)
        for first_split in range(0, n_splits, BLOCK_S):
            m_split, l_split, low_split, part = _read_splits(
                Partial, PartialStats, first_slot, first_split, n_splits, n_rows, stats_plane, offs_s,
                offs_d, d_ok, HEAD_DIM, COMPENSATE, True,
            )  # fmt: skip
            block_total, block_acc = _weighted_sums(
                m_split, l_split, low_split, part, m_safe, m_low, COMPENSATE, BASE_2, PRECISE_EXP
            )
            total += block_total
            acc += block_acc

    sees_a_key = total > 0.0
    total_safe = tl.where(sees_a_key, total, 1.0)
    # Rounded to float32 first, then to the output dtype as every other kernel rounds its float32 result
    # (the interpreter's float64 -> bf16 cast is not the GPU's rounding; core._runtime patches float32's).
    out = tl.where(sees_a_key[:, None], acc / total_safe[:, None], 0.0).to(tl.float32)
    log_total = _log(total_safe, BASE_2, PRECISE_EXP)
    lse = tl.where(sees_a_key, (m_safe + log_total).to(tl.float32), float("-inf"))
    lse_low = tl.where(sees_a_key, ((m_safe - lse.to(tl.float64)) + log_total).to(tl.float32), 0.0)
    if not COMPENSATE:
        lse_low = tl.where(tl.abs(lse) < LOW_PART_NEGLIGIBLE_BELOW, 0.0, lse_low)
    rows_in_all_heads = tl.num_programs(2).to(tl.int64) * n_q_heads * n_queries
    _store_rows(Out, Lse, LseLow, out, lse, lse_low, m_low, batch, heads, queries, row_ok, offs_d, d_ok,
                stride_ob, stride_oh, stride_om, stride_od, n_q_heads, n_queries, rows_in_all_heads,
                COMPENSATE)  # fmt: skip


@triton.jit
def _append_rows(New, Cache, batch, kv_head, tokens, row, slot, ok, offs_d, d_ok, stride_nb, stride_nh,
                 stride_nn, stride_nd, stride_b, stride_h, stride_n, stride_d):  # fmt: skip
    """Copy rows `tokens` of one head of New into its cache at (row, slot) (where ok)."""
    source = (
        New + batch.to(tl.int64) * stride_nb + kv_head.to(tl.int64) * stride_nh
        + tokens.to(tl.int64)[:, None] * stride_nn + offs_d[None, :] * stride_nd
    )  # fmt: skip
    target = (
        Cache + kv_head.to(tl.int64) * stride_h + (row * stride_b + slot * stride_n)[:, None]
        + offs_d[None, :] * stride_d
    )  # fmt: skip
    mask = ok[:, None] & d_ok[None, :]
    tl.store(target, tl.load(source, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["capacity", "fixed_seqlen", "n_new"])
def kvcache_append_kernel(
    KNew, VNew, KCache, VCache, SeqLens, BlockTable, CacheBatch,
    stride_knb, stride_knh, stride_knn, stride_knd,
    stride_vnb, stride_vnh, stride_vnn, stride_vnd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_seqlens, stride_table_b, stride_table_p, stride_cache_batch,
    capacity, fixed_seqlen, n_new,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    SEQLENS_IN_TENSOR: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    CACHE_BATCH_INDEX: tl.constexpr,
):  # fmt: skip
    """Write the new keys and values of sequence b into its cache at positions cached_b, cached_b + 1,
    ... (dense rows or pages, as the split kernel reads them), bit for bit. Positions past the cache
    are not written. Grid (cdiv(n_new, BLOCK_T), Hkv, B)."""
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if SEQLENS_IN_TENSOR:
        cached = tl.load(SeqLens + batch.to(tl.int64) * stride_seqlens)
    else:
        cached = fixed_seqlen
    positions = cached + tokens
    ok = (tokens < n_new) & (positions >= 0) & (positions < capacity)
    if CACHE_BATCH_INDEX:
        cache_batch = tl.load(CacheBatch + batch.to(tl.int64) * stride_cache_batch)
    else:
        cache_batch = batch
    row, slot = _key_places(positions, ok, 0, batch, cache_batch, BlockTable, stride_table_b, stride_table_p,
                            PAGED, PAGE_SIZE, False)  # fmt: skip
    _append_rows(KNew, KCache, batch, kv_head, tokens, row, slot, ok, offs_d, d_ok, stride_knb, stride_knh,
                 stride_knn, stride_knd, stride_kb, stride_kh, stride_kn, stride_kd)  # fmt: skip
    _append_rows(VNew, VCache, batch, kv_head, tokens, row, slot, ok, offs_d, d_ok, stride_vnb, stride_vnh,
                 stride_vnn, stride_vnd, stride_vb, stride_vh, stride_vn, stride_vd)  # fmt: skip
