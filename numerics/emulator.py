"""A numpy emulator of the kernel's arithmetic, with the format of every quantity selectable.

The kernel (packages/core) computes, for each tile of BLOCK_M query rows, an online softmax over key
blocks of BLOCK_N keys visited in ascending order. fp16/bf16 inputs work in base 2 (`exp="exp2"`):

    s     = dot(q, k^T) * (sm_scale * log2 e)       fp32 dot of fp16/bf16 inputs, scale folded into base 2
    m_new = max(m, rowmax(s))                       running max
    alpha = exp2(m - m_new)                         rescale factor of everything summed so far
    p     = exp2(s - m_new)                         fp32
    l     = l * alpha + rowsum(p)                   running sum, of the *unrounded* p, Kahan-compensated
                                                    (every dtype, see `l_kahan`)
    acc   = acc * alpha + dot(p.to(dtype), v)       fp32 accumulator; P is rounded before the dot
    out   = (acc / l).to(dtype),   lse2 = m + log2 l   (saved for the backward; lse = lse2 * ln 2)

float32 inputs work in natural base (`exp="exp"`: s = dot(q, k^T) * sm_scale, p = exp(s - m_new), the
saved LSE m + ln l is the natural one as it is), Kahan-sum the per-block dots into acc (`kahan`), carry
every score and the running max in two parts (`two_part_scores`) and save the LSE's rounding error, which
the backward subtracts (`two_part_lse`). With both two-part knobs, in float32 operations in this order:

    exact  = dot(q, k^T) in float64;  raw = exact rounded to float32;  raw_low = (exact - raw) rounded
    s      = raw * sm_scale;  s_low = fma(raw_low, sm_scale, fma(raw, sm_scale, -s))   (what both lost)
    m_new  = max(m, rowmax(s))                  (s masked to -inf first; s_low is not)
    m_low' = rowmax(s_low where s == m_new);  m_low_new = max(m_low, m_low') if m == m_new else m_low'
                                                (0 while m_new = -inf; m_low starts at 0)
    p      = exp((s - m_new) + (s_low - m_low_new)),  alpha = exp((m - m_new) + (m_low - m_low_new))
    lse    = m + ln l,  lse_low = TwoSum's error of that add, saved with m_low
    backward: P = exp(((s - lse) + (s_low - m_low)) - lse_low)

The kernel's float32 score dots (forward q k^T, backward q k^T and k q^T; core.kernels.shared._scores)
are float64 dots of the float32 operands: rounded once to float32 they are `_dot` itself, and their low
part raw_low, which sees the float64 sum's last bits, comes from a sum in one fixed order (`_dot_parts`).

`Arithmetic` names the format each of these is stored in (numerics.formats), so one function covers the
kernel itself (the defaults), the same algorithm with low-precision running statistics (a plain,
uncompensated row sum, as in FlashAttention-2), the fp32-inside floor (P never rounded) and the remedies
the lab measures (a compensated P.V, a row sum of the rounded P, a shifted row max). A quantity is rounded
to its format each time it is written; the arithmetic producing it runs in `wide` (fp32, as on the GPU;
fp64 takes rounding out entirely to check the algorithm).

Bit-exactness with the Triton interpreter rests on doing the same float32 operations in the same order.
Every `tl.dot` there (core._runtime.patch_interpreter) sums the exact products of its operands in float64
and rounds once to float32, so its result does not depend on the tile shape or the summation order; the
emulator computes each dot the same way (`_dot`; the float32 score dots and their low parts in the
interpreter's fixed order, `_dot_parts`), and the tiles only decide where the online softmax rescales
and which keys a causal tile visits. On a GPU the tensor cores sum fp16/bf16 products in their own order
in fp32, float32 dots are float64 dots in theirs, and exp2 is `ex2.approx`, so there the emulator
agrees to a few ulp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from numerics.formats import FORMATS, Format

__all__ = ["KERNEL", "Arithmetic", "Backward", "Forward", "backward", "forward"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Qiu & Yao's test for "several logits tie the row max": another logit within this distance (natural log
# units) of the block max.
TIE_DISTANCE = 1e-3


@dataclass(frozen=True)
class Arithmetic:
    """The format each quantity is stored in ("input" = the dtype of q, k, v), and the algorithm's knobs."""

    wide: str = "fp32"  # the arithmetic itself: fp32 as on the GPU, fp64 to isolate the algorithm
    scores: str = "fp32"  # s after the QK^T dot and the scale
    m: str = "fp32"  # running max
    l: str = "fp32"  # running sum
    alpha: str = "fp32"  # rescale factor
    p: str = "fp32"  # exp(s - m) as computed
    p_cast: str = "input"  # P as it enters the P.V dot (and P^T in the dV dot of the backward)
    acc: str = "fp32"  # output accumulator (and dq/dk/dv accumulators)
    out: str = "input"  # the stored output and gradients
    ds_cast: str = "input"  # dS as it enters the dq and dk dots (backward only)
    exp: str = "exp2"  # "exp2": scale folded into a base-2 exponent (fp16/bf16 kernel); "exp": natural
    #                    exponent (fp32 kernel). The saved LSE and the backward's P are in the same base.
    block_m: int = 32
    block_n: int = 32
    row_sum: str = "p"  # "p": l sums the unrounded p (the kernel); "p_cast": the rounded P fed to P.V
    l_kahan: bool = True  # Kahan-compensate the running sum l, its compensation stored in l's format (the
    #                       kernel does, for every dtype); False: the plain sum l * alpha + rowsum
    kahan: bool = False  # Kahan-sum the per-block dots into acc (the kernel does for fp32 inputs)
    two_part_lse: bool = False  # save the LSE's rounding error too (TwoSum of m + log l), which the backward
    #                             subtracts after s - lse (the kernel does, for every dtype)
    lse_low_negligible_below: float = 0.0  # with two_part_lse, save 0 as the low part of an LSE (in its
    #                                        base) smaller than this in magnitude (the fp16/bf16 kernel: 2^8)
    two_part_scores: bool = False  # keep each score's rounding error s_low = (raw + raw_low) * qk_scale - s
    #                                (the dot's and the scale's, as the kernel's two FMAs round it) and the
    #                                running max's low part m_low (s_low of the max
    #                                score, the largest among ties); measure scores from the max as
    #                                (s - m) + (s_low - m_low), save m_low with the LSE's low part, and add
    #                                s_low - m_low after s - lse in the backward's P (the kernel does for
    #                                fp32 inputs). Needs m to hold every score exactly and no tie_shift.
    delta: str = "out"  # the backward's Delta_i: "out" = dO_i . O_i, one dot rounded once (the fp16/bf16
    #                     kernel with plans.PreciseDelta off); "p_dp" = sum_j P_ij dP_ij / sum_j P_ij in
    #                     float64, kept in two parts, with dP in two parts too and dS = P ((dP - Delta) +
    #                     (dP_low - Delta_low)) (fp32); "p_dp_blocks" = the same ratio, one key block
    #                     of the dQ tiles at a time, kept in two parts, the dQ loop's dP - Delta rounded
    #                     once from both (TwoSum), the dK/dV loop's from the high part (fp16/bf16 kernel);
    #                     "p_dp_blocks_fp32" = the same ratio summed in float32 and rounded to one float32
    #                     part (that kernel until 2026-12-07, which missed tied pairs: numerics E11)
    pv_split: bool = False  # compensated P.V: P = hi + lo, both in the P.V dtype, two dots into acc
    tie_shift: bool = False  # Qiu & Yao: move the block max off the ties so that no p is exactly 1

    def fmt(self, quantity: str, input_format: str) -> Format:
        name = getattr(self, quantity)
        return FORMATS[input_format if name == "input" else name]

    def with_(self, **changes) -> Arithmetic:
        return replace(self, **changes)


