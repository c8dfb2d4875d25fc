"""@triton.jit building blocks shared by the Triton kernel families: the score and block dots with
their float32 two-part variants, exp/log in either base, and tile loads by pointer or tensor descriptor.

Every kernel that scores a tile goes through `_scores` and `_scaled_scores`, so a backward recomputes
bitwise the scores its forward used, whichever family ran either pass.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Compiled kernels round the scaled scores with libdevice's mul_rn (see _scaled_scores); the interpreter
# has no libdevice and never fuses a multiply into an add, so its plain multiply rounds the same way.
ROUND_SCORES_EXPLICITLY = tl.constexpr(not triton.knobs.runtime.interpret)


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
        return hi, (exact - hi.to(tl.float64)).to(tl.float32)
    else:
        hi = tl.dot(a, bT, input_precision=DOT_PRECISION)
        return hi, tl.zeros_like(hi)


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
        return scores, tl.fma(raw_low, qk_scale, tl.fma(raw, qk_scale, -scores))
    else:
        return scores, tl.zeros_like(scores)


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
