"""The backward kernels, FlashAttention-2 style and free of atomics.

Three launches:
1. `backward_preprocess_kernel`: Delta_i = sum_d dO_id * O_id - dLSE_i, one float per query row (for
   float32 inputs, and fp16/bf16 ones whose LSE has a gradient, only the -dLSE_i term).
2. `backward_dq_kernel`: one program owns BLOCK_M query rows and streams the keys they see, accumulating
   dQ; in those two cases it first streams them once more to complete Delta_i with sum_j P_ij dP_ij.
3. `backward_dkdv_kernel`: one program owns BLOCK_N keys of one key/value head and streams every query
   row (of every query head in its GQA group) that can see them, accumulating dK and dV in registers.

Every gradient element is summed by exactly one program in a fixed order, so results are bitwise
identical from run to run (no atomics, unlike FlashAttention-2's dQ and cuDNN).

Probabilities are recomputed as P = exp2(S * qk_scale - LSE2) from the forward's saved LSE, in the
forward's base (natural for float32: P = exp(S * sm_scale - LSE), see forward.py): no division,
and no N x N buffer. A row that saw no key has LSE = -inf; it is read as +inf so its P is
exp2(-inf) = 0 and all its gradients are 0. Rows past Nq are read with LSE = +inf for the same reason,
so they need no mask. Keys past Nk load as zeros, which is harmless for dK/dV (those rows are never
stored) but not for dQ: their P = exp2(0 - LSE2) overflows to inf once a row's LSE2 < -128 (found by
the fuzzer), and inf * 0 is NaN. So the dQ kernel, like the forward, masks the ragged last key block
together with the causal diagonal.

dS here is the gradient with respect to the *scaled* scores, dS = P * (dP - Delta), so dQ and dK pick
up the factor sm_scale once at the end. With logit softcapping (SOFTCAP) P is the softmax of the capped
scores softcap * tanh(s / softcap), and dS picks up the tanh's derivative 1 - tanh^2, recomputed from the
raw score (core.kernels.shared._softcapped_scores).

The kernels share the forward's switches (forward.py: attention_forward_kernel): WINDOW (a sliding
window: each program visits only the blocks its window reaches, the edges masked), SOFTCAP, and VARLEN
(packed sequences, the per-row statistics laid out (Hq, total_q), programs past their sequence's end
returning at once). Off, the kernels are the plain ones.

The row statistics (PADDED_STATS, every call): the preprocess copies the ones the dQ and dK/dV kernels
read (the LSE, its low parts, Delta) into a padded buffer in which each sequence's (each (batch,
head)'s) rows start at a multiple of STATS_ROW_PAD and its last query block is padded, and the other
two kernels read them there only (_padded_stat_rows lays the copy out). A packed sequence starts
anywhere and a ragged Nq ends mid-block, so the dK/dV kernel could load those rows' statistics in place
only with masks and per-element predicates, a third of its D=128 loop (docs/perf-notes.md); from the
copy every query block is whole and aligned. The padding reads as rows that see no key (LSE +inf, low
parts and Delta 0, so their P is 0), and a -inf LSE is copied as +inf once per row, so the dK/dV
kernel's loads need neither masks nor the -inf map in its loop, whatever Nq is. Only Q and dO depend
on Nq there: unmasked where every query block is whole (WHOLE_QUERY_BLOCKS), else masked.
"""

import triton
import triton.language as tl

from core.kernels.shared import (
    _accumulate_dot,
    _dot_parts,
    _exp,
    _head_rows,
    _in_window,
    _load_cols,
    _load_rows,
    _load_tile,
    _scores,
    _sequence,
    _softcapped_scores,
    _two_sum,
    _window_key_blocks,
    _window_query_blocks,
)

LOG2E = tl.constexpr(1.4426950408889634)
# Rows of the LSE's low part that the dK/dV kernel checks per step before choosing its loop.
LOW_PART_SCAN_BLOCK = tl.constexpr(1024)
# Each sequence's rows in the padded copy of the row statistics (PADDED_STATS) start at a multiple of
# this: a multiple of every BLOCK_M of the dK/dV kernel and of the preprocess (config.py; the kernels
# assert it), so each query block of the copy is whole and aligned.
STATS_ROW_PAD = tl.constexpr(128)


