"""The forward kernel: one program computes BLOCK_M query rows of one (batch, head) against all the
keys that those rows may see, keeping a running max and sum so the N x N score matrix never exists.

fp16/bf16 scores are kept in base 2: the softmax scale is folded into `qk_scale = sm_scale * log2(e)`
so that each probability costs one exp2 instead of a multiply and an exp. The saved log-sum-exp is in the
same base (LSE2 = m + log2(l)): the backward recomputes P = exp2(S * qk_scale - LSE2) from exactly the
numbers the forward used, with no ln(2) round trip.

float32 inputs (BASE_2 False) keep natural-base scores, S * sm_scale, with exp and a natural LSE; the
scale's rounding error is carried exactly (an FMA) and added back after the row max is subtracted. The fold
costs float32 two more roundings per logit (log2(e) into the scale, and the LSE's conversion back to
natural log), which the fp16/bf16 rounding of P hides but float32 does not: the fuzzer measured 2.8x
float32 eager attention's LSE error and 1.05x its output bound at large logits with the fold.
"""

import triton
import triton.language as tl

from core.kernels.shared import (
    _accumulate_dot,
    _exp,
    _head_rows,
    _hide_keys,
    _in_window,
    _load_cols,
    _load_rows,
    _load_tile,
    _log,
    _scores,
    _sequence,
    _softcapped_scores,
    _two_sum,
    _window_key_blocks,
)

# |LSE2| below which fp16/bf16 save no low part for the LSE (see the end of attention_forward_kernel).
LOW_PART_NEGLIGIBLE_BELOW = tl.constexpr(256.0)


@triton.jit
def _attend_to_key_blocks(
    acc, comp, m_i, m_low, l_i, l_comp, q, k_src, v_src, stride_kn, stride_vn,
    key_start, key_end, rows, n_keys, diagonal, qk_scale, d_ok,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    COMPENSATE: tl.constexpr, DESCRIPTORS: tl.constexpr,
    window_left=0, window_right=0, softcap_in=0.0, softcap_out=0.0,
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):  # fmt: skip
    """Fold keys [key_start, key_end) into the running (acc, comp, m_i, m_low, l_i, l_comp) of one query
    tile. comp and m_low are float32's compensation terms (unused, and zero, for fp16/bf16).

    l_i is a sum over every visible key of the row, i.e. up to N terms added one block at a time; it is
    Kahan-compensated (l_comp) for every dtype because the LSE is a float32 output whose error would
    otherwise grow with N (several times the eager reference's at millions of keys). It costs three
    adds per row per block, nothing next to the block's dots.

    k_src/v_src are tensor descriptors of this head's K and V (DESCRIPTORS), or pointer tiles at the
    keys starting at key_start.

    With MASKED False every key of every block is in bounds and visible to every row, so no mask is
    built and no load is predicated on N: the bulk of the work. MASKED blocks (the causal diagonal, a
    sliding window's edges and the ragged tail of N) mask keys past n_keys and keys the causal rule or
    the window (WINDOW: shared._in_window) hides. SOFTCAP caps the scores (shared._softcapped_scores).
    """
    offs_n = tl.arange(0, BLOCK_N)
    for block_start in range(key_start, key_end, BLOCK_N):
        cols = block_start + offs_n
        col_ok = cols < n_keys
        # k is read transposed, (BLOCK_D, BLOCK_N), so the score tile is a plain q @ kT.
        kT = _load_cols(k_src, block_start, d_ok, col_ok, EVEN_D, not MASKED, DESCRIPTORS)
        if SOFTCAP:
            scores, scores_low, _ = _softcapped_scores(
                q, kT, softcap_in, softcap_out, DOT_PRECISION, COMPENSATE
            )
        else:
            scores, scores_low = _scores(q, kT, qk_scale, DOT_PRECISION, COMPENSATE)
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
            if WINDOW:
                visible = visible & _in_window(
                    cols[None, :], rows[:, None], diagonal, window_left, window_right
                )
            scores, scores_low = _hide_keys(scores, scores_low, visible, COMPENSATE)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        if MASKED:
            # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that
            # exp(-inf - -inf) = NaN never appears (its p and alpha both come out 0).
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        if COMPENSATE:
            # The running max is two-part too: m_low is the low part of the score that is the max (the
            # largest low part among ties), so each score is measured from the max as
            # (scores - m) + (scores_low - m_low): the first difference is exact near the max, and the
            # max itself gets exp(0) = 1 exactly, as in eager attention, however large the logits (a
            # one-hot row then outputs v exactly, which the backward's Delta relies on). At peaky, large
            # logits the rounding of each score is what limits P (eps32 * |score| in the exponent): this
            # leaves only the dot's own rounding.
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
        v = _load_rows(v_src, block_start, col_ok, d_ok, not MASKED, EVEN_D, DESCRIPTORS)
        acc = acc * alpha[:, None]
        if COMPENSATE:
            comp = comp * alpha[:, None]
        acc, comp = _accumulate_dot(acc, comp, p.to(v.dtype), v, DOT_PRECISION, COMPENSATE)
        m_i = m_new
        if not DESCRIPTORS:
            k_src += BLOCK_N * stride_kn
            v_src += BLOCK_N * stride_vn
    return acc, comp, m_i, m_low, l_i, l_comp


