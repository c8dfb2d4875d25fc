"""@triton.jit building blocks shared by the Triton kernel families: the score and block dots with
their float32 two-part variants, logit softcapping, exp/log/tanh in either precision, the sliding
window's visibility rule and the block ranges it leaves, packed sequences' bounds, and tile loads by
pointer or tensor descriptor.

Every kernel that scores a tile goes through `_scores` (or with a softcap `_softcapped_scores`) and
`_scaled_scores`, so a backward recomputes bitwise the scores its forward used, whichever family ran
either pass.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Compiled kernels round the scaled scores with libdevice's mul_rn (see _scaled_scores); the interpreter
# has no libdevice and never fuses a multiply into an add, so its plain multiply rounds the same way.
ROUND_SCORES_EXPLICITLY = tl.constexpr(not triton.knobs.runtime.interpret)
# libdevice exists only for compiled kernels; the interpreter evaluates float32's tanh in float64 (_tanh).
HAS_LIBDEVICE = tl.constexpr(not triton.knobs.runtime.interpret)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dot_parts(a, bT, DOT_PRECISION: tl.constexpr, TWO_PART: tl.constexpr):
    """(hi, lo): a @ bT over the head dim (a: (M, HEAD_DIM padded), bT: (HEAD_DIM padded, N)) in float32,
    and with TWO_PART (float32 inputs) what rounding it to float32 lost (else zeros). The dots that the
    softmax and its gradient are made of: the scores (_scores) and dP = dO V^T.

    TWO_PART takes the dot in float64 (exact products, summed with 29 more bits, on Hopper's float64
    tensor cores). A float32 "ieee" dot is one sequential FMA chain per element whose rounding error
    grows with the head dim: the fuzzer found LSE, output, dq and dk up to twice float32 eager
    attention's bound at large head dims. It is also faster than the FMA dot from D 128. hi is that dot
    rounded once, which no summation order changes (short of a float64 sum within 1e-16 of a float32 rounding
    boundary); lo sees the float64 sum's last bits, which are the same wherever the same products are summed
    in the same order (the interpreter: core._runtime).
    fp16/bf16 dots run on the tensor cores, exact products summed in float32.
    """
    if TWO_PART:
        exact = tl.dot(a.to(tl.float64), bT.to(tl.float64), out_dtype=tl.float64)
        hi = exact.to(tl.float32)
        return hi, _low_part((exact - hi.to(tl.float64)).to(tl.float32), hi)
    else:
        hi = tl.dot(a, bT, input_precision=DOT_PRECISION)
        return hi, tl.zeros_like(hi)


@triton.jit
def _two_sum(a, b):
    """(s, e): s = a + b rounded to the operands' float type, e its exact rounding error (Knuth's
    TwoSum, six additions and no branch: s + e == a + b exactly while nothing overflows). Where a or b
    is infinite, e is NaN: callers mask it."""
    s = a + b
    virtual = s - a
    return s, (a - (s - virtual)) + (b - virtual)


@triton.jit
def _low_part(low, value):
    """low, the rounding error of a float32 value, or 0 where the value is infinite: there the
    differences that compute it are inf - inf = NaN, and a NaN low part of a -inf score would turn
    its P = exp(-inf) = 0 into NaN and spoil a row whose float64 truth is finite (found by the fuzzer,
    a key holding -inf). A NaN value keeps its NaN."""
    return tl.where(tl.abs(value) == float("inf"), 0.0, low)


@triton.jit
def _hide_keys(scores, scores_low, visible, TWO_PART: tl.constexpr):
    """(scores, scores_low) with the keys a row may not see (visible false) at score -inf and, TWO_PART,
    low part 0: a hidden key's k may hold inf or NaN, and its NaN low part would make the row's P =
    exp(-inf + NaN) NaN where the float64 truth ignores the key."""
    scores = tl.where(visible, scores, float("-inf"))
    if TWO_PART:
        scores_low = tl.where(visible, scores_low, 0.0)
    return scores, scores_low


@triton.jit
def _scaled_scores(dot, qk_scale):
    """dot * qk_scale, rounded to float32 before anything is subtracted from it.

    Left to itself the compiler fuses `dot * qk_scale - m` into one FMA, which skips that rounding:
    then the row's max score minus m is not 0 but m's own rounding error, eps32 * |m|, and a one-hot
    row's P comes out exp(that) instead of exactly 1. At large logits (|m| ~ 1e4) that is 3e-3 off
    in float16 and inf/NaN gradients in float32 at sm_scale 1e37, where eager attention is exact
    (found by the fuzzer). Every kernel scales its scores here, so the forward's scores and
    the backward's recomputed ones are the same rounded numbers. It costs one multiply per score.
    """
    if ROUND_SCORES_EXPLICITLY:
        return libdevice.mul_rn(dot, qk_scale)
    else:
        return dot * qk_scale


@triton.jit
def _scores(a, bT, qk_scale, DOT_PRECISION: tl.constexpr, TWO_PART: tl.constexpr):
    """(scores, scores_low): the scaled score tile (a @ bT) * qk_scale, rounded once to float32
    (_scaled_scores), and with TWO_PART (float32 inputs) its rounding error, exactly what the dot and the
    scale lost (else zeros). Every kernel gets its scores here, so the backward's are bitwise the forward's.

    float32 logits are as precise as float32 allows: both the dot's rounding to float32 (_dot_parts) and
    the scale's (an FMA) go into scores_low. At logits ~4e4 (a pinned fuzz example): the dot's rounding
    alone, eps32 * |raw| * |sm_scale|, moved the exponent of a key 8.7 below the row max
    by 1.2e-3, and the output to 1.7x float32 eager attention's bound (1.3x with huge logits at sm_scale
    1/sqrt(128)).
    """
    raw, raw_low = _dot_parts(a, bT, DOT_PRECISION, TWO_PART)
    scores = _scaled_scores(raw, qk_scale)
    if TWO_PART:
        # The inner FMA is exact (a product's rounding error is representable); the outer rounds once.
        return scores, _low_part(tl.fma(raw_low, qk_scale, tl.fma(raw, qk_scale, -scores)), scores)
    else:
        return scores, tl.zeros_like(scores)


@triton.jit
def _tanh(x, PRECISE: tl.constexpr):
    """tanh(x) of a float32 tile.

    PRECISE (float32 inputs): libdevice's tanhf (within 2 ulp, as torch.tanh on the GPU); the interpreter,
    which has no libdevice, evaluates it in float64 and rounds once. Otherwise (fp16/bf16) from one fast
    exp2, (1 - e) / (1 + e) with e = 2^(-2 log2(e) |x|), and below |x| = 2^-5, where 1 - e would cancel,
    the series x - x^3/3 + 2x^5/15: about 1e-6 relative either way, far below the rounding of P to
    fp16/bf16 (the hardware's tanh.approx, 2^-11 relative, would be as large as fp16's rounding of P
    itself, times the cap).
    """
    if PRECISE:
        if HAS_LIBDEVICE:
            return libdevice.tanh(x)
        else:
            wide = tl.abs(x.to(tl.float64))
            e = tl.exp(-2.0 * wide)
            series = wide - wide * wide * wide / 3.0
            magnitude = tl.where(wide < 0.00390625, series, (1.0 - e) / (1.0 + e))  # below 2^-8
            return tl.where(x < 0, -magnitude, magnitude).to(tl.float32)
    else:
        small = tl.abs(x)
        e = tl.math.exp2(small * (-2.0 * LOG2E))
        square = small * small
        series = small + small * square * (square * 0.13333333333333333 - 0.3333333333333333)
        if HAS_LIBDEVICE:
            ratio = libdevice.fast_dividef(1.0 - e, 1.0 + e)  # div.approx: 2 ulp, no IEEE slow path
        else:
            ratio = (1.0 - e) / (1.0 + e)
        magnitude = tl.where(small < 0.03125, series, ratio)
        return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def _softcapped_scores(a, bT, softcap_in, softcap_out, DOT_PRECISION: tl.constexpr, TWO_PART: tl.constexpr):
    """(scores, scores_low, slope) of logit softcapping: scores = softcap_out * tanh(dot * softcap_in), with
    softcap_in = sm_scale / softcap and softcap_out = softcap (times log2(e) in base 2), i.e. each scaled
    score s becomes softcap * tanh(s / softcap) in the kernel's base. slope = 1 - tanh^2 = d capped / d s,
    which the backward multiplies into dS (recomputed here from the raw dot, never stored).

    Both products are rounded explicitly (_scaled_scores), so forward and backward see the same scores.
    TWO_PART (float32): the raw dot's and the first product's rounding errors go through the tanh's
    derivative into scores_low, with the second product's exact error (an FMA); tanh's own rounding (within
    2 ulp of its result) is not carried, so a capped float32 logit is good to a few ulps of itself, as in
    float32 eager attention, which rounds s, s / softcap, the tanh and the product.
    """
    raw, raw_low = _dot_parts(a, bT, DOT_PRECISION, TWO_PART)
    x = _scaled_scores(raw, softcap_in)
    t = _tanh(x, TWO_PART)
    slope = 1.0 - t * t
    scores = _scaled_scores(t, softcap_out)
    if TWO_PART:
        x_low = _low_part(tl.fma(raw_low, softcap_in, tl.fma(raw, softcap_in, -x)), x)
        return scores, tl.fma(t, softcap_out, -scores) + softcap_out * (slope * x_low), slope
    else:
        return scores, tl.zeros_like(scores), slope


@triton.jit
def _in_window(keys, rows, diagonal, window_left, window_right):
    """Whether query i sees key j (broadcast): i + diagonal - window_left <= j <= i + diagonal + window_right,
    FlashAttention's sliding window."""
    offset = keys - rows - diagonal
    return (offset >= -window_left) & (offset <= window_right)


