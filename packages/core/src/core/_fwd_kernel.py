"""The forward kernel: one program computes BLOCK_M query rows of one (batch, head) against all the
keys that those rows may see, keeping a running max and sum so the N x N score matrix never exists.

Scores are kept in base 2: the softmax scale is folded into `qk_scale = sm_scale * log2(e)` so that
each probability costs one exp2 instead of a multiply and an exp. The saved log-sum-exp stays in base 2
too (LSE2 = m + log2(l)): the backward recomputes P = exp2(S * qk_scale - LSE2) from exactly the numbers
the forward used, with no ln(2) round trip (which, in float32, biased P by a few ulps in every row).
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _exp2(x, PRECISE: tl.constexpr):
    """exp2 by the fast hardware approximation, or (PRECISE, float32 inputs) by libdevice's exp2f.

    The approximation's few-ulp error vanishes under fp16/bf16 rounding of P but not in float32,
    where it would make the kernel several times less accurate than float32 eager attention.
    """
    if PRECISE:
        return libdevice.exp2(x)
    else:
        return tl.math.exp2(x)


@triton.jit
def _accumulate_dot(acc, comp, a, b, DOT_PRECISION: tl.constexpr, COMPENSATE: tl.constexpr):
    """(acc, comp) after adding a @ b to the running sum acc.

    fp16/bf16 operands accumulate straight into acc on the tensor cores (comp is unused and unchanged).
    float32 operands (COMPENSATE) take full-precision FMA dots, and the compiler folds `acc + a @ b`
    into one dot that continues acc's FMA chain: every product of a whole attention row or column would
    then be summed sequentially, with an error growing like N (18x float32 eager attention's at 4096
    rows, measured on an H100). Kahan summation of the per-block dots, with comp carrying the rounding
    error of acc, keeps the error at the level of one block.
    """
    if COMPENSATE:
        y = tl.dot(a, b, input_precision=DOT_PRECISION) - comp
        total = acc + y
        comp = (total - acc) - y
        return total, comp
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION), comp


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Load a 2-D tile, masking only the dimensions that can run past the tensor (zeros there)."""
    if EVEN_ROWS and EVEN_COLS:
        return tl.load(ptrs)
    elif EVEN_ROWS:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    elif EVEN_COLS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _attend_to_key_blocks(
    acc, comp, m_i, l_i, l_comp, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
    key_start, key_end, rows, n_keys, diagonal, qk_scale, d_ok,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, PRECISE_EXP2: tl.constexpr, COMPENSATE: tl.constexpr,
):  # fmt: skip
    """Fold keys [key_start, key_end) into the running (acc, comp, m_i, l_i, l_comp) of one query tile.

    l_i is a sum over every visible key of the row, i.e. up to N terms added one block at a time; it is
    Kahan-compensated (l_comp) for every dtype because the LSE is a float32 output whose error would
    otherwise grow with N (5x the eager reference's at 8M keys, measured on an H100). It costs three
    adds per row per block, nothing next to the block's dots.

    k_ptrs/v_ptrs point at the tile of keys starting at key_start.

    With MASKED False every key of every block is in bounds and visible to every row, so no mask is
    built and no load is predicated on N: the bulk of the work. MASKED blocks (the causal diagonal and
    the ragged tail of N) mask keys past n_keys and keys the causal rule hides.
    """
    offs_n = tl.arange(0, BLOCK_N)
    for block_start in range(key_start, key_end, BLOCK_N):
        cols = block_start + offs_n
        col_ok = cols < n_keys
        # k is loaded transposed, (BLOCK_D, BLOCK_N), so the score tile is a plain q @ kT.
        kT = _load_tile(k_ptrs, d_ok, col_ok, EVEN_D, not MASKED)
        scores = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        if MASKED:
            # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that
            # exp2(-inf - -inf) = NaN never appears (its p and alpha both come out 0).
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = _exp2(scores - m_new_safe[:, None], PRECISE_EXP2)
        alpha = _exp2(m_i - m_new_safe, PRECISE_EXP2)
        l_i = l_i * alpha
        l_comp = l_comp * alpha
        row_sum = tl.sum(p, 1) - l_comp
        l_new = l_i + row_sum
        l_comp = (l_new - l_i) - row_sum
        l_i = l_new
        v = _load_tile(v_ptrs, col_ok, d_ok, not MASKED, EVEN_D)
        acc = acc * alpha[:, None]
        if COMPENSATE:
            comp = comp * alpha[:, None]
        acc, comp = _accumulate_dot(acc, comp, p.to(v.dtype), v, DOT_PRECISION, COMPENSATE)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, comp, m_i, l_i, l_comp