@triton.jit
def _keys_from(source, start, stride_row, DESCRIPTORS: tl.constexpr):
    """A K or V source placed at key `start`: a tensor descriptor indexes by key itself, a pointer tile
    moves there."""
    if DESCRIPTORS:
        return source
    else:
        return source + start.to(tl.int64) * stride_row


@triton.jit(do_not_specialize=["n_queries", "n_keys", "window_left", "window_right"])
def attention_forward_kernel(
    Q, K, V, Out, Lse, LseLow,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_q_heads, kv_group, n_queries, n_keys, qk_scale,
    CuSeqlensQ, CuSeqlensK, window_left, window_right, softcap_in, softcap_out,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    TENSOR_DESCRIPTORS: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """Out = softmax(Q K^T * sm_scale + mask) V and its log-sum-exp, for one BLOCK_M x HEAD_DIM tile.

    Pointers (any strides; 64-bit offsets):
      Q   (B, Hq, Nq, HEAD_DIM)   strides stride_q{b,h,m,d}
      K   (B, Hkv, Nk, HEAD_DIM)  strides stride_k{b,h,n,d}
      V   (B, Hkv, Nk, HEAD_DIM)  strides stride_v{b,h,n,d}
      Out (B, Hq, Nq, HEAD_DIM)   strides stride_o{b,h,m,d}
      Lse (B, Hq, Nq) float32, contiguous; log-sum-exp of the scores S * qk_scale in the kernel's
          base (base 2 when BASE_2, else natural), -inf for rows that see no key
      LseLow (1, B, Hq, Nq) float32 for fp16/bf16, (2, B, Hq, Nq) for float32, contiguous: the LSE's low
          parts. [0]: Lse's rounding error (m + log l = Lse + LseLow[0] exactly; fp16/bf16 save 0 where
          |Lse| < LOW_PART_NEGLIGIBLE_BELOW); [1] (float32 only): the running max's low part m_low.
          0 for rows that see no key.
    kv_group = Hq // Hkv: query head h reads key/value head h // kv_group (GQA/MQA, no copies).
    qk_scale = sm_scale * log2(e) when BASE_2, else sm_scale. Grid: (cdiv(Nq, BLOCK_M), Hq, B).
    TENSOR_DESCRIPTORS: K and V tiles come through the copy engine (TMA) instead of pointer loads, for
    layouts that allow it (plans.py: descriptors_fit).

    Switches that are off for plain calls (their arguments, the last ones before the constexprs, are
    then unused, and the code is the plain kernel's):
    - WINDOW: query i sees key j iff i + d - window_left <= j <= i + d + window_right, d = Nk - Nq (the
      host passes a side without a bound as one past every key; a causal window has window_right 0 and
      CAUSAL off). Each tile visits only the key blocks its rows' windows reach
      (shared._window_key_blocks): whole blocks unmasked, the two edges masked.
    - SOFTCAP: every score s becomes softcap * tanh(s / softcap) before the softmax (in the kernel's
      base: softcap_out * tanh(dot * softcap_in), shared._softcapped_scores); the LSE is the capped
      scores'.
    - VARLEN: B packed sequences. Q, Out are (total_q, Hq, HEAD_DIM) and K, V (total_k, Hkv, HEAD_DIM),
      passed with batch stride 0; sequence b holds rows CuSeqlensQ[b] .. CuSeqlensQ[b + 1] of Q (int32,
      read here, never on the host) and CuSeqlensK[b] .. of K and V; n_queries and n_keys are the packed
      totals, and each sequence attends within itself, masks aligned to its own lengths. Lse and each
      plane of LseLow are (Hq, total_q). The grid's first axis covers the longest sequence; programs
      past their own sequence's end return at once. Descriptors are made per sequence, so the copy
      engine clips at the sequence's end.
    """
    # Causal tiles near the end of the sequence see the most keys: launch them first so the long
    # programs do not start last and leave the GPU's tail idle.
    block_m_index = tl.program_id(0)
    if CAUSAL:
        block_m_index = tl.num_programs(0) - 1 - block_m_index
    _forward_tile(
        block_m_index, tl.program_id(1), tl.program_id(2), tl.num_programs(2),
        Q, K, V, Out, Lse, LseLow,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        n_q_heads, kv_group, n_queries, n_keys, qk_scale,
        CuSeqlensQ, CuSeqlensK, window_left, window_right, softcap_in, softcap_out,
        HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, BASE_2, PRECISE_EXP,
        TENSOR_DESCRIPTORS, WINDOW, SOFTCAP, VARLEN,
    )  # fmt: skip


@triton.jit(do_not_specialize=["n_queries", "n_keys", "window_left", "window_right", "n_batch"])
def attention_forward_persistent_kernel(
    Q, K, V, Out, Lse, LseLow,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_q_heads, kv_group, n_queries, n_keys, qk_scale,
    CuSeqlensQ, CuSeqlensK, window_left, window_right, softcap_in, softcap_out, n_batch,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    TENSOR_DESCRIPTORS: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """attention_forward_kernel's tiles, many per program: the same arguments, and n_batch (B), for
    dense inputs (not VARLEN). Grid: (programs,), fewer than the tiles (a few per SM), so a program's
    next tile starts while others still run, instead of short programs paying their start and end one
    wave at a time. Program p takes tiles p, p + programs, ...; tiles go out one query block at a time,
    every (batch, head) of it together, causal from the last block (the heaviest) down. Each tile's
    arithmetic is the one-tile kernel's: results bitwise the same."""
    tl.static_assert(not VARLEN, "packed sequences take the one-tile kernel")
    n_blocks = tl.cdiv(n_queries, BLOCK_M)
    heads = n_q_heads * n_batch
    for tile in range(tl.program_id(0), n_blocks * heads, tl.num_programs(0)):
        block_m_index = tile // heads
        if CAUSAL:
            block_m_index = n_blocks - 1 - block_m_index
        _forward_tile(
            block_m_index, tile % n_q_heads, (tile // n_q_heads) % n_batch, n_batch,
            Q, K, V, Out, Lse, LseLow,
            stride_qb, stride_qh, stride_qm, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd,
            stride_ob, stride_oh, stride_om, stride_od,
            n_q_heads, kv_group, n_queries, n_keys, qk_scale,
            CuSeqlensQ, CuSeqlensK, window_left, window_right, softcap_in, softcap_out,
            HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, BASE_2, PRECISE_EXP,
            TENSOR_DESCRIPTORS, WINDOW, SOFTCAP, VARLEN,
        )  # fmt: skip


@triton.jit
def _forward_tile(
    block_m_index, head, batch, n_batch,
    Q, K, V, Out, Lse, LseLow,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_q_heads, kv_group, n_queries, n_keys, qk_scale,
    CuSeqlensQ, CuSeqlensK, window_left, window_right, softcap_in, softcap_out,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    TENSOR_DESCRIPTORS: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """One tile of attention_forward_kernel: query block `block_m_index` of query head `head` of sequence
    `batch`, of `n_batch` (the arguments as the kernels take them). The one-tile kernel runs one per
    program, the persistent kernel many."""
    kv_head = head // kv_group
    start_m = block_m_index * BLOCK_M
    packed_queries = n_queries
    if VARLEN:
        q_start, n_queries = _sequence(CuSeqlensQ, batch)
        k_start, n_keys = _sequence(CuSeqlensK, batch)
        if start_m >= n_queries:
            return
        # The packed tensors' batch stride is 0: from the sequence's first rows on, the kernel reads them
        # as a batch of one.
        Q += q_start.to(tl.int64) * stride_qm
        Out += q_start.to(tl.int64) * stride_om
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < n_queries
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    q_ptrs = (
        Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qm
        + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    )  # fmt: skip
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    if TENSOR_DESCRIPTORS:
        k_src = _head_rows(k_base, n_keys, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_src = _head_rows(v_base, n_keys, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D)
    else:
        k_src = k_base + offs_d[:, None] * stride_kd + tl.arange(0, BLOCK_N)[None, :] * stride_kn
        v_src = v_base + tl.arange(0, BLOCK_N)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    q = _load_tile(q_ptrs, row_ok, d_ok, False, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_comp = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_low = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    comp = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    COMPENSATE: tl.constexpr = Q.dtype.element_ty == tl.float32

    # Query i sees key j iff j <= i + diagonal (bottom-right aligned causal mask).
    diagonal = n_keys - n_queries
    whole_blocks_end = (n_keys // BLOCK_N) * BLOCK_N
    if WINDOW:
        # The window's left edge (masked), the keys every row of the tile sees (unmasked), its right edge
        # (masked); blocks outside are skipped.
        key_start, unmasked_start, unmasked_end, key_end = _window_key_blocks(
            start_m, n_keys, diagonal, window_left, window_right, BLOCK_M, BLOCK_N
        )
        k_edge = _keys_from(k_src, key_start, stride_kn, TENSOR_DESCRIPTORS)
        v_edge = _keys_from(v_src, key_start, stride_vn, TENSOR_DESCRIPTORS)
        acc, comp, m_i, m_low, l_i, l_comp = _attend_to_key_blocks(
            acc, comp, m_i, m_low, l_i, l_comp, q, k_edge, v_edge, stride_kn, stride_vn, key_start,
            unmasked_start, rows, n_keys, diagonal, qk_scale, d_ok, True, False, EVEN_D, BLOCK_N,
            DOT_PRECISION, BASE_2, PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS, window_left, window_right,
            softcap_in, softcap_out, True, SOFTCAP,
        )  # fmt: skip
        k_whole = _keys_from(k_src, unmasked_start, stride_kn, TENSOR_DESCRIPTORS)
        v_whole = _keys_from(v_src, unmasked_start, stride_vn, TENSOR_DESCRIPTORS)
        acc, comp, m_i, m_low, l_i, l_comp = _attend_to_key_blocks(
            acc, comp, m_i, m_low, l_i, l_comp, q, k_whole, v_whole, stride_kn, stride_vn, unmasked_start,
            unmasked_end, rows, n_keys, diagonal, qk_scale, d_ok, False, False, EVEN_D, BLOCK_N,
            DOT_PRECISION, BASE_2, PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS, window_left, window_right,
            softcap_in, softcap_out, True, SOFTCAP,
        )  # fmt: skip
        k_edge = _keys_from(k_src, unmasked_end, stride_kn, TENSOR_DESCRIPTORS)
        v_edge = _keys_from(v_src, unmasked_end, stride_vn, TENSOR_DESCRIPTORS)
        acc, comp, m_i, m_low, l_i, l_comp = _attend_to_key_blocks(
            acc, comp, m_i, m_low, l_i, l_comp, q, k_edge, v_edge, stride_kn, stride_vn, unmasked_end,
            key_end, rows, n_keys, diagonal, qk_scale, d_ok, True, False, EVEN_D, BLOCK_N, DOT_PRECISION,
            BASE_2, PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS, window_left, window_right, softcap_in,
            softcap_out, True, SOFTCAP,
        )  # fmt: skip
    else:
        if CAUSAL:
            # Keys below `unmasked_end` are visible to every row of this tile; keys up to `key_end` are
            # visible to some of them and go through the masked path.
            unmasked_end = tl.minimum(
                (tl.maximum(start_m + diagonal + 1, 0) // BLOCK_N) * BLOCK_N, whole_blocks_end
            )
            key_end = tl.minimum(n_keys, tl.maximum(start_m + BLOCK_M + diagonal, 0))
        else:
            unmasked_end = whole_blocks_end
            key_end = n_keys
        acc, comp, m_i, m_low, l_i, l_comp = _attend_to_key_blocks(
            acc, comp, m_i, m_low, l_i, l_comp, q, k_src, v_src, stride_kn, stride_vn, 0, unmasked_end, rows,
            n_keys, diagonal, qk_scale, d_ok, False, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION, BASE_2,
            PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS,
            softcap_in=softcap_in, softcap_out=softcap_out, SOFTCAP=SOFTCAP,
        )  # fmt: skip
        if not TENSOR_DESCRIPTORS:
            k_src += unmasked_end.to(tl.int64) * stride_kn
            v_src += unmasked_end.to(tl.int64) * stride_vn
        acc, comp, m_i, m_low, l_i, l_comp = _attend_to_key_blocks(
            acc, comp, m_i, m_low, l_i, l_comp, q, k_src, v_src, stride_kn, stride_vn, unmasked_end, key_end,
            rows, n_keys, diagonal, qk_scale, d_ok, True, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION, BASE_2,
            PRECISE_EXP, COMPENSATE, TENSOR_DESCRIPTORS,
            softcap_in=softcap_in, softcap_out=softcap_out, SOFTCAP=SOFTCAP,
        )  # fmt: skip

    # l_i >= 1 for every row that saw a key (its max contributes exp(0)); rows that saw none output
    # 0 and LSE -inf rather than 0/0. One correctly rounded division per output element costs nothing
    # next to the loop and saves float32 outputs the approximate divide's extra ulps.
    sees_a_key = l_i > 0.0
    l_safe = tl.where(sees_a_key, l_i, 1.0)
    out = tl.where(sees_a_key[:, None], tl.math.div_rn(acc, l_safe[:, None]), 0.0)
    log_l = _log(l_safe, BASE_2, PRECISE_EXP)

    o_ptrs = (
        Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        + start_m.to(tl.int64) * stride_om + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    )  # fmt: skip
    if EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if VARLEN:
        row_offsets = head.to(tl.int64) * packed_queries + q_start + rows  # (Hq, total_q) statistics
    else:
        row_offsets = (batch.to(tl.int64) * n_q_heads + head) * n_queries + rows
    # The backward recomputes P = exp(S - LSE): a rounded LSE of magnitude |m| shifts every P of the row by
    # eps32 * |m| relative. For peaky float32 rows (|m| ~ 1e3 at sm_scale 100) that is far more than eager
    # attention's exp(S - m) / l loses (the fuzzer measured dv at 233x the bound); in every dtype, beyond
    # |m| = 2^24 log(l) vanishes from m + log(l) altogether, and a row that ties between two keys got
    # P = 1 for each instead of 1/2 (bf16 at sm_scale -9e15: dk 47x the bound). So the LSE is saved in
    # parts, from which the backward rebuilds the forward's exponent (backward.py: _probabilities):
    # TwoSum's exact rounding error of m + log(l), and for float32 the max's low part m_low on its own
    # (folding it into log(l) first would round at |m_low| ~ eps32 * |m|, 1e2 at logits near 1e9).
    lse, lse_low = _two_sum(m_i, log_l)
    lse = tl.where(sees_a_key, lse, float("-inf"))
    tl.store(Lse + row_offsets, lse, mask=row_ok)
    lse_low = tl.where(sees_a_key, lse_low, 0.0)
    if not COMPENSATE:
        # fp16/bf16 drop a low part that cannot matter: below |LSE2| = 2^8 it is at most 2^-17, which
        # moves P by under 1/32 of fp16's rounding. Then the backward sees an all-zero low part for
        # typical rows and skips the subtraction altogether (backward.py, `_needs_lse_low`).
        lse_low = tl.where(tl.abs(lse) < LOW_PART_NEGLIGIBLE_BELOW, 0.0, lse_low)
    tl.store(LseLow + row_offsets, lse_low, mask=row_ok)
    if COMPENSATE:
        if VARLEN:
            rows_in_all_heads = packed_queries.to(tl.int64) * n_q_heads
        else:
            rows_in_all_heads = n_batch.to(tl.int64) * n_q_heads * n_queries
        tl.store(LseLow + rows_in_all_heads + row_offsets, m_low, mask=row_ok)