@triton.jit
def _window_key_blocks(start_m, n_keys, diagonal, window_left, window_right, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):  # fmt: skip
    """The keys the query tile [start_m, start_m + BLOCK_M) sees under a sliding window, as
    (key_start, unmasked_start, unmasked_end, key_end): keys [unmasked_start, unmasked_end) are whole
    blocks below n_keys that every row of the tile sees in full (no mask, no predicated load);
    [key_start, unmasked_start) and [unmasked_end, key_end) are the window's two edges (masked). Blocks
    outside [key_start, key_end) are never visited. Each range starts at a multiple of BLOCK_N or is
    empty. Where no block is whole, unmasked_start is key_end rounded up to a block: the first edge
    then covers every visible key and the others are empty."""
    key_start = (tl.maximum(start_m + diagonal - window_left, 0) // BLOCK_N) * BLOCK_N
    key_end = tl.minimum(n_keys, tl.maximum(start_m + BLOCK_M + diagonal + window_right, 0))
    seen_by_all_from = (
        tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + diagonal - window_left, 0), BLOCK_N) * BLOCK_N
    )
    seen_by_all_to = tl.minimum(
        (tl.maximum(start_m + diagonal + window_right + 1, 0) // BLOCK_N) * BLOCK_N,
        (n_keys // BLOCK_N) * BLOCK_N,
    )
    unmasked_start = tl.maximum(key_start, tl.minimum(seen_by_all_from, tl.cdiv(key_end, BLOCK_N) * BLOCK_N))
    return key_start, unmasked_start, tl.maximum(unmasked_start, seen_by_all_to), key_end


@triton.jit
def _window_query_blocks(start_n, n_queries, diagonal, window_left, window_right, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):  # fmt: skip
    """The transpose of _window_key_blocks, for the key tile [start_n, start_n + BLOCK_N):
    (row_start, unmasked_start, unmasked_end, row_end), rows [unmasked_start, unmasked_end) seeing every
    key of the tile (the last block may reach past n_queries: such rows have P = 0 and need no mask),
    the two edges masked, rows outside [row_start, row_end) never visited; the same block alignment."""
    row_start = (tl.maximum(start_n - diagonal - window_right, 0) // BLOCK_M) * BLOCK_M
    row_end = tl.minimum(n_queries, tl.maximum(start_n + BLOCK_N - diagonal + window_left, 0))
    seeing_all_from = (
        tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diagonal - window_right, 0), BLOCK_M) * BLOCK_M
    )
    seeing_all_to = tl.minimum(
        (tl.maximum(start_n - diagonal + window_left + 1, 0) // BLOCK_M) * BLOCK_M,
        tl.cdiv(n_queries, BLOCK_M) * BLOCK_M,
    )
    # min(max(...)), not max(row_start, min(seeing_all_from, ...)): the same blocks (where they differ,
    # row_end <= row_start and no loop runs), but that form put ptxas's C7515 (serialised wgmma) on every
    # window dK/dV kernel (docs/perf-notes.md)
    unmasked_start = tl.minimum(tl.maximum(row_start, seeing_all_from), tl.cdiv(row_end, BLOCK_M) * BLOCK_M)
    return row_start, unmasked_start, tl.maximum(unmasked_start, seeing_all_to), row_end


@triton.jit
def _sequence(CuSeqlens, index):
    """(first row, length) of packed sequence `index`, from its cumulative lengths (VARLEN)."""
    start = tl.load(CuSeqlens + index)
    return start, tl.load(CuSeqlens + index + 1) - start


@triton.jit
def _exp(x, BASE_2: tl.constexpr, PRECISE: tl.constexpr):
    """2^x (BASE_2) or e^x, by the fast hardware approximation or (PRECISE) by libdevice.

    The approximation's few-ulp error vanishes under fp16/bf16 rounding of P but not in float32,
    where it would make the kernel several times less accurate than float32 eager attention.
    """
    if BASE_2:
        if PRECISE:
            return libdevice.exp2(x)
        else:
            return tl.math.exp2(x)
    else:
        if PRECISE:
            return libdevice.exp(x)
        else:
            return tl.exp(x)


@triton.jit
def _log(x, BASE_2: tl.constexpr, PRECISE: tl.constexpr):
    """log2(x) (BASE_2) or ln(x), precise (libdevice) or by the hardware approximation."""
    if BASE_2:
        if PRECISE:
            return libdevice.log2(x)
        else:
            return tl.math.log2(x)
    else:
        if PRECISE:
            return libdevice.log(x)
        else:
            return tl.log(x)


@triton.jit
def _accumulate_dot(acc, comp, a, b, DOT_PRECISION: tl.constexpr, COMPENSATE: tl.constexpr):
    """(acc, comp) after adding a @ b to the running sum acc.

    fp16/bf16 operands accumulate straight into acc on the tensor cores (comp is unused and unchanged).
    float32 operands (COMPENSATE) take each block's dot in float64, rounded once to float32 (as the
    head-dim dots do, see _dot_parts), and Kahan-sum the blocks, comp carrying the rounding error of
    acc. A float32 "ieee" dot is one sequential FMA chain per
    element: across a 32-key block it left the output at 1.3-1.7x float32 eager attention's bound at
    large logits, and the compiler folds `acc + a @ b` into one dot continuing acc's chain, so a whole
    row or column of N products would be summed sequentially (18x the eager error at 4096 rows). With
    one rounding per block and Kahan across blocks, the error stays at the level of one rounding.
    """
    if COMPENSATE:
        block = tl.dot(a.to(tl.float64), b.to(tl.float64), out_dtype=tl.float64).to(tl.float32)
        y = block - comp
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
def _load_rows(source, start, row_ok, col_ok, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr,
               DESCRIPTOR: tl.constexpr):  # fmt: skip
    """A (rows, head dim) tile starting at row `start`: through a tensor descriptor (DESCRIPTOR: the copy
    engine, which zero-fills rows past the tensor and columns past HEAD_DIM by itself) or from a pointer
    tile already placed at `start` (masked loads, _load_tile)."""
    if DESCRIPTOR:
        return source.load([start, 0])
    else:
        return _load_tile(source, row_ok, col_ok, EVEN_ROWS, EVEN_COLS)


@triton.jit
def _load_cols(source, start, d_ok, row_ok, EVEN_D: tl.constexpr, EVEN_ROWS: tl.constexpr,
               DESCRIPTOR: tl.constexpr):  # fmt: skip
    """The transpose of _load_rows: a (head dim, rows) tile of rows from `start` on, e.g. K^T."""
    if DESCRIPTOR:
        return source.load([start, 0]).T
    else:
        return _load_tile(source, d_ok, row_ok, EVEN_D, EVEN_ROWS)


@triton.jit
def _head_rows(base, n_rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr):  # fmt: skip
    """A tensor descriptor over one head's (n_rows, HEAD_DIM) matrix (row stride stride_row, unit column
    stride), read in (BLOCK_ROWS, BLOCK_D) tiles. The host checks what the copy engine needs first:
    a 16-byte aligned base and 16-byte multiple row strides (core.kernels.portable.plans.descriptors_fit)."""
    return tl.make_tensor_descriptor(
        base, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1], block_shape=[BLOCK_ROWS, BLOCK_D]
    )