@triton.jit(do_not_specialize=["n_queries", "n_keys"])
def attention_forward_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_q_heads, kv_group, n_queries, n_keys, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PRECISE_EXP2: tl.constexpr,
):  # fmt: skip
    """Out = softmax(Q K^T * sm_scale + mask) V and its log-sum-exp, for one BLOCK_M x HEAD_DIM tile.

    Pointers (any strides; 64-bit offsets):
      Q   (B, Hq, Nq, HEAD_DIM)   strides stride_q{b,h,m,d}
      K   (B, Hkv, Nk, HEAD_DIM)  strides stride_k{b,h,n,d}
      V   (B, Hkv, Nk, HEAD_DIM)  strides stride_v{b,h,n,d}
      Out (B, Hq, Nq, HEAD_DIM)   strides stride_o{b,h,m,d}
      Lse (B, Hq, Nq) float32, contiguous; base-2 log-sum-exp of the base-2 scores S * qk_scale,
          -inf for rows that see no key
    kv_group = Hq // Hkv: query head h reads key/value head h // kv_group (GQA/MQA, no copies).
    qk_scale = sm_scale * log2(e). Grid: (cdiv(Nq, BLOCK_M), Hq, B).
    """
    # Causal tiles near the end of the sequence see the most keys: launch them first so the long
    # programs do not start last and leave the GPU's tail idle.
    block_m_index = tl.program_id(0)
    if CAUSAL:
        block_m_index = tl.num_programs(0) - 1 - block_m_index
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // kv_group
    start_m = block_m_index * BLOCK_M

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
    k_ptrs = (
        K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        + offs_d[:, None] * stride_kd + tl.arange(0, BLOCK_N)[None, :] * stride_kn
    )  # fmt: skip
    v_ptrs = (
        V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
        + tl.arange(0, BLOCK_N)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    )  # fmt: skip
    q = _load_tile(q_ptrs, row_ok, d_ok, False, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_comp = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    comp = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    COMPENSATE: tl.constexpr = Q.dtype.element_ty == tl.float32

    # Query i sees key j iff j <= i + diagonal (bottom-right aligned causal mask).
    diagonal = n_keys - n_queries
    whole_blocks_end = (n_keys // BLOCK_N) * BLOCK_N
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
    acc, comp, m_i, l_i, l_comp = _attend_to_key_blocks(
        acc, comp, m_i, l_i, l_comp, q, k_ptrs, v_ptrs, stride_kn, stride_vn, 0, unmasked_end, rows, n_keys,
        diagonal, qk_scale, d_ok, False, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION, PRECISE_EXP2, COMPENSATE,
    )  # fmt: skip
    k_ptrs += unmasked_end.to(tl.int64) * stride_kn
    v_ptrs += unmasked_end.to(tl.int64) * stride_vn
    acc, comp, m_i, l_i, l_comp = _attend_to_key_blocks(
        acc, comp, m_i, l_i, l_comp, q, k_ptrs, v_ptrs, stride_kn, stride_vn, unmasked_end, key_end, rows,
        n_keys, diagonal, qk_scale, d_ok, True, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION, PRECISE_EXP2,
        COMPENSATE,
    )  # fmt: skip

    # l_i >= 1 for every row that saw a key (its max contributes exp2(0)); rows that saw none output
    # 0 and LSE -inf rather than 0/0. One correctly rounded division per output element costs nothing
    # next to the loop and saves float32 outputs the approximate divide's extra ulps.
    sees_a_key = l_i > 0.0
    l_safe = tl.where(sees_a_key, l_i, 1.0)
    out = tl.where(sees_a_key[:, None], tl.math.div_rn(acc, l_safe[:, None]), 0.0)
    lse = tl.where(sees_a_key, m_i + tl.math.log2(l_safe), float("-inf"))

    o_ptrs = (
        Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        + start_m.to(tl.int64) * stride_om + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    )  # fmt: skip
    if EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse_ptrs = Lse + (batch.to(tl.int64) * n_q_heads + head) * n_queries + rows
    tl.store(lse_ptrs, lse, mask=row_ok)