KERNEL = Arithmetic()


@dataclass
class Forward:
    out: np.ndarray  # (..., Nq, D), values in the `out` format
    lse: np.ndarray  # (..., Nq), natural log as core.attention returns it, -inf for rows that see no key
    saved_lse: np.ndarray  # the LSE in the exponent's base (base 2 with exp2), which the kernel saves
    # With `two_part_lse`, the LSE's low parts as the kernel saves them, (parts, ..., Nq): [0] saved_lse's
    # rounding error, [1] (with `two_part_scores` only) the running max's low part; 0 where no key. Else None.
    lse_low: np.ndarray | None


@dataclass
class Backward:
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray


def _carrier(arith: Arithmetic):
    return np.float64 if arith.wide == "fp64" else np.float32


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """tl.dot as the interpreted kernel computes it (core._runtime.patch_interpreter): the exact products
    (every fp16/bf16/fp32 product is exact in float64) summed in float64 and rounded once to the carrier.
    No summation order or tile shape can change the result, short of a float64 sum landing within ~1e-16
    of a float32 rounding boundary. Adding an accumulator is the caller's: an fp32 add after the rounding.
    """
    return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.result_type(a, b))


def _tiles(x: np.ndarray, block: int) -> np.ndarray:
    """(..., N, D) -> (..., ceil(N / block), block, D), zero-padded as the kernel's masked loads are."""
    n = x.shape[-2]
    padded = -(-n // block) * block
    if padded != n:
        pad = [(0, 0)] * x.ndim
        pad[-2] = (0, padded - n)
        x = np.pad(x, pad)
    return x.reshape(*x.shape[:-2], padded // block, block, x.shape[-1])


def _key_end(n_tiles: int, block: int, n_q: int, n_k: int, causal: bool) -> np.ndarray:
    """Per query tile, where the kernel's loop over keys ends: at Nk, or with `causal` after the last key
    the tile's last row may see (bottom-right aligned)."""
    if not causal:
        return np.full(n_tiles, n_k)
    return np.minimum(n_k, np.maximum(np.arange(n_tiles) * block + block + (n_k - n_q), 0))


def _tile_index(n_tiles: int, block: int) -> np.ndarray:
    """The sequence index of each row of stacked tiles, shaped (n_tiles, block, 1)."""
    return (np.arange(n_tiles)[:, None] * block + np.arange(block)[None, :])[..., None]


def _visible(rows: np.ndarray, cols: np.ndarray, n_q: int, n_k: int, causal: bool) -> np.ndarray:
    """Which (query, key) pairs count: real queries and keys, with `causal` the bottom-right triangle."""
    keep = (rows < n_q) & (cols < n_k)
    if causal:
        keep = keep & (cols <= rows + (n_k - n_q))
    return keep


def _expand_heads(q: np.ndarray, *kv: np.ndarray) -> list[np.ndarray]:
    """GQA/MQA: query head h reads key/value head h // group, as in core.attention_reference."""
    group = q.shape[-3] // kv[0].shape[-3]
    return [np.repeat(x, group, axis=-3) if group > 1 else x for x in kv]


def forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    input_format: str,
    arith: Arithmetic = KERNEL,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    key_order: np.ndarray | None = None,
) -> Forward:
    """Emulate the forward pass on q (..., Hq, Nq, D), k/v (..., Hkv, Nk, D) holding `input_format` values.

    `key_order` is the order in which keys are visited (a permutation of range(Nk)); the kernel visits
    them in index order, so the kernel sees the same arithmetic when given k[order] and v[order].
    """
    if key_order is not None:
        if causal:
            raise ValueError("a key order other than the index order has no causal meaning")
        k, v = k[..., key_order, :], v[..., key_order, :]
    k, v = _expand_heads(q, k, v)
    wide = _carrier(arith)
    fmt = {
        name: arith.fmt(name, input_format)
        for name in ("scores", "m", "l", "alpha", "p", "p_cast", "acc", "out")
    }
    if arith.two_part_scores and (
        arith.tie_shift or fmt["m"].significand_bits < fmt["scores"].significand_bits
    ):
        raise ValueError(
            "two_part_scores takes the max's low part from the score that is the max: it needs m to hold "
            "every score exactly and no tie_shift"
        )
    n_q, d = q.shape[-2:]
    n_k = v.shape[-2]
    bm, bn = arith.block_m, arith.block_n
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    base2 = arith.exp == "exp2"
    exp, log = (np.exp2, np.log2) if base2 else (np.exp, np.log)
    score_scale = _score_scale(scale, base2, wide)
    tie_distance = TIE_DISTANCE * (LOG2E if base2 else 1.0)

    # The kernel pads D to a power of two with zeros, which add nothing to a dot's exact sum.
    q_tiles = _tiles(q.astype(wide), bm)  # (..., nM, BM, D)
    k, v = k.astype(wide), v.astype(wide)
    rows = _tile_index(q_tiles.shape[-3], bm)  # (nM, BM, 1)
    shape = q_tiles.shape[:-1]  # (..., nM, BM)
    m = np.full(shape, -np.inf, dtype=wide)
    l = np.zeros(shape, dtype=wide)
    l_comp = np.zeros(shape, dtype=wide)  # Kahan's running rounding error of l
    m_low = np.zeros(shape, dtype=wide)  # with `two_part_scores`, the running max's low part (else 0)
    acc = np.zeros((*shape, v.shape[-1]), dtype=wide)
    comp = np.zeros_like(acc)  # Kahan's running rounding error of acc
    key_end = _key_end(q_tiles.shape[-3], bm, n_q, n_k, causal)

    for start in range(0, n_k, bn):
        # A causal query tile stops at the last key block its rows can see; later blocks must leave its
        # state untouched (masking alone would not: a Kahan step folds comp into acc even for P = 0).
        active = (start < key_end)[:, None]  # (nM, 1)
        cols = start + np.arange(bn)
        kb = _block(k, start, bn)  # (..., BN, D)
        vb = _block(v, start, bn)
        raw, raw_low = _dot_parts(q_tiles, np.swapaxes(kb, -1, -2)[..., None, :, :], arith)
        s = fmt["scores"].round(raw * score_scale)
        if arith.two_part_scores:
            s_low = _scaled_low(raw, score_scale, s, raw_low)  # before masking, as the kernel computes it
        s = np.where(_visible(rows, cols, n_q, n_k, causal), s, -np.inf)

        block_max = s.max(axis=-1)
        if arith.tie_shift:
            block_max = _shift_off_ties(s, block_max, tie_distance)
        m_new = fmt["m"].round(np.maximum(m, block_max))
        # A row that has seen no visible key yet keeps m = -inf; exponentiate against 0 so that its p and
        # alpha are 0 rather than NaN (it has nothing to rescale).
        m_ref = np.where(np.isneginf(m_new), wide(0), m_new)
        if arith.two_part_scores:
            # The max's low part: that of the score equal to m_new (the largest among ties, and the old
            # m_low's too where the max did not move); 0 while the row has seen no key.
            low_at_max = np.where(s == m_new[..., None], s_low, -np.inf).max(axis=-1)
            m_low_new = np.where(m == m_new, np.maximum(m_low, low_at_max), low_at_max)
            m_low_new = fmt["m"].round(np.where(np.isneginf(m_new), wide(0), m_low_new))
            alpha = fmt["alpha"].round(exp((m - m_ref) + (m_low - m_low_new)))
            p = fmt["p"].round(exp((s - m_ref[..., None]) + (s_low - m_low_new[..., None])))
            m_low = np.where(active, m_low_new, m_low)
        else:
            alpha = fmt["alpha"].round(exp(m - m_ref))
            p = fmt["p"].round(exp(s - m_ref[..., None]))

        pv_fmt = fmt["p_cast"]
        if arith.pv_split:
            p_hi = pv_fmt.round(p)
            p_lo = pv_fmt.round(p - p_hi)
            p_in_dot = p_hi + p_lo
        else:
            p_in_dot = pv_fmt.round(p)
        summed = p_in_dot if arith.row_sum == "p_cast" else p
        l_new, l_comp_new = _running_sum(l, l_comp, alpha, summed.sum(axis=-1), fmt["l"], arith.l_kahan)
        acc_new = acc * alpha[..., None]
        comp_new = comp * alpha[..., None] if arith.kahan else comp
        for p_part in (p_hi, p_lo) if arith.pv_split else (p_in_dot,):
            acc_new, comp_new = _accumulate(acc_new, comp_new, _dot(p_part, vb[..., None, :, :]), arith.kahan)
        m, l = np.where(active, m_new, m), np.where(active, l_new, l)
        l_comp = np.where(active, l_comp_new, l_comp)
        acc = np.where(active[..., None], fmt["acc"].round(acc_new), acc)
        comp = np.where(active[..., None], comp_new, comp)

    seen = l > 0
    l_safe = np.where(seen, l, 1)
    out = fmt["out"].round(np.where(seen[..., None], acc / l_safe[..., None], 0))
    # The kernel saves m + log(l) in its base; core.attention multiplies a base-2 one by ln 2 in fp32.
    log_l = log(l_safe)
    total, low = _two_sum(m, log_l)
    saved = np.where(seen, total, -np.inf)
    lse = saved * wide(LN2) if base2 else saved
    lse_low = None
    if arith.two_part_lse:
        # TwoSum's exact rounding error of m + log(l). Rows that see no key (m = -inf) make NaNs here,
        # which the kernel and this replace by 0.
        low = np.where(seen, low, 0)
        low = np.where(np.abs(saved) < arith.lse_low_negligible_below, 0, low)
        parts = (low, m_low) if arith.two_part_scores else (low,)
        lse_low = np.stack([_untile_rows(part.astype(wide), n_q) for part in parts])
    return Forward(_untile(out, n_q), _untile_rows(lse, n_q), _untile_rows(saved, n_q), lse_low)


def _score_scale(scale: float, base2: bool, wide) -> np.ndarray:
    """The kernels' qk_scale, one constant in the carrier that multiplies the dot: sm_scale * log2(e)
    rounded once in base 2, sm_scale itself in natural base (core.kernels.portable.plans.score_scale)."""
    return wide(scale * LOG2E if base2 else scale)


def _dot_parts(a: np.ndarray, b: np.ndarray, arith: Arithmetic, two_part: bool | None = None):
    """(hi, lo): the dot a @ b, and when `two_part` (default: `two_part_scores`) on a float32 carrier what
    rounding it to float32 lost (else None), as core.kernels.shared._dot_parts computes them: a float64
    dot, summed in one fixed order (k ascending in long double, as core._runtime.float64_dot has the
    interpreter do), whose last bits reach lo, so they must be the interpreted kernel's."""
    two_part = arith.two_part_scores if two_part is None else two_part
    if not (two_part and _carrier(arith) == np.float32):
        return _dot(a, b), None
    exact = np.matmul(a.astype(np.longdouble), b.astype(np.longdouble)).astype(np.float64)
    raw = exact.astype(np.float32)
    return raw, (exact - raw.astype(np.float64)).astype(np.float32)


def _scaled_low(raw: np.ndarray, scale, scores: np.ndarray, raw_low: np.ndarray | None) -> np.ndarray:
    """(raw + raw_low) * scale - scores computed exactly and rounded once to the carrier: the kernel's
    fma(raw_low, qk_scale, fma(raw, qk_scale, -scores)), what the dot's rounding (raw_low, float32 only)
    and the scale's lost (s_low of `two_part_scores`).

    A float32 carrier takes it in float64, where the product of two float32s is exact, and so is its
    difference from any rounding of it and (the terms' bits span under 53 places) the sum with
    raw_low * scale. A float64 carrier splits the product (Dekker's TwoProduct):
    raw * scale = prod + err exactly, and (prod - scores) + err rounds once.
    """
    if raw.dtype == np.float32:
        scale = np.float64(scale)
        exact = raw.astype(np.float64) * scale - scores.astype(np.float64)
        if raw_low is not None:
            exact = exact + raw_low.astype(np.float64) * scale
        return exact.astype(np.float32)
    scale = np.float64(scale)
    prod = raw * scale
    raw_hi, raw_lo = _split(raw)
    scale_hi, scale_lo = _split(scale)
    err = ((raw_hi * scale_hi - prod) + raw_hi * scale_lo + raw_lo * scale_hi) + raw_lo * scale_lo
    with np.errstate(invalid="ignore"):  # an overflowing product has no finite low part
        return (prod - scores) + err


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s, e): a + b rounded in the operands' format and its exact rounding error, in the kernels' order
    of operations (core.kernels.shared._two_sum). Infinite operands give a NaN e (callers mask it)."""
    with np.errstate(invalid="ignore"):
        s = a + b
        virtual = s - a
        return s, (a - (s - virtual)) + (b - virtual)


def _split(x):
    """Veltkamp's split of float64 x into hi + lo, each with at most 26 significant bits."""
    c = x * 134217729.0  # 2^27 + 1
    hi = c - (c - x)
    return hi, x - hi