@triton.jit
def _padded_stat_rows(head, batch, q_start, n_q_heads, n_queries, VARLEN: tl.constexpr):
    """(first, plane): where the padded copy of the row statistics (PADDED_STATS) holds row 0 of this
    head's rows of sequence `batch`, and the rows of one of its planes. n_queries: Nq (dense) or the
    packed total (VARLEN, whose sequence b starts at packed row q_start).

    Dense: (B, Hq, Nq rounded up to STATS_ROW_PAD) (plans.BackwardPlan.padded_rows). VARLEN: (Hq, rows)
    with sequence b's rows from STATS_ROW_PAD * (b + q_start // STATS_ROW_PAD): a multiple of
    STATS_ROW_PAD, at least the previous one's start plus that one's length rounded up to STATS_ROW_PAD
    (so even a sequence without queries has a block of rows, which a prefetch may read and not use),
    and found without summing the earlier lengths. A head's rows end by
    STATS_ROW_PAD * (sequences + total_q // STATS_ROW_PAD) (plans.padded_stat_rows, the host's size of
    the buffer, from shapes alone)."""
    if VARLEN:
        rows_per_head = (tl.num_programs(2).to(tl.int64) + n_queries // STATS_ROW_PAD) * STATS_ROW_PAD
        sequence_start = (batch + q_start // STATS_ROW_PAD).to(tl.int64) * STATS_ROW_PAD
        return head.to(tl.int64) * rows_per_head + sequence_start, rows_per_head * n_q_heads
    else:
        rows_per_head = tl.cdiv(n_queries, STATS_ROW_PAD).to(tl.int64) * STATS_ROW_PAD
        first = (batch.to(tl.int64) * n_q_heads + head) * rows_per_head
        return first, tl.num_programs(2).to(tl.int64) * n_q_heads * rows_per_head


@triton.jit
def _write_padded_stats(Lse, LseLow, Delta, offsets, plane, real, lse, lse_low, max_low, delta,
                        TWO_PART: tl.constexpr):  # fmt: skip
    """Store a block of rows of the padded copy of the row statistics (PADDED_STATS): where `real`, the
    values (lse with -inf already read as +inf), elsewhere padding, a row that sees no key (LSE +inf,
    low parts and Delta 0). TWO_PART (float32): plane [1] of LseLow (the max's low part) and of Delta
    (its low part, 0 here: the dQ kernel writes it for the real rows) too, `plane` rows in."""
    tl.store(Lse + offsets, tl.where(real, lse, float("inf")))
    tl.store(LseLow + offsets, tl.where(real, lse_low, 0.0))
    tl.store(Delta + offsets, tl.where(real, delta, 0.0))
    if TWO_PART:
        tl.store(LseLow + plane + offsets, tl.where(real, max_low, 0.0))
        tl.store(Delta + plane + offsets, tl.zeros_like(delta))


@triton.jit(do_not_specialize=["n_queries"])
def backward_preprocess_kernel(
    Out, dOut, dLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_q_heads, n_queries, CuSeqlensQ, Lse, LseLow, PaddedLse, PaddedLseLow,
    HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr, BASE_2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DELTA_IN_DQ: tl.constexpr, VARLEN: tl.constexpr,
    PADDED_STATS: tl.constexpr,
):  # fmt: skip
    """Delta[b, h, i] = sum_d dOut * Out - dLse * (log2(e) if BASE_2 else 1) (float32); with DELTA_IN_DQ
    only the dLse term, which the dQ kernel completes with sum_j P_ij dP_ij (see backward_dq_kernel).

    Out, dOut (B, Hq, Nq, HEAD_DIM), any strides. dLse (B, Hq, Nq) and Delta (1 or 2, B, Hq, Nq: its
    second plane is the dQ kernel's, for float32) float32, contiguous; this writes Delta[0]. dLse is
    the gradient of the kernels' LSE (base 2 when BASE_2) and only read when HAS_DLSE. Since
    d(LSE2)/dS_ij = log2(e) * P_ij (S the naturally scaled scores), the LSE's gradient folds into Delta.

    The row sums are the diagonal of the dot dO @ O^T, not an elementwise product and tl.sum: the
    backward's dS = P * (dP - Delta) then cancels exactly where it must. A one-hot row (a peaky softmax)
    has O = v_j, and its dP_ij = dO_i . v_j is the same dot of the same numbers, so dP_ij - Delta_i is
    exactly 0, as it is in eager attention; a tree sum differs from the dot in the last bits, and
    sm_scale (1e4, say) multiplied that noise into dq and dk (found by the fuzzer: 6.6x the bound in
    float16). The extra BLOCK_M x BLOCK_M x D dot per tile is a few percent of the backward's flops at
    N = 1k and vanishes at longer N. Grid: (cdiv(Nq, BLOCK_M), Hq, B). VARLEN: packed sequences as in
    the forward (Out, dOut (total_q, Hq, HEAD_DIM), dLse and each Delta plane (Hq, total_q), n_queries
    the packed total).

    PADDED_STATS (the split backward's every call): Delta goes to the padded copy of the row statistics
    instead (Delta: its planes), with a copy of the forward's Lse and LseLow (laid out as dLse, LseLow
    with its planes) into PaddedLse and PaddedLseLow, the last block of each sequence's rows padded
    (_write_padded_stats). Every dK/dV BLOCK_M divides this BLOCK_M (plans.py asserts it), so each
    block the dK/dV kernel reads is written. Off (the fused backward, which reads the statistics in
    place), Lse, LseLow and the padded planes are not read.
    """
    head = tl.program_id(1)
    batch = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    packed_queries = n_queries
    q_start: tl.constexpr = 0  # a plain call's (a constexpr: `= 0` would put a constant into the IR)
    if VARLEN:
        q_start, n_queries = _sequence(CuSeqlensQ, batch)
        if tl.program_id(0) * BLOCK_M >= n_queries:
            return
        Out += q_start.to(tl.int64) * stride_om  # batch stride 0: as in the forward kernel
        dOut += q_start.to(tl.int64) * stride_dom
    if DELTA_IN_DQ:
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        mask = (rows < n_queries)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(
            Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
            + rows.to(tl.int64)[:, None] * stride_om + offs_d[None, :] * stride_od,
            mask=mask, other=0.0,
        )  # fmt: skip
        do = tl.load(
            dOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
            + rows.to(tl.int64)[:, None] * stride_dom + offs_d[None, :] * stride_dod,
            mask=mask, other=0.0,
        )  # fmt: skip
        on_diagonal = rows[:, None] == rows[None, :]
        products = tl.dot(do, tl.trans(o), input_precision=DOT_PRECISION)
        delta = tl.sum(tl.where(on_diagonal, products, 0.0), axis=1)
    if VARLEN:
        row_offsets = head.to(tl.int64) * packed_queries + q_start + rows
    else:
        row_offsets = (batch.to(tl.int64) * n_q_heads + head) * n_queries + rows
    if HAS_DLSE:
        dlse = tl.load(dLse + row_offsets, mask=rows < n_queries, other=0.0)
        if BASE_2:
            dlse = dlse * LOG2E
        delta -= dlse
    if PADDED_STATS:
        tl.static_assert(STATS_ROW_PAD % BLOCK_M == 0)
        TWO_PART: tl.constexpr = Out.dtype.element_ty == tl.float32
        if VARLEN:
            low_plane = packed_queries.to(tl.int64) * n_q_heads
        else:
            low_plane = tl.num_programs(2).to(tl.int64) * n_q_heads * n_queries
        row_ok = rows < n_queries
        lse = tl.load(Lse + row_offsets, mask=row_ok, other=0.0)
        # A -inf LSE (a row that saw no key) is copied as +inf, once, for the dQ and dK/dV kernels' loads.
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        lse_low = tl.load(LseLow + row_offsets, mask=row_ok, other=0.0)
        max_low = tl.zeros_like(lse_low)
        if TWO_PART:
            max_low = tl.load(LseLow + low_plane + row_offsets, mask=row_ok, other=0.0)
        first, plane = _padded_stat_rows(head, batch, q_start, n_q_heads, packed_queries, VARLEN)
        _write_padded_stats(
            PaddedLse, PaddedLseLow, Delta, first + rows, plane, row_ok, lse, lse_low, max_low, delta,
            TWO_PART,
        )  # fmt: skip
    else:
        tl.store(Delta + row_offsets, delta, mask=rows < n_queries)


@triton.jit
def _load_row_values(ptrs, row_ok, other: tl.constexpr, WHOLE_BLOCK: tl.constexpr):
    """One float per query row; rows past Nq read `other`. A WHOLE_BLOCK has none, so it loads unmasked."""
    if WHOLE_BLOCK:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=row_ok, other=other)


@triton.jit
def _load_row_stats(Lse, LseLow, Delta, row_offsets, row_ok, rows_in_all_heads, TWO_PART_MAX: tl.constexpr,
                    LOAD_LOW: tl.constexpr = True, WHOLE_BLOCK: tl.constexpr = False,
                    NO_MINUS_INF: tl.constexpr = False):  # fmt: skip
    """The saved LSE (+inf for rows past Nq or that saw no key, so their P is 0), its low part (0 unless
    LOAD_LOW), the max's low part (TWO_PART_MAX, float32; else 0) and Delta. Plane [1] of LseLow starts
    rows_in_all_heads in. WHOLE_BLOCK: every row is below Nq (or a padded copy's), row_ok is not read.
    NO_MINUS_INF: no LSE is -inf (the padded copy's, which the split backward's kernels read), so none
    is mapped to +inf; the fused backward reads the forward's in place and maps them."""
    lse = _load_row_values(Lse + row_offsets, row_ok, float("inf"), WHOLE_BLOCK)
    if not NO_MINUS_INF:
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
    if LOAD_LOW:
        lse_low = _load_row_values(LseLow + row_offsets, row_ok, 0.0, WHOLE_BLOCK)
    else:
        lse_low = tl.zeros_like(lse)
    if TWO_PART_MAX:
        max_low = _load_row_values(LseLow + rows_in_all_heads + row_offsets, row_ok, 0.0, WHOLE_BLOCK)
    else:
        max_low = tl.zeros_like(lse_low)
    delta = _load_row_values(Delta + row_offsets, row_ok, 0.0, WHOLE_BLOCK)
    return lse, lse_low, max_low, delta


@triton.jit
def _whole_block_offsets(stat_offset, start, offs_m, BLOCK_M: tl.constexpr):
    """Offsets of rows [start, start + BLOCK_M) of a row statistic, stat_offset the head's (or padded
    sequence's) first, every row of the block inside its rows: stat_offset and start are multiples of
    BLOCK_M (the statistics are the padded copy, or in place with Nq a multiple of BLOCK_M: the fused
    backward), marked so the compiler loads the rows as aligned vectors. (Written as
    stat_offset + (start + offs_m): the other association made ptxas serialize the D=128 kernel's
    wgmmas, C7515.)"""
    return tl.max_contiguous(tl.multiple_of(stat_offset + (start + offs_m), BLOCK_M), BLOCK_M)


@triton.jit
def _last_padded_block(n_queries, BLOCK_M: tl.constexpr):
    """The first row of the last query block a padded copy holds for n_queries rows (0 for none: a
    sequence without queries, whose copy has STATS_ROW_PAD rows before the next one's)."""
    return tl.maximum(tl.cdiv(n_queries, BLOCK_M) - 1, 0) * BLOCK_M


@triton.jit
def _dp_minus_delta(dp, dp_low, delta, delta_low, TWO_PART: tl.constexpr, LOW_DELTA: tl.constexpr = False):
    """dP - Delta (broadcast), and with TWO_PART (float32) with both low parts: (dp - delta) is exact where
    it matters (a nearly one-hot row, dp close to delta), so the difference keeps float32 precision
    relative to itself rather than to dp (see backward_dq_kernel).

    LOW_DELTA (fp16/bf16 with the Delta pass): dP - (delta + delta_low), dP in one part, rounded once.
    TwoSum splits dp - delta into its rounded value and the exact error of that rounding, and the low
    part joins the error before the one final addition. Two keys of equal P get exactly opposite
    differences, as the exact ones are, so their dS cancel in dq exactly (see backward_dq_kernel)."""
    if TWO_PART:
        return (dp - delta) + (dp_low - delta_low)
    elif LOW_DELTA:
        difference, error = _two_sum(dp, -delta)
        return difference + (error - delta_low)
    else:
        return dp - delta


@triton.jit
def _nonzero_count(LseLow, row_offset, row_start, row_end, BLOCK: tl.constexpr):
    """How many of LseLow[row_offset + row_start : row_offset + row_end] are not exactly 0 (NaN counts)."""
    count = 0
    for start in range(row_start, row_end, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        low = tl.load(LseLow + row_offset + rows, mask=rows < row_end, other=0.0)
        count += tl.sum((low != 0.0).to(tl.int32), 0)
    return count


@triton.jit
def _probabilities(scores, scores_low, lse, lse_low, max_low, use_lse_low, BASE_2: tl.constexpr,
                   PRECISE_EXP: tl.constexpr, TWO_PART_SCORES: tl.constexpr):  # fmt: skip
    """P = exp(scores - LSE), the forward's probabilities recomputed from the score tile (_scores, as the
    forward computed it) and the saved LSE parts (broadcast to the tile's shape), with its exponent:

        exp(((s - lse) + (s_low - m_low)) - lse_low)     (the exact sum is s + s_low - m - m_low - log l)

    s - lse is exact where P matters (scores near the LSE); the low parts go in after it, so a row whose
    logits are beyond 2^24 still gets its log(l), and a row tied between two keys gets exactly the
    forward's exponent -log(2) for each. TWO_PART_SCORES (float32) adds the scores' low parts (what the
    dot and the scale lost) less the max's, so P keeps float32 precision however large the logits.
    Where use_lse_low is false the caller has found every lse_low of the rows 0: subtracting them would
    change no bit, so the dK/dV kernel skips the subtraction (see backward_dkdv_kernel)."""
    exponent = scores - lse
    if TWO_PART_SCORES:
        exponent += scores_low - max_low
    if use_lse_low:
        exponent -= lse_low
    return _exp(exponent, BASE_2, PRECISE_EXP)


@triton.jit
def _dkdv_from_query_blocks(
    dk, dv, dk_comp, dv_comp, k, v, q_src, do_src, Lse, LseLow, Delta, stat_offset, rows_in_all_heads,
    stride_qm, stride_dom, row_start, row_end, keys, n_queries, diagonal, qk_scale, d_ok,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    use_lse_low, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr, COMPENSATE: tl.constexpr,
    DESCRIPTORS: tl.constexpr, PREFETCH_ROW_STATS: tl.constexpr, WHOLE_QUERY_BLOCKS: tl.constexpr,
    window_left=0, window_right=0, softcap_in=0.0, softcap_out=0.0,
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):  # fmt: skip
    """Add the contributions of query rows [row_start, row_end) to one tile's dK and dV.

    Works on transposed tiles (keys along the rows) so that dK and dV come out of plain dots.
    q_src/do_src are tensor descriptors of this head's Q and dO (DESCRIPTORS), or pointer tiles at
    row_start: Q^T (BLOCK_D, BLOCK_M) and dO (BLOCK_M, BLOCK_D).
    MASKED applies the causal rule (the diagonal blocks), or with WINDOW the window's (its edges); other
    blocks are fully visible. SOFTCAP multiplies dS by the capped scores' slope.
    PREFETCH_ROW_STATS loads each block's LSE and Delta one step ahead, in registers: Triton's pipeliner
    leaves these one-float-per-row loads in the step that uses them (it pays at D=64 with three stages,
    not at D=128: config.py). The statistics load whole and aligned, unmasked and without the -inf map,
    from the padded copy (stat_offset a multiple of STATS_ROW_PAD); Q and dO load unmasked where
    WHOLE_QUERY_BLOCKS (Nq a multiple of BLOCK_M), else masked at Nq.
    """
    offs_m = tl.arange(0, BLOCK_M)
    last_start = _last_padded_block(n_queries, BLOCK_M)
    if PREFETCH_ROW_STATS:
        # From a start kept inside the rows (the copy's, padding included): the step after the last
        # reloads a block it never uses.
        first_start = tl.minimum(row_start, last_start)
        next_lse, next_lse_low, next_max_low, next_delta = _load_row_stats(
            Lse, LseLow, Delta, _whole_block_offsets(stat_offset, first_start, offs_m, BLOCK_M), None,
            rows_in_all_heads, COMPENSATE, use_lse_low, True, True,
        )  # fmt: skip
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + offs_m
        row_ok = rows < n_queries
        qT = _load_cols(q_src, block_start, d_ok, row_ok, EVEN_D, WHOLE_QUERY_BLOCKS, DESCRIPTORS)
        do = _load_rows(do_src, block_start, row_ok, d_ok, WHOLE_QUERY_BLOCKS, EVEN_D, DESCRIPTORS)
        if PREFETCH_ROW_STATS:
            lse, lse_low, max_low, delta = next_lse, next_lse_low, next_max_low, next_delta
            next_start = tl.minimum(block_start + BLOCK_M, last_start)
            next_lse, next_lse_low, next_max_low, next_delta = _load_row_stats(
                Lse, LseLow, Delta, _whole_block_offsets(stat_offset, next_start, offs_m, BLOCK_M), None,
                rows_in_all_heads, COMPENSATE, use_lse_low, True, True,
            )  # fmt: skip
        else:
            lse, lse_low, max_low, delta = _load_row_stats(
                Lse, LseLow, Delta, _whole_block_offsets(stat_offset, block_start, offs_m, BLOCK_M), None,
                rows_in_all_heads, COMPENSATE, use_lse_low, True, True,
            )  # fmt: skip
        if SOFTCAP:
            scores_t, scores_low_t, slope_t = _softcapped_scores(
                k, qT, softcap_in, softcap_out, DOT_PRECISION, COMPENSATE
            )
        else:
            scores_t, scores_low_t = _scores(k, qT, qk_scale, DOT_PRECISION, COMPENSATE)
        pT = _probabilities(
            scores_t, scores_low_t, lse[None, :], lse_low[None, :], max_low[None, :], use_lse_low, BASE_2,
            PRECISE_EXP, COMPENSATE,
        )  # fmt: skip
        if MASKED:
            if WINDOW:
                pT = tl.where(
                    _in_window(keys[:, None], rows[None, :], diagonal, window_left, window_right), pT, 0.0
                )
            else:
                pT = tl.where(keys[:, None] <= rows[None, :] + diagonal, pT, 0.0)
        dv, dv_comp = _accumulate_dot(dv, dv_comp, pT.to(do.dtype), do, DOT_PRECISION, COMPENSATE)
        dpT, dpT_low = _dot_parts(v, tl.trans(do), DOT_PRECISION, COMPENSATE)
        if COMPENSATE:
            delta_low = tl.load(Delta + rows_in_all_heads + stat_offset + rows)
        else:
            delta_low = delta
        dsT = pT * _dp_minus_delta(dpT, dpT_low, delta[None, :], delta_low[None, :], COMPENSATE)
        if SOFTCAP:
            dsT = dsT * slope_t
        dk, dk_comp = _accumulate_dot(dk, dk_comp, dsT.to(qT.dtype), tl.trans(qT), DOT_PRECISION, COMPENSATE)
        if not DESCRIPTORS:
            q_src += BLOCK_M * stride_qm
            do_src += BLOCK_M * stride_dom
    return dk, dv, dk_comp, dv_comp


@triton.jit
def _dkdv_from_group(
    dk, dv, dk_comp, dv_comp, k, v, Q, dOut, Lse, LseLow, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_dob, stride_doh, stride_dom, stride_dod,
    batch, first_head, kv_group, n_q_heads, rows_in_all_heads, row_start, unmasked_start, keys, n_queries,
    diagonal, qk_scale, d_ok, offs_d, q_start, packed_queries, unmasked_end, row_end, window_left,
    window_right, softcap_in, softcap_out,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    COMPENSATE: tl.constexpr, USE_LSE_LOW: tl.constexpr, DESCRIPTORS: tl.constexpr,
    PREFETCH_ROW_STATS: tl.constexpr, WHOLE_QUERY_BLOCKS: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """Add every query row of the kv_group query heads from first_head on that sees these keys: those
    straddling the causal diagonal, [row_start, unmasked_start), masked; those after it unmasked. With
    WINDOW: rows [unmasked_start, unmasked_end) unmasked between the window's two edges,
    [row_start, unmasked_start) and [unmasked_end, row_end), masked (shared._window_query_blocks)."""
    offs_m = tl.arange(0, BLOCK_M)
    for group_member in range(0, kv_group):
        head = first_head + group_member
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = dOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        if DESCRIPTORS:
            q_src = _head_rows(q_base, n_queries, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D)
            do_src = _head_rows(do_base, n_queries, stride_dom, HEAD_DIM, BLOCK_M, BLOCK_D)
        else:
            q_src = (
                q_base + row_start.to(tl.int64) * stride_qm + offs_d[:, None] * stride_qd
                + offs_m[None, :] * stride_qm
            )  # fmt: skip
            do_src = (
                do_base + row_start.to(tl.int64) * stride_dom + offs_m[:, None] * stride_dom
                + offs_d[None, :] * stride_dod
            )  # fmt: skip
        stat_offset, _ = _padded_stat_rows(head, batch, q_start, n_q_heads, packed_queries, VARLEN)
        if WINDOW:
            dk, dv, dk_comp, dv_comp = _dkdv_from_query_blocks(
                dk, dv, dk_comp, dv_comp, k, v, q_src, do_src, Lse, LseLow, Delta, stat_offset,
                rows_in_all_heads, stride_qm, stride_dom, row_start, unmasked_start, keys, n_queries,
                diagonal, qk_scale, d_ok, True, EVEN_D, BLOCK_M, DOT_PRECISION, USE_LSE_LOW, BASE_2,
                PRECISE_EXP, COMPENSATE, DESCRIPTORS, PREFETCH_ROW_STATS, WHOLE_QUERY_BLOCKS, window_left,
                window_right, softcap_in, softcap_out, True, SOFTCAP,
            )  # fmt: skip
            q_whole = _rows_from(q_src, unmasked_start - row_start, stride_qm, DESCRIPTORS)
            do_whole = _rows_from(do_src, unmasked_start - row_start, stride_dom, DESCRIPTORS)
            dk, dv, dk_comp, dv_comp = _dkdv_from_query_blocks(
                dk, dv, dk_comp, dv_comp, k, v, q_whole, do_whole, Lse, LseLow, Delta, stat_offset,
                rows_in_all_heads, stride_qm, stride_dom, unmasked_start, unmasked_end, keys, n_queries,
                diagonal, qk_scale, d_ok, False, EVEN_D, BLOCK_M, DOT_PRECISION, USE_LSE_LOW, BASE_2,
                PRECISE_EXP, COMPENSATE, DESCRIPTORS, PREFETCH_ROW_STATS, WHOLE_QUERY_BLOCKS, window_left,
                window_right, softcap_in, softcap_out, True, SOFTCAP,
            )  # fmt: skip
            q_edge = _rows_from(q_src, unmasked_end - row_start, stride_qm, DESCRIPTORS)
            do_edge = _rows_from(do_src, unmasked_end - row_start, stride_dom, DESCRIPTORS)
            dk, dv, dk_comp, dv_comp = _dkdv_from_query_blocks(
                dk, dv, dk_comp, dv_comp, k, v, q_edge, do_edge, Lse, LseLow, Delta, stat_offset,
                rows_in_all_heads, stride_qm, stride_dom, unmasked_end, row_end, keys, n_queries, diagonal,
                qk_scale, d_ok, True, EVEN_D, BLOCK_M, DOT_PRECISION, USE_LSE_LOW, BASE_2, PRECISE_EXP,
                COMPENSATE, DESCRIPTORS, PREFETCH_ROW_STATS, WHOLE_QUERY_BLOCKS, window_left, window_right,
                softcap_in, softcap_out, True, SOFTCAP,
            )  # fmt: skip
        else:
            if CAUSAL:
                dk, dv, dk_comp, dv_comp = _dkdv_from_query_blocks(
                    dk, dv, dk_comp, dv_comp, k, v, q_src, do_src, Lse, LseLow, Delta, stat_offset,
                    rows_in_all_heads, stride_qm, stride_dom, row_start, unmasked_start, keys, n_queries,
                    diagonal, qk_scale, d_ok, True, EVEN_D, BLOCK_M, DOT_PRECISION, USE_LSE_LOW, BASE_2,
                    PRECISE_EXP, COMPENSATE, DESCRIPTORS, PREFETCH_ROW_STATS, WHOLE_QUERY_BLOCKS,
                    softcap_in=softcap_in, softcap_out=softcap_out, SOFTCAP=SOFTCAP,
                )  # fmt: skip
                if not DESCRIPTORS:
                    q_src += (unmasked_start - row_start).to(tl.int64) * stride_qm
                    do_src += (unmasked_start - row_start).to(tl.int64) * stride_dom
            dk, dv, dk_comp, dv_comp = _dkdv_from_query_blocks(
                dk, dv, dk_comp, dv_comp, k, v, q_src, do_src, Lse, LseLow, Delta, stat_offset,
                rows_in_all_heads, stride_qm, stride_dom, unmasked_start, n_queries, keys, n_queries,
                diagonal, qk_scale, d_ok, False, EVEN_D, BLOCK_M, DOT_PRECISION, USE_LSE_LOW, BASE_2,
                PRECISE_EXP, COMPENSATE, DESCRIPTORS, PREFETCH_ROW_STATS, WHOLE_QUERY_BLOCKS,
                softcap_in=softcap_in, softcap_out=softcap_out, SOFTCAP=SOFTCAP,
            )  # fmt: skip

    return dk, dv, dk_comp, dv_comp


@triton.jit
def _rows_from(source, rows_ahead, stride_row, DESCRIPTORS: tl.constexpr):
    """A Q or dO source moved `rows_ahead` rows on: a tensor descriptor indexes by row itself, a pointer
    tile moves."""
    if DESCRIPTORS:
        return source
    else:
        return source + rows_ahead.to(tl.int64) * stride_row


@triton.jit(do_not_specialize=["n_queries", "n_keys", "window_left", "window_right"])
def backward_dkdv_kernel(
    Q, K, V, dOut, Lse, LseLow, Delta, dK, dV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_q_heads, kv_group, n_queries, n_keys, sm_scale, qk_scale,
    CuSeqlensQ, CuSeqlensK, window_left, window_right, softcap_in, softcap_out,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    TENSOR_DESCRIPTORS: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    PREFETCH_ROW_STATS: tl.constexpr, WHOLE_QUERY_BLOCKS: tl.constexpr,
):  # fmt: skip
    """dK, dV for BLOCK_N keys of one key/value head.

    Q, dOut (B, Hq, Nq, HEAD_DIM); K, V, dK, dV (B, Hkv, Nk, HEAD_DIM); any strides, 64-bit offsets.
    Lse, LseLow (the LSE's low parts, forward.py) and Delta (float32's in two parts, see
    backward_dq_kernel): the padded copy of the row statistics (backward_preprocess_kernel,
    _padded_stat_rows). The program sums over the kv_group = Hq // Hkv query heads that share this
    key/value head itself, so GQA needs neither atomics nor a reduction pass.
    Grid: (cdiv(Nk, BLOCK_N), Hkv, B). TENSOR_DESCRIPTORS: Q and dO tiles come through the copy engine
    (core.kernels.shared._head_rows). PREFETCH_ROW_STATS: see _dkdv_from_query_blocks.
    The query rows' LSE and Delta load from the copy unmasked, as aligned vectors, -inf LSEs already
    +inf: the masks and per-element predicates of those one-float-per-row loads were a third of the
    D=128 loop's instructions (docs/perf-notes.md). WHOLE_QUERY_BLOCKS (dense calls whose Nq is a
    multiple of BLOCK_M, plans.whole_query_blocks): Q and dO load unmasked too; otherwise they are
    masked at Nq.
    WINDOW, SOFTCAP, VARLEN: as in the forward (packed K, V, dK, dV (total_k, Hkv, HEAD_DIM)).
    """
    tl.static_assert(not (VARLEN and WHOLE_QUERY_BLOCKS))  # a packed sequence ends anywhere
    tl.static_assert(STATS_ROW_PAD % BLOCK_M == 0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    start_n = tl.program_id(0) * BLOCK_N
    packed_queries = n_queries
    q_start: tl.constexpr = 0  # a plain call's (a constexpr: `= 0` would put a constant into the IR)
    if VARLEN:
        q_start, n_queries = _sequence(CuSeqlensQ, batch)
        k_start, n_keys = _sequence(CuSeqlensK, batch)
        if start_n >= n_keys:
            return
        # Batch stride 0: as in the forward kernel.
        Q += q_start.to(tl.int64) * stride_qm
        dOut += q_start.to(tl.int64) * stride_dom
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
        dK += k_start.to(tl.int64) * stride_dkn
        dV += k_start.to(tl.int64) * stride_dvn
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    keys = start_n + offs_n
    key_ok = keys < n_keys
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    kv_row = start_n.to(tl.int64)
    k = _load_tile(
        K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + kv_row * stride_kn
        + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        key_ok, d_ok, False, EVEN_D,
    )  # fmt: skip
    v = _load_tile(
        V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + kv_row * stride_vn
        + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        key_ok, d_ok, False, EVEN_D,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk_comp = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_comp = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    COMPENSATE: tl.constexpr = Q.dtype.element_ty == tl.float32

    # Query i sees key j iff j <= i + diagonal. Rows below `row_start` see none of this tile's keys;
    # rows from `unmasked_start` on see all of them; the rows between straddle the diagonal.
    diagonal = n_keys - n_queries
    if WINDOW:
        row_start, unmasked_start, unmasked_end, row_end = _window_query_blocks(
            start_n, n_queries, diagonal, window_left, window_right, BLOCK_M, BLOCK_N
        )
    else:
        if CAUSAL:
            row_start = (tl.maximum(start_n - diagonal, 0) // BLOCK_M) * BLOCK_M
            unmasked_start = tl.maximum(
                row_start, tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diagonal, 0), BLOCK_M) * BLOCK_M
            )
            unmasked_start = tl.minimum(unmasked_start, tl.cdiv(n_queries, BLOCK_M) * BLOCK_M)
        else:
            row_start = 0
            unmasked_start = 0
        unmasked_end = n_queries
        row_end = n_queries

    first_head = kv_head * kv_group
    _, rows_in_all_heads = _padded_stat_rows(first_head, batch, q_start, n_q_heads, packed_queries, VARLEN)
    # fp16/bf16 save a zero low part for typical rows (forward.py). Scanning it first, one float
    # per row against 2 x HEAD_DIM inputs per row in the loop, lets such tiles take a loop without its
    # subtraction and without its load, both measurable (docs/perf-notes.md). Up to BLOCK_D 128 both
    # loops fit in shared memory.
    use_lse_low = True
    if (not COMPENSATE) and BLOCK_D <= 128:
        nonzero_lows = 0
        for group_member in range(0, kv_group):
            stat_offset, _ = _padded_stat_rows(
                first_head + group_member, batch, q_start, n_q_heads, packed_queries, VARLEN
            )
            nonzero_lows += _nonzero_count(LseLow, stat_offset, row_start, row_end, LOW_PART_SCAN_BLOCK)
        use_lse_low = nonzero_lows > 0
    if use_lse_low:
        dk, dv, dk_comp, dv_comp = _dkdv_from_group(
            dk, dv, dk_comp, dv_comp, k, v, Q, dOut, Lse, LseLow, Delta, stride_qb, stride_qh, stride_qm,
            stride_qd, stride_dob, stride_doh, stride_dom, stride_dod, batch, first_head, kv_group, n_q_heads,
            rows_in_all_heads, row_start, unmasked_start, keys, n_queries, diagonal, qk_scale, d_ok, offs_d,
            q_start, packed_queries, unmasked_end, row_end, window_left, window_right, softcap_in,
            softcap_out, HEAD_DIM, CAUSAL, EVEN_D, BLOCK_M, BLOCK_D, DOT_PRECISION, BASE_2, PRECISE_EXP,
            COMPENSATE, True, TENSOR_DESCRIPTORS, PREFETCH_ROW_STATS, WHOLE_QUERY_BLOCKS, WINDOW, SOFTCAP,
            VARLEN,
        )  # fmt: skip
    else:
        dk, dv, dk_comp, dv_comp = _dkdv_from_group(
            dk, dv, dk_comp, dv_comp, k, v, Q, dOut, Lse, LseLow, Delta, stride_qb, stride_qh, stride_qm,
            stride_qd, stride_dob, stride_doh, stride_dom, stride_dod, batch, first_head, kv_group, n_q_heads,
            rows_in_all_heads, row_start, unmasked_start, keys, n_queries, diagonal, qk_scale, d_ok, offs_d,
            q_start, packed_queries, unmasked_end, row_end, window_left, window_right, softcap_in,
            softcap_out, HEAD_DIM, CAUSAL, EVEN_D, BLOCK_M, BLOCK_D, DOT_PRECISION, BASE_2, PRECISE_EXP,
            COMPENSATE, False, TENSOR_DESCRIPTORS, PREFETCH_ROW_STATS, WHOLE_QUERY_BLOCKS, WINDOW, SOFTCAP,
            VARLEN,
        )  # fmt: skip

    dk_ptrs = (
        dK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh + kv_row * stride_dkn
        + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    )  # fmt: skip
    dv_ptrs = (
        dV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh + kv_row * stride_dvn
        + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    )  # fmt: skip
    store_mask = key_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(dK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=store_mask)


@triton.jit
def _p_and_dp(
    q, do, kT, vT, lse, lse_low, max_low, cols, col_ok, rows, diagonal, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr,
    PRECISE_EXP: tl.constexpr, COMPENSATE: tl.constexpr,
    window_left=0, window_right=0, softcap_in=0.0, softcap_out=0.0,
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):  # fmt: skip
    """(P, dP, dP's low part, slope) for one key block of a query tile, dP = dO V^T (_dot_parts). MASKED
    blocks (the causal diagonal, a window's edges and the ragged end of N) zero P for keys past Nk and
    keys the causal rule or the window hides. slope: the capped scores' d capped / d s (SOFTCAP; else
    never read, and the score tile stands in for it: no work)."""
    if SOFTCAP:
        scores, scores_low, slope = _softcapped_scores(
            q, kT, softcap_in, softcap_out, DOT_PRECISION, COMPENSATE
        )
    else:
        scores, scores_low = _scores(q, kT, qk_scale, DOT_PRECISION, COMPENSATE)
        slope = scores
    p = _probabilities(
        scores, scores_low, lse[:, None], lse_low[:, None], max_low[:, None], True, BASE_2, PRECISE_EXP,
        COMPENSATE,
    )  # fmt: skip
    if MASKED:
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
        if WINDOW:
            visible = visible & _in_window(cols[None, :], rows[:, None], diagonal, window_left, window_right)
        p = tl.where(visible, p, 0.0)
    dp, dp_low = _dot_parts(do, vT, DOT_PRECISION, COMPENSATE)
    return p, dp, dp_low, slope


@triton.jit
def _dq_from_key_blocks(
    dq, dq_comp, q, do, lse, lse_low, max_low, delta, delta_low, k_src, v_src, stride_kn, stride_vn,
    key_start, key_end, rows, n_keys, diagonal, qk_scale, d_ok,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr, COMPENSATE: tl.constexpr,
    DESCRIPTORS: tl.constexpr, window_left=0, window_right=0, softcap_in=0.0, softcap_out=0.0,
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False, LOW_DELTA: tl.constexpr = False,
):  # fmt: skip
    """Add the contributions of keys [key_start, key_end) to one query tile's dQ.

    k_src/v_src are tensor descriptors of this head's K and V (DESCRIPTORS), or pointers at K^T/V^T
    tiles (BLOCK_D, BLOCK_N) starting at key_start. MASKED blocks (the
    causal diagonal and the ragged end of N) are masked (_p_and_dp); other blocks are fully in bounds
    and visible.
    """
    offs_n = tl.arange(0, BLOCK_N)
    for block_start in range(key_start, key_end, BLOCK_N):
        cols = block_start + offs_n
        col_ok = cols < n_keys
        kT = _load_cols(k_src, block_start, d_ok, col_ok, EVEN_D, False, DESCRIPTORS)
        vT = _load_cols(v_src, block_start, d_ok, col_ok, EVEN_D, False, DESCRIPTORS)
        p, dp, dp_low, slope = _p_and_dp(
            q, do, kT, vT, lse, lse_low, max_low, cols, col_ok, rows, diagonal, qk_scale, MASKED, CAUSAL,
            DOT_PRECISION, BASE_2, PRECISE_EXP, COMPENSATE, window_left, window_right, softcap_in,
            softcap_out, WINDOW, SOFTCAP,
        )  # fmt: skip
        ds = p * _dp_minus_delta(dp, dp_low, delta[:, None], delta_low[:, None], COMPENSATE, LOW_DELTA)
        if SOFTCAP:
            ds = ds * slope
        dq, dq_comp = _accumulate_dot(dq, dq_comp, ds.to(kT.dtype), tl.trans(kT), DOT_PRECISION, COMPENSATE)
        if not DESCRIPTORS:
            k_src += BLOCK_N * stride_kn
            v_src += BLOCK_N * stride_vn
    return dq, dq_comp


@triton.jit
def _p_dp_row_sums(
    p_dp_sum, p_sum, q, do, lse, lse_low, max_low, k_src, v_src, stride_kn, stride_vn,
    key_start, key_end, rows, n_keys, diagonal, qk_scale, d_ok,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr, COMPENSATE: tl.constexpr,
    DESCRIPTORS: tl.constexpr, window_left=0, window_right=0, softcap_in=0.0, softcap_out=0.0,
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):  # fmt: skip
    """(p_dp_sum, p_sum) (one per row, float64) plus the sums of P * dP (dP in two parts for float32) and
    of P over keys [key_start, key_end). fp16/bf16: each product is split exactly into its float32
    rounding and that rounding's error (an FMA), the roundings summed in float64 and the errors in
    float32, so a row's sum of products is good to about 2^-48 of its terms: it needs more than float32
    (backward_dq_kernel says why) and one conversion to float64 a score, not two."""
    offs_n = tl.arange(0, BLOCK_N)
    for block_start in range(key_start, key_end, BLOCK_N):
        cols = block_start + offs_n
        col_ok = cols < n_keys
        kT = _load_cols(k_src, block_start, d_ok, col_ok, EVEN_D, False, DESCRIPTORS)
        vT = _load_cols(v_src, block_start, d_ok, col_ok, EVEN_D, False, DESCRIPTORS)
        p, dp, dp_low, _ = _p_and_dp(
            q, do, kT, vT, lse, lse_low, max_low, cols, col_ok, rows, diagonal, qk_scale, MASKED, CAUSAL,
            DOT_PRECISION, BASE_2, PRECISE_EXP, COMPENSATE, window_left, window_right, softcap_in,
            softcap_out, WINDOW, SOFTCAP,
        )  # fmt: skip
        if COMPENSATE:
            p_dp_sum += tl.sum(p.to(tl.float64) * (dp.to(tl.float64) + dp_low.to(tl.float64)), 1)
            p_sum += tl.sum(p.to(tl.float64), 1)
        else:
            product = p * dp
            p_dp_sum += tl.sum(product.to(tl.float64), 1) + tl.sum(tl.fma(p, dp, -product), 1).to(tl.float64)
            p_sum += tl.sum(p, 1).to(tl.float64)
        if not DESCRIPTORS:
            k_src += BLOCK_N * stride_kn
            v_src += BLOCK_N * stride_vn
    return p_dp_sum, p_sum


@triton.jit(do_not_specialize=["n_queries", "n_keys", "window_left", "window_right"])
def backward_dq_kernel(
    Q, K, V, dOut, Lse, LseLow, Delta, dQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    n_q_heads, kv_group, n_queries, n_keys, sm_scale, qk_scale,
    CuSeqlensQ, CuSeqlensK, window_left, window_right, softcap_in, softcap_out,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    TENSOR_DESCRIPTORS: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    DELTA_IN_DQ: tl.constexpr,
):  # fmt: skip
    """dQ for BLOCK_M query rows of one query head.

    Q, dOut, dQ (B, Hq, Nq, HEAD_DIM); K, V (B, Hkv, Nk, HEAD_DIM); any strides, 64-bit offsets.
    Lse, LseLow (the LSE's low parts, forward.py) and Delta: the padded copy of the row statistics
    (backward_preprocess_kernel, _padded_stat_rows), -inf LSEs already +inf. With DELTA_IN_DQ (float32
    inputs, fp16/bf16 ones whose LSE has a gradient, and all of them while plans.PreciseDelta is on)
    this kernel completes Delta (both planes for float32) there before its dQ loop.
    Grid: (cdiv(Nq, BLOCK_M), Hq, B), causal tiles that see the most keys launched first.
    TENSOR_DESCRIPTORS: K and V tiles come through the copy engine (core.kernels.shared._head_rows).
    WINDOW, SOFTCAP, VARLEN: as in the forward.
    """
    block_m_index = tl.program_id(0)
    if CAUSAL:
        block_m_index = tl.num_programs(0) - 1 - block_m_index
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // kv_group
    start_m = block_m_index * BLOCK_M
    packed_queries = n_queries
    q_start: tl.constexpr = 0  # a plain call's (a constexpr: `= 0` would put a constant into the IR)
    if VARLEN:
        q_start, n_queries = _sequence(CuSeqlensQ, batch)
        k_start, n_keys = _sequence(CuSeqlensK, batch)
        if start_m >= n_queries:
            return
        # Batch stride 0: as in the forward kernel.
        Q += q_start.to(tl.int64) * stride_qm
        dOut += q_start.to(tl.int64) * stride_dom
        dQ += q_start.to(tl.int64) * stride_dqm
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < n_queries
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    q_row = start_m.to(tl.int64)
    q = _load_tile(
        Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_row * stride_qm
        + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        row_ok, d_ok, False, EVEN_D,
    )  # fmt: skip
    do = _load_tile(
        dOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh + q_row * stride_dom
        + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
        row_ok, d_ok, False, EVEN_D,
    )  # fmt: skip
    COMPENSATE: tl.constexpr = Q.dtype.element_ty == tl.float32
    first_stat_row, rows_in_all_heads = _padded_stat_rows(
        head, batch, q_start, n_q_heads, packed_queries, VARLEN
    )
    stat_rows = first_stat_row + rows
    lse, lse_low, max_low, delta = _load_row_stats(
        Lse, LseLow, Delta, stat_rows, row_ok, rows_in_all_heads, COMPENSATE, NO_MINUS_INF=True
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq_comp = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    # The same split as the forward: whole key blocks every row of the tile sees, then the causal
    # diagonal and the ragged end of N through the masked path. A window (WINDOW) has two masked edges
    # around its whole blocks: [key_start, first_unmasked) comes first.
    diagonal = n_keys - n_queries
    whole_blocks_end = (n_keys // BLOCK_N) * BLOCK_N
    first_unmasked: tl.constexpr = 0
    if WINDOW:
        key_start, first_unmasked, unmasked_end, key_end = _window_key_blocks(
            start_m, n_keys, diagonal, window_left, window_right, BLOCK_M, BLOCK_N
        )
    elif CAUSAL:
        fully_visible = (tl.maximum(start_m + diagonal + 1, 0) // BLOCK_N) * BLOCK_N
        unmasked_end = tl.minimum(fully_visible, whole_blocks_end)
        key_end = tl.minimum(n_keys, tl.maximum(start_m + BLOCK_M + diagonal, 0))
    else:
        unmasked_end = whole_blocks_end
        key_end = n_keys
    # K and V from key 0 (k_src, v_src) and from unmasked_end (k_tail, v_tail): descriptors index by key.
    # With WINDOW, k_src and v_src start at first_unmasked, and k_head, v_head at key_start.
    if TENSOR_DESCRIPTORS:
        k_src = _head_rows(k_base, n_keys, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_src = _head_rows(v_base, n_keys, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D)
        k_tail, v_tail = k_src, v_src
        k_head, v_head = k_src, v_src
    else:
        k_src = k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
        v_src = v_base + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn
        k_tail = k_src + unmasked_end.to(tl.int64) * stride_kn
        v_tail = v_src + unmasked_end.to(tl.int64) * stride_vn
        if WINDOW:
            k_head = k_src + key_start.to(tl.int64) * stride_kn
            v_head = v_src + key_start.to(tl.int64) * stride_vn
            k_src += first_unmasked.to(tl.int64) * stride_kn
            v_src += first_unmasked.to(tl.int64) * stride_vn
    delta_low = delta
    if DELTA_IN_DQ:
        # float32: Delta = sum_j P_ij dP_ij / sum_j P_ij, summed here in float64 and saved in two parts,
        # not dO . O from the preprocess; and dS = P ((dP - Delta) + (dP_low - Delta_low))
        # (_dp_minus_delta). A nearly one-hot row's dP - Delta is far smaller than Delta: one rounding
        # of Delta, dP or O to float32, or of its largest P (whose 1 - P is its whole weight elsewhere),
        # is a large part of it, and sm_scale multiplies that into dq and dk (the GPU fuzzer: dk 2.1x
        # float32 eager attention's bound at sm_scale 295). Dividing by the P's own sum makes the row's
        # dS sum to 0 for the P actually used, as the exact ones do, so each dP - Delta is accurate to
        # float32 relative to itself. A one-hot row still gets dP - Delta = 0 exactly.
        # fp16/bf16 take this pass when the LSE has a gradient or plans.PreciseDelta is on (its default):
        # Delta = dO . O uses O rounded to the input dtype, so dS summed over a row is dLSE + dO . (O - O
        # rounded) instead of dLSE, and dq gets sm_scale times that noise times the row's mean key. Where
        # the true dq is 0 or small, the noise is all of it: q = 0 and equal keys give exactly dq = dLSE
        # sm_scale k (with a dLSE) or dq = 0 (without), which eager attention reproduces and the dO . O
        # kernel missed by 1.4x the bound at the default sm_scale and 4e4x at sm_scale 3852 (pinned fuzz
        # examples, fuzz/test_accuracy.py).
        # The pass reads K and V once more; the dK/dV kernel, launched after this one, reads the Delta
        # it stores.
        # Every dtype sums in float64 and keeps Delta in two float32 parts; fp16/bf16 use the low part
        # in their dQ loop only (LOW_DELTA), to round dP - Delta once (_dp_minus_delta). float32 Delta
        # was not enough there: two keys of equal P (equal keys, a tiny q) have exactly opposite
        # dP - Delta and dS, so eager attention's dq is exactly 0, but a Delta rounded to float32 is
        # not their exact midpoint, one of the two dS could round to fp16 differently from the other,
        # and sm_scale multiplied that one ulp of dS into dq (345x the bound at sm_scale 2330, float16,
        # replayed in core's tests). The dK/dV kernel takes the high part: its sums run over queries,
        # where no such pair cancels.
        p_dp_sum = tl.zeros([BLOCK_M], dtype=tl.float64)
        p_sum = tl.zeros([BLOCK_M], dtype=tl.float64)
        if WINDOW:
            p_dp_sum, p_sum = _p_dp_row_sums(
                p_dp_sum, p_sum, q, do, lse, lse_low, max_low, k_head, v_head, stride_kn, stride_vn,
                key_start, first_unmasked, rows, n_keys, diagonal, qk_scale, d_ok, True, False, EVEN_D,
                BLOCK_N, DOT_PRECISION, BASE_2, PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS, window_left,
                window_right, softcap_in, softcap_out, True, SOFTCAP,
            )  # fmt: skip
        p_dp_sum, p_sum = _p_dp_row_sums(
            p_dp_sum, p_sum, q, do, lse, lse_low, max_low, k_src, v_src, stride_kn, stride_vn, first_unmasked,
            unmasked_end, rows, n_keys, diagonal, qk_scale, d_ok, False, CAUSAL, EVEN_D, BLOCK_N,
            DOT_PRECISION, BASE_2, PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS, window_left, window_right,
            softcap_in, softcap_out, WINDOW, SOFTCAP,
        )  # fmt: skip
        p_dp_sum, p_sum = _p_dp_row_sums(
            p_dp_sum, p_sum, q, do, lse, lse_low, max_low, k_tail, v_tail, stride_kn, stride_vn, unmasked_end,
            key_end, rows, n_keys, diagonal, qk_scale, d_ok, True, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION,
            BASE_2, PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS, window_left, window_right, softcap_in,
            softcap_out, WINDOW, SOFTCAP,
        )  # fmt: skip
        # A row that sees no key has no P at all: its Delta is the preprocess's -dLSE term alone.
        row_sums = tl.where(p_sum > 0.0, p_dp_sum / tl.where(p_sum > 0.0, p_sum, 1.0), 0.0)
        row_sums += delta.to(tl.float64)  # the preprocess's -dLSE term
        delta = row_sums.to(tl.float32)
        delta_low = (row_sums - delta.to(tl.float64)).to(tl.float32)
        tl.store(Delta + stat_rows, delta, mask=row_ok)
        if COMPENSATE:
            tl.store(Delta + rows_in_all_heads + stat_rows, delta_low, mask=row_ok)
    LOW_DELTA: tl.constexpr = DELTA_IN_DQ and not COMPENSATE
    if WINDOW:
        dq, dq_comp = _dq_from_key_blocks(
            dq, dq_comp, q, do, lse, lse_low, max_low, delta, delta_low, k_head, v_head, stride_kn, stride_vn,
            key_start, first_unmasked, rows, n_keys, diagonal, qk_scale, d_ok, True, False, EVEN_D, BLOCK_N,
            DOT_PRECISION, BASE_2, PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS, window_left, window_right,
            softcap_in, softcap_out, True, SOFTCAP, LOW_DELTA,
        )  # fmt: skip
    dq, dq_comp = _dq_from_key_blocks(
        dq, dq_comp, q, do, lse, lse_low, max_low, delta, delta_low, k_src, v_src, stride_kn, stride_vn,
        first_unmasked, unmasked_end, rows, n_keys, diagonal, qk_scale, d_ok, False, CAUSAL, EVEN_D, BLOCK_N,
        DOT_PRECISION, BASE_2, PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS, window_left, window_right,
        softcap_in, softcap_out, WINDOW, SOFTCAP, LOW_DELTA,
    )  # fmt: skip
    dq, dq_comp = _dq_from_key_blocks(
        dq, dq_comp, q, do, lse, lse_low, max_low, delta, delta_low, k_tail, v_tail, stride_kn, stride_vn,
        unmasked_end, key_end, rows, n_keys, diagonal, qk_scale, d_ok, True, CAUSAL, EVEN_D, BLOCK_N,
        DOT_PRECISION, BASE_2, PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS, window_left, window_right,
        softcap_in, softcap_out, WINDOW, SOFTCAP, LOW_DELTA,
    )  # fmt: skip

    dq_ptrs = (
        dQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh + q_row * stride_dqm
        + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    )  # fmt: skip
    tl.store(dq_ptrs, (dq * sm_scale).to(dQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