def _running_sum(l, comp, alpha, block_sum, fmt: Format, kahan: bool):
    """(l, comp) after rescaling by alpha and adding one block's row sums, in the kernel's order of
    operations: with `kahan` Kahan's compensated sum (comp carries the rounding error of l and is rescaled
    with it), else the plain l * alpha + block_sum rounded once to l's format."""
    if not kahan:
        return fmt.round(l * alpha + block_sum), comp
    l, comp = fmt.round(l * alpha), fmt.round(comp * alpha)
    y = block_sum - comp
    total = fmt.round(l + y)
    return total, fmt.round((total - l) - y)


def _accumulate(acc: np.ndarray, comp: np.ndarray, product: np.ndarray, kahan: bool):
    """acc + product (a dot with an accumulator, as the interpreter computes it), or with `kahan` Kahan's
    compensated sum, comp carrying the rounding error of acc: the kernel's order of operations for fp32."""
    if not kahan:
        return product + acc, comp
    y = product - comp
    total = acc + y
    return total, (total - acc) - y


def _block(x: np.ndarray, start: int, size: int) -> np.ndarray:
    """Rows start..start+size of (..., N, D), zero-padded past N (the kernel's masked load)."""
    block = x[..., start : start + size, :]
    if block.shape[-2] < size:
        pad = [(0, 0)] * x.ndim
        pad[-2] = (0, size - block.shape[-2])
        block = np.pad(block, pad)
    return block


def _row_sums_delta(q, k, v, dout, lse, lse_low, max_low, probabilities, arith, causal, wide,
                    one_part: bool = False):  # fmt: skip
    """Delta = sum_j P dP / sum_j P as the fp16/bf16 dQ kernel's pass sums it (backward.py:
    _p_dp_row_sums): the dQ tiles' rows, key blocks in order, each block's products summed across the
    block, the block sums added in turn; 0 for a row that sees no key. Each product P dP is split
    exactly into its float32 rounding and that rounding's error (the kernel's FMA); the block sums the
    roundings in float64 and the errors in float32, and the rows' sums (of P too) run in float64. Returns
    Delta in two float32 parts (high, low), as the kernel keeps it. `one_part`: the earlier pass,
    products and sums in float32 and Delta in one part (low 0)."""
    bm, bn = arith.block_m, arith.block_n
    n_q, n_k = q.shape[-2], k.shape[-2]
    q_tiles, do_tiles = _tiles(q, bm), _tiles(dout, bm)
    query_index = (np.arange(q_tiles.shape[-3])[:, None] * bm + np.arange(bm)[None, :])[..., None]
    lse_tiles, lse_low_tiles, max_low_tiles = (_tiles(x[..., None], bm) for x in (lse, lse_low, max_low))
    p_dp_sum = np.zeros(q_tiles.shape[:-1], dtype=wide if one_part else np.float64)
    p_sum = np.zeros_like(p_dp_sum)
    key_end = _key_end(q_tiles.shape[-3], bm, n_q, n_k, causal)
    for start in range(0, n_k, bn):
        active = (start < key_end)[:, None]  # (nM, 1)
        key_index = start + np.arange(bn)
        k_blk = _block(k, start, bn)[..., None, :, :]
        v_blk = _block(v, start, bn)[..., None, :, :]
        p = probabilities(
            _dot_parts(q_tiles, np.swapaxes(k_blk, -1, -2), arith), query_index, key_index,
            lse_tiles, lse_low_tiles, max_low_tiles,
        ).astype(wide)  # fmt: skip
        dp = _dot_parts(do_tiles, np.swapaxes(v_blk, -1, -2), arith)[0].astype(wide)
        product = p * dp
        if one_part:
            p_dp_sum = np.where(active, p_dp_sum + np.sum(product, axis=-1), p_dp_sum).astype(wide)
            p_sum = np.where(active, p_sum + np.sum(p, axis=-1), p_sum).astype(wide)
            continue
        error = (p.astype(np.float64) * dp.astype(np.float64) - product.astype(np.float64)).astype(wide)
        block_sum = np.sum(product.astype(np.float64), axis=-1) + np.sum(error, axis=-1).astype(np.float64)
        p_dp_sum = np.where(active, p_dp_sum + block_sum, p_dp_sum)
        p_sum = np.where(active, p_sum + np.sum(p, axis=-1).astype(np.float64), p_sum)
    exact = np.where(p_sum > 0, p_dp_sum / np.where(p_sum > 0, p_sum, 1), 0)
    delta = exact.astype(wide)
    delta_low = np.zeros_like(delta) if one_part else (exact - delta.astype(np.float64)).astype(wide)
    return _untile_rows(delta, n_q), _untile_rows(delta_low, n_q)


def _untile(x: np.ndarray, n: int) -> np.ndarray:
    """(..., nT, T, D) -> (..., n, D), dropping the padded rows."""
    return x.reshape(*x.shape[:-3], -1, x.shape[-1])[..., :n, :]


def _untile_rows(x: np.ndarray, n: int) -> np.ndarray:
    """(..., nT, T) -> (..., n): one statistic per row, the padded rows dropped."""
    return _untile(x[..., None], n)[..., 0]


def _shift_off_ties(s: np.ndarray, block_max: np.ndarray, distance: float) -> np.ndarray:
    """Qiu & Yao's fix: where another logit lies within `distance` of the block max, subtract a larger
    value (2 max for a positive max, 0 for a negative one) so that no exponential is exactly 1."""
    tied = np.isfinite(block_max) & ((s >= (block_max - distance)[..., None]).sum(axis=-1) > 1)
    shifted = np.where(block_max > 0, 2 * block_max, np.where(block_max < 0, 0, block_max))
    return np.where(tied, shifted, block_max).astype(s.dtype)


def backward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    dout: np.ndarray,
    lse: np.ndarray,
    input_format: str,
    arith: Arithmetic = KERNEL,
    *,
    lse_low: np.ndarray | None = None,
    causal: bool = False,
    sm_scale: float | None = None,
) -> Backward:
    """Emulate the FA2-style backward: P recomputed division-free from the saved LSE, two atomic-free passes.

    `lse` is the LSE the forward saves (Forward.saved_lse: base 2 with exp2, natural with exp), as the
    kernel reads it; `lse_low` its low parts (Forward.lse_low), given exactly when `two_part_lse`.
    Below exp is exp2 or exp and qk_scale is sm_scale (* log2 e in base 2), as in the forward, and every
    dot is `_dot` (the kernel's float32 score dots dot(k, qT) and dot(q, kT), float64 dots rounded once,
    included), so that which operand is which does not matter; with a two-part LSE, P is
    exp((s - lse) - lse_low[0]), and with `two_part_scores` exp(((s - lse) + (s_low - m_low)) - lse_low[0]),
    s_low the score's rounding error as in the forward and m_low = lse_low[1] the running max's.

    delta = diag(dot(dO, O^T)), one rounding per row as the kernel's preprocess computes it (with
    `delta="p_dp"` sum(P * dP) / sum(P) per row in float64, in two float32 parts, as the float32 dQ
    kernel computes it, and dP - delta below taken with both low parts; with `delta="p_dp_blocks"` the
    same ratio a key block at a time, in two parts, as the fp16/bf16 dQ kernel's pass sums it, the dQ
    pass's dP - delta rounded once from both parts and the dK/dV pass's from the high one), then
    dK/dV pass, each BLOCK_N key tile summing over the query blocks in ascending order, on transposed
    tiles as the kernel does:
        pT = exp(dot(k, qT) * qk_scale - lse);  dv += dot(pT.to(dtype), dO)
        dsT = pT * (dot(v, dO^T) - delta);       dk += dot(dsT.to(dtype), q)
    dQ pass, each BLOCK_M query tile summing over the key blocks in ascending order:
        p = exp(dot(q, kT) * qk_scale - lse);  ds = p * (dot(dO, vT) - delta);  dq += dot(ds.to(dtype), k)
    dk and dq are scaled by sm_scale once at the end. Only MHA is emulated (Hq == Hkv): GQA sums dk/dv
    over a head group, an order the lab does not study; nor is a gradient of the LSE (dLSE, which the
    kernel subtracts from delta).
    """
    if arith.two_part_lse != (lse_low is not None):
        raise ValueError("lse_low is the saved LSE's low part: give it exactly when arith.two_part_lse")
    wide = _carrier(arith)
    fmt = {name: arith.fmt(name, input_format) for name in ("scores", "p", "p_cast", "ds_cast", "acc", "out")}
    n_q, d = q.shape[-2:]
    n_k = k.shape[-2]
    bm, bn = arith.block_m, arith.block_n
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    base2 = arith.exp == "exp2"
    exp = np.exp2 if base2 else np.exp
    score_scale = _score_scale(scale, base2, wide)
    q, k, v, out, dout = (x.astype(wide) for x in (q, k, v, out, dout))
    # A row that sees no key (LSE -inf) has every score masked, so its p is 0 whatever lse says.
    lse = np.where(np.isfinite(lse), lse, 0).astype(wide)
    # Without a low part subtract zeros, which changes no bit of s - lse.
    lse_low, max_low = (np.zeros_like(lse),) * 2 if lse_low is None else (lse_low[0], lse_low[-1])
    lse_low, max_low = lse_low.astype(wide), max_low.astype(wide)

    def probabilities(dot, query_index, key_index, lse_of_queries, lse_low_of_queries, max_low_of_queries):
        raw, raw_low = dot
        s = fmt["scores"].round(raw * score_scale)
        s_low = _scaled_low(raw, score_scale, s, raw_low) if arith.two_part_scores else None
        # Hidden scores give P = 0, as the kernel's masks do (it masks P itself, to the same 0).
        s = np.where(_visible(query_index, key_index, n_q, n_k, causal), s, -np.inf)
        shifted = s - lse_of_queries
        if s_low is not None:
            shifted = shifted + (s_low - max_low_of_queries)
        return fmt["p"].round(exp(shifted - lse_low_of_queries))

    two_part_dp = arith.delta == "p_dp"
    if two_part_dp:
        every_query, every_key = np.arange(n_q)[:, None], np.arange(n_k)
        p = probabilities(
            _dot_parts(q, np.swapaxes(k, -1, -2), arith), every_query, every_key,
            lse[..., None], lse_low[..., None], max_low[..., None],
        ).astype(np.float64)  # fmt: skip
        dp, dp_low = _dot_parts(dout, np.swapaxes(v, -1, -2), arith, two_part=True)
        dp_low = np.zeros_like(dp) if dp_low is None else dp_low  # a float64 carrier's dot is one part
        p_sum = p.sum(axis=-1)
        p_dp_sum = (p * (dp.astype(np.float64) + dp_low.astype(np.float64))).sum(axis=-1)
        exact_delta = np.where(p_sum > 0, p_dp_sum / np.where(p_sum > 0, p_sum, 1), 0)
        delta = exact_delta.astype(wide)
        delta_low = (exact_delta - delta.astype(np.float64)).astype(wide)
    elif arith.delta in ("p_dp_blocks", "p_dp_blocks_fp32"):
        delta, delta_low = _row_sums_delta(
            q, k, v, dout, lse, lse_low, max_low, probabilities, arith, causal, wide,
            one_part=arith.delta == "p_dp_blocks_fp32",
        )  # fmt: skip
    else:
        delta = _dot(dout[..., None, :], out[..., :, None])[..., 0, 0]
        delta_low = np.zeros_like(delta)

    def dp_minus_delta(dot, delta_of_queries, delta_low_of_queries, low_delta=False):
        """dP - delta as the kernel's _dp_minus_delta takes it (dot: _dot_parts of dO and V); low_delta
        (the fp16/bf16 dQ loop after the pass): dP - (delta + delta_low) rounded once, through TwoSum."""
        dp, dp_low = dot
        if two_part_dp and dp_low is not None:
            return (dp - delta_of_queries) + (dp_low - delta_low_of_queries)
        if low_delta:
            difference, error = _two_sum(dp, -delta_of_queries)
            return difference + (error - delta_low_of_queries)
        return dp - delta_of_queries

    # dK/dV: key tiles stacked (..., nN, BN, D), query blocks visited in order. Tiles are (keys x queries).
    k_tiles, v_tiles = _tiles(k, bn), _tiles(v, bn)
    key_index = (np.arange(k_tiles.shape[-3])[:, None] * bn + np.arange(bn)[None, :])[
        ..., None
    ]  # (nN, BN, 1)
    dk, dk_comp, dv, dv_comp = (np.zeros(k_tiles.shape, dtype=wide) for _ in range(4))
    # A causal key tile starts at the first query block that can see any of its keys.
    tile_starts = np.arange(k_tiles.shape[-3]) * bn
    row_start = (
        (np.maximum(tile_starts - (n_k - n_q), 0) // bm) * bm if causal else np.zeros_like(tile_starts)
    )
    for start in range(0, n_q, bm):
        active = (start >= row_start)[:, None, None]  # (nN, 1, 1)
        query_index = start + np.arange(bm)  # (BM,): along the columns of the transposed tiles
        q_blk = _block(q, start, bm)[..., None, :, :]  # (..., 1, BM, D)
        do_blk = _block(dout, start, bm)[..., None, :, :]
        lse_blk, lse_low_blk, max_low_blk, delta_blk, delta_low_blk = (
            _block(x[..., None], start, bm)[..., None, None, :, 0]
            for x in (lse, lse_low, max_low, delta, delta_low)
        )  # (..., 1, 1, BM)
        dot_t = _dot_parts(k_tiles, np.swapaxes(q_blk, -1, -2), arith)
        p_t = probabilities(dot_t, query_index, key_index, lse_blk, lse_low_blk, max_low_blk)
        dp_t = _dot_parts(v_tiles, np.swapaxes(do_blk, -1, -2), arith, two_part=two_part_dp)
        ds_t = p_t * dp_minus_delta(dp_t, delta_blk, delta_low_blk)
        dv_new, dv_comp_new = _accumulate(dv, dv_comp, _dot(fmt["p_cast"].round(p_t), do_blk), arith.kahan)
        dk_new, dk_comp_new = _accumulate(dk, dk_comp, _dot(fmt["ds_cast"].round(ds_t), q_blk), arith.kahan)
        dv, dv_comp = np.where(active, fmt["acc"].round(dv_new), dv), np.where(active, dv_comp_new, dv_comp)
        dk, dk_comp = np.where(active, fmt["acc"].round(dk_new), dk), np.where(active, dk_comp_new, dk_comp)
    dk = fmt["out"].round(dk * wide(scale))
    dv = fmt["out"].round(dv)

    # dQ: query tiles stacked (..., nM, BM, D), key blocks visited in order.
    q_tiles, do_tiles = _tiles(q, bm), _tiles(dout, bm)
    query_index = (np.arange(q_tiles.shape[-3])[:, None] * bm + np.arange(bm)[None, :])[
        ..., None
    ]  # (nM, BM, 1)
    # (..., nM, BM, 1)
    lse_tiles, lse_low_tiles, max_low_tiles, delta_tiles, delta_low_tiles = (
        _tiles(x[..., None], bm) for x in (lse, lse_low, max_low, delta, delta_low)
    )
    dq, dq_comp = np.zeros(q_tiles.shape, dtype=wide), np.zeros(q_tiles.shape, dtype=wide)
    key_end = _key_end(q_tiles.shape[-3], bm, n_q, n_k, causal)
    for start in range(0, n_k, bn):
        active = (start < key_end)[:, None, None]  # (nM, 1, 1)
        key_index = start + np.arange(bn)
        k_blk = _block(k, start, bn)[..., None, :, :]  # (..., 1, BN, D)
        v_blk = _block(v, start, bn)[..., None, :, :]
        dot = _dot_parts(q_tiles, np.swapaxes(k_blk, -1, -2), arith)
        p = probabilities(dot, query_index, key_index, lse_tiles, lse_low_tiles, max_low_tiles)
        dp = _dot_parts(do_tiles, np.swapaxes(v_blk, -1, -2), arith, two_part=two_part_dp)
        ds = p * dp_minus_delta(dp, delta_tiles, delta_low_tiles, arith.delta == "p_dp_blocks")
        dq_new, dq_comp_new = _accumulate(dq, dq_comp, _dot(fmt["ds_cast"].round(ds), k_blk), arith.kahan)
        dq, dq_comp = np.where(active, fmt["acc"].round(dq_new), dq), np.where(active, dq_comp_new, dq_comp)
    dq = fmt["out"].round(dq * wide(scale))
    return Backward(_untile(dq, n_q), _untile(dk, n_k), _untile(dv, n_k))
