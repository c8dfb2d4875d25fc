"""The fused backward: one program per (batch, key/value head, key block) computes dK and dV for its keys
and adds each query block's dQ contribution into a float32 accumulator, five matmuls per tile pair
(today's split backward, backward.py, takes seven: its dQ kernel recomputes S and dP).

Per step (one query block of one query head of the GQA group), on transposed tiles (keys along rows):

    S^T = K Q^T, P^T = exp2(S^T * qk_scale - LSE2)    (backward.py: _probabilities, as today)
    dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - Delta),  dK += dS^T Q,  dQ_j = dS K

dQ_j, this key block's part of the query block's dQ, goes to a float32 accumulator in one of two ways:

- DETERMINISTIC: in the fixed order of the key blocks. Each (batch, query head, query block) has a turn
  counter; key block j adds when the counter reads j and then sets it to j + 1. Key block 0 stores
  instead of adding (no zero fill), and the last key block that sees the query block adds from
  registers and writes dQ itself (no conversion pass). dQ is then a float32 sum in one order, fixed for
  a given shape and tile table: bitwise the same from run to run.
- otherwise: unordered float32 atomic adds into a zeroed accumulator, converted to dQ by
  `dq_from_accumulator_kernel`.

Waiting is safe because a program only ever waits for a program of a lower key block, and key blocks
are the grid's slowest index: a 1-D grid of (key block, batch, kv head), kv heads fastest, is dispatched
in increasing program id, so every program waited on was started earlier and waits only on earlier ones
itself. Under the interpreter programs run one after another in that order, so every turn has come
before it is awaited; the interpreter checks that instead of spinning (a wrong turn poisons dQ with NaN).

Each program visits its query blocks from the last down. Key blocks of one head that run side by side
then move in step, key block j one block behind key block j - 1; in increasing order, causal key block j
would start 2-3 blocks after j - 1 (its first query block is where j - 1 already is on its third step).
A program hands on its turn one step late, after its next step's dV dot: by then its atomic adds have
reached memory, so the release fence does not stall the tensor cores, and it reads the next turn early
in each step so that the read's latency hides behind the step's matmuls.

Numerics are today's: the same helpers recompute the scores and P (with the LSE's low part where the
forward saved one), dS is rounded to the input dtype for its dots, Delta is the preprocess's (or the
dLSE pass's, `delta_from_p_and_dp_kernel`, rounded to float32: dS here takes Delta in one part, so the
split dQ kernel's exact cancellation of two keys with equal P, which needs its low part, is not promised
by this kernel). fp16/bf16 only; float32 keeps the split backward.
"""

import triton
import triton.language as tl

from core.kernels.portable.backward import (
    LOW_PART_SCAN_BLOCK,
    _load_row_stats,
    _nonzero_count,
    _p_dp_row_sums,
    _probabilities,
    _whole_block_offsets,
)
from core.kernels.shared import _dot_parts, _head_rows, _load_cols, _load_rows, _load_tile, _scores

# Compiled kernels spin on the turn counter in PTX; the interpreter runs programs in grid order and
# cannot run PTX, so there a turn that has not come yet is a bug, reported as NaN in dQ.
SPIN_IN_PTX = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def _wait_for_turn(turn_ptr, seen, turn, value):
    """(value, 0) once the counter at turn_ptr holds `turn`; `seen` is the counter as read earlier in the
    step. Counters only grow and only the program whose turn it is advances them, so once seen equals
    turn it stays so. The 0 comes out of the wait: the caller adds it to the accumulator's address, so
    no access to the accumulator can be issued before the turn has come. The program that passed the
    turn on fenced its adds first (_pass_turn), and the accumulator is read past L1 (.cg)."""
    if SPIN_IN_PTX:
        after_wait = tl.inline_asm_elementwise(
            """{
            .reg .pred waiting;
            .reg .b32 now;
            mov.b32 now, $2;
            setp.ne.s32 waiting, now, $3;
            @!waiting bra done;
            spin:
            ld.acquire.gpu.global.b32 now, [$1];
            setp.ne.s32 waiting, now, $3;
            @waiting bra spin;
            done:
            mov.b32 $0, 0;
            }""",
            "=r,l,r,r",
            [turn_ptr, seen, turn],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
        return value, after_wait
    else:
        return tl.where(seen == turn, value, float("nan")), 0


@triton.jit
def _add_to_accumulator(ptrs, values, mask):
    """*ptrs += values (float32) where mask, each add atomic, the old values not read back. Triton 3.6
    lowers tl.atomic_add to `atom`, whose old values come back into registers that the compiler must
    wait for before it reuses them, unused or not (triton-lang/triton#10724 emits `red` since); so the
    compiled kernel issues `red` itself, one per element in the dot's own layout (no shuffle through
    shared memory first)."""
    if SPIN_IN_PTX:
        tl.inline_asm_elementwise(
            "@$3 red.global.gpu.relaxed.add.f32 [$1], $2;\n mov.b32 $0, 0;",
            "=r,l,r,b",
            [ptrs.to(tl.int64), values, mask],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    else:
        tl.atomic_add(ptrs, values, mask=mask, sem="relaxed")


@triton.jit
def _pass_turn(turn_ptr, next_turn):
    """Set the counter to next_turn (> 0; 0 means there is nothing to pass on) once every thread's adds
    are done: the barrier gathers the threads, and one thread's release store orders their adds before
    the new value (cumulativity). In PTX rather than tl.atomic_xchg after tl.debug_barrier: with those
    in its body Triton 3.6 does not software-pipeline the loop."""
    if SPIN_IN_PTX:
        tl.inline_asm_elementwise(
            """{
            .reg .pred leader;
            .reg .b32 thread;
            bar.sync 0;
            mov.u32 thread, %tid.x;
            setp.eq.u32 leader, thread, 0;
            setp.gt.and.s32 leader, $2, 0, leader;
            @leader st.release.gpu.global.b32 [$1], $2;
            mov.b32 $0, 0;
            }""",
            "=r,l,r",
            [turn_ptr, next_turn],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    else:
        tl.store(turn_ptr, next_turn, mask=next_turn > 0)


@triton.jit
def _add_dq_in_turn(dq_part, partial_base, partial_offsets, dq_ptrs, dq_mask, turn_ptr, seen, key_block,
                    last_key_block, sm_scale, FINALIZING: tl.constexpr):  # fmt: skip
    """Add this key block's dQ part to its query block's accumulator (at partial_base + partial_offsets)
    in key block order (DETERMINISTIC): key block 0 stores, later ones add, and the last one (only in
    FINALIZING loops) adds from registers and writes dQ. Returns the turn to pass on once the adds have
    landed (0: none, dQ is written).

    Predicated rather than branched: Triton 3.6's software pipeliner rejects a loop holding an `if`
    with memory operations in it."""
    dq_part, after_wait = _wait_for_turn(turn_ptr, seen, key_block, dq_part)
    partial_ptrs = (partial_base + after_wait * 16) + partial_offsets
    # Tile-shaped masks (the interpreter's stores take no scalar mask); the compiler folds them back.
    whole_tile = tl.full(partial_offsets.shape, True, tl.int1)
    first = whole_tile & (key_block == 0)
    if FINALIZING:
        final = whole_tile & (key_block == last_key_block)
        tl.store(partial_ptrs, dq_part, mask=first & ~final)
        _add_to_accumulator(partial_ptrs, dq_part, ~first & ~final)
        total = dq_part + tl.load(partial_ptrs, mask=final & ~first, other=0.0, cache_modifier=".cg")
        tl.store(dq_ptrs, (total * sm_scale).to(dq_ptrs.dtype.element_ty), mask=dq_mask & final)
        next_turn = tl.where(key_block == last_key_block, 0, key_block + 1)
    else:
        tl.store(partial_ptrs, dq_part, mask=first)
        _add_to_accumulator(partial_ptrs, dq_part, ~first)
        next_turn = key_block + 1
    return next_turn


@triton.jit
def _gradients_from_query_blocks(
    dk, dv, pending_turn_ptr, pending_turn, k, v, q_src, do_src, Lse, LseLow, Delta, DqPartial, Turns,
    dq_base, stat_offset, turn_offset, partial_offset, stride_qm, stride_dom, stride_dqm, stride_dqd,
    row_start, row_end, keys, key_ok, key_block, n_key_blocks, n_queries, diagonal, qk_scale, sm_scale,
    d_ok, MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr,
    PRECISE_EXP: tl.constexpr, USE_LSE_LOW: tl.constexpr, DESCRIPTORS: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr, DETERMINISTIC: tl.constexpr,
):  # fmt: skip
    """One query head's query blocks [row_start, row_end), from the last down: add their contributions to
    dK and dV (registers) and hand each block's dQ part on. MASKED: the causal diagonal (CAUSAL) or keys
    past Nk (a ragged last key block); other blocks see every key of the tile. q_src/do_src: tensor
    descriptors of the head's Q and dO (DESCRIPTORS) or pointer tiles at row 0 (Q^T and dO).
    (pending_turn_ptr, pending_turn): the turn this program still has to pass on (DETERMINISTIC)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for step in range(0, (row_end - row_start) // BLOCK_M):
        block_start = row_end - (step + 1) * BLOCK_M
        rows = block_start + offs_m
        row_ok = rows < n_queries
        if DESCRIPTORS:
            qT = _load_cols(q_src, block_start, d_ok, row_ok, EVEN_D, WHOLE_BLOCKS, True)
            do = _load_rows(do_src, block_start, row_ok, d_ok, WHOLE_BLOCKS, EVEN_D, True)
        else:
            qT = _load_cols(
                q_src + block_start.to(tl.int64) * stride_qm, block_start, d_ok, row_ok, EVEN_D,
                WHOLE_BLOCKS, False,
            )  # fmt: skip
            do = _load_rows(
                do_src + block_start.to(tl.int64) * stride_dom, block_start, row_ok, d_ok, WHOLE_BLOCKS,
                EVEN_D, False,
            )  # fmt: skip
        if WHOLE_BLOCKS:
            lse, lse_low, max_low, delta = _load_row_stats(
                Lse, LseLow, Delta, _whole_block_offsets(stat_offset, block_start, offs_m, BLOCK_M), None, 0,
                False, USE_LSE_LOW, True,
            )  # fmt: skip
        else:
            lse, lse_low, max_low, delta = _load_row_stats(
                Lse, LseLow, Delta, stat_offset + rows, row_ok, 0, False, USE_LSE_LOW
            )
        turn_ptr = Turns + turn_offset + block_start // BLOCK_M
        if DETERMINISTIC:
            seen = tl.load(turn_ptr, volatile=True)

        scores_t, scores_low_t = _scores(k, qT, qk_scale, DOT_PRECISION, False)
        pT = _probabilities(
            scores_t, scores_low_t, lse[None, :], lse_low[None, :], max_low[None, :], USE_LSE_LOW, BASE_2,
            PRECISE_EXP, False,
        )  # fmt: skip
        if MASKED:
            if CAUSAL:
                # Keys past Nk are only visible to rows past Nq, whose P is 0 (LSE read as +inf).
                pT = tl.where(keys[:, None] <= rows[None, :] + diagonal, pT, 0.0)
            else:
                # Keys past Nk load as zeros: P = exp2(0 - LSE2) overflows once LSE2 < -128, and
                # inf * 0 in dS K would make dQ NaN (backward.py's module docstring).
                pT = tl.where(key_ok[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if DETERMINISTIC:
            _pass_turn(pending_turn_ptr, pending_turn)
        dpT = _dot_parts(v, tl.trans(do), DOT_PRECISION, False)[0]
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=DOT_PRECISION)
        dq_part = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION)

        partial_offsets = rows.to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :]
        if DETERMINISTIC:
            if CAUSAL:
                # The key blocks that see a query block are 0 up to the one holding its last row's
                # last visible key.
                visible_end = tl.maximum(block_start + BLOCK_M + diagonal, 0)
                last_key_block = tl.minimum(n_key_blocks, tl.cdiv(visible_end, BLOCK_N)) - 1
            else:
                last_key_block = n_key_blocks - 1
            dq_ptrs = dq_base + rows.to(tl.int64)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
            pending_turn = _add_dq_in_turn(
                dq_part, DqPartial + partial_offset, partial_offsets, dq_ptrs,
                row_ok[:, None] & d_ok[None, :], turn_ptr, seen, key_block, last_key_block, sm_scale, MASKED,
            )  # fmt: skip
            pending_turn_ptr = turn_ptr
        else:
            _add_to_accumulator(
                DqPartial + partial_offset + partial_offsets, dq_part, tl.full(dq_part.shape, True, tl.int1)
            )
    return dk, dv, pending_turn_ptr, pending_turn


@triton.jit
def _gradients_from_group(
    dk, dv, k, v, Q, dOut, Lse, LseLow, Delta, DqPartial, Turns, dQ, stride_qb, stride_qh, stride_qm,
    stride_qd, stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm,
    stride_dqd, batch, first_head, kv_group, n_q_heads, row_start, unmasked_start, keys, key_ok, key_block,
    n_key_blocks, n_queries, diagonal, qk_scale, sm_scale, d_ok, offs_d, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    USE_LSE_LOW: tl.constexpr, DESCRIPTORS: tl.constexpr, WHOLE_BLOCKS: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):  # fmt: skip
    """Every query row of the kv_group query heads from first_head on that sees these keys, head by head
    in a fixed order: rows from unmasked_start on see all of them, rows in [row_start, unmasked_start)
    go through the masked path."""
    offs_m = tl.arange(0, BLOCK_M)
    n_query_blocks = tl.cdiv(n_queries, BLOCK_M)
    padded_rows = n_query_blocks * BLOCK_M
    pending_turn_ptr = Turns
    pending_turn = tl.full([], 0, tl.int32)
    for group_member in range(0, kv_group):
        head = first_head + group_member
        head_index = batch.to(tl.int64) * n_q_heads + head
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = dOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        dq_base = dQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
        if DESCRIPTORS:
            q_src = _head_rows(q_base, n_queries, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D)
            do_src = _head_rows(do_base, n_queries, stride_dom, HEAD_DIM, BLOCK_M, BLOCK_D)
        else:
            q_src = q_base + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qm
            do_src = do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
        if DETERMINISTIC and CAUSAL:
            # Rows above key block 0's first query block see no key (Nq > Nk): no key block adds to
            # them, so key block 0 writes their zeros.
            no_key_rows = tl.where(key_block == 0, row_start, 0)
            for zero_start in range(0, no_key_rows, BLOCK_M):
                rows = zero_start + offs_m
                tl.store(
                    dq_base + rows.to(tl.int64)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                    tl.zeros([BLOCK_M, BLOCK_D], dtype=dQ.dtype.element_ty),
                    mask=(rows < n_queries)[:, None] & d_ok[None, :],
                )
        stat_offset = head_index * n_queries
        turn_offset = head_index * n_query_blocks
        partial_offset = head_index * padded_rows * BLOCK_D
        dk, dv, pending_turn_ptr, pending_turn = _gradients_from_query_blocks(
            dk, dv, pending_turn_ptr, pending_turn, k, v, q_src, do_src, Lse, LseLow, Delta, DqPartial, Turns,
            dq_base, stat_offset, turn_offset, partial_offset, stride_qm, stride_dom, stride_dqm, stride_dqd,
            unmasked_start, padded_rows, keys, key_ok, key_block, n_key_blocks, n_queries, diagonal, qk_scale,
            sm_scale, d_ok, False, CAUSAL, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, BASE_2,
            PRECISE_EXP, USE_LSE_LOW, DESCRIPTORS, WHOLE_BLOCKS, DETERMINISTIC,
        )  # fmt: skip
        dk, dv, pending_turn_ptr, pending_turn = _gradients_from_query_blocks(
            dk, dv, pending_turn_ptr, pending_turn, k, v, q_src, do_src, Lse, LseLow, Delta, DqPartial, Turns,
            dq_base, stat_offset, turn_offset, partial_offset, stride_qm, stride_dom, stride_dqm, stride_dqd,
            row_start, unmasked_start, keys, key_ok, key_block, n_key_blocks, n_queries, diagonal, qk_scale,
            sm_scale, d_ok, True, CAUSAL, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, BASE_2,
            PRECISE_EXP, USE_LSE_LOW, DESCRIPTORS, WHOLE_BLOCKS, DETERMINISTIC,
        )  # fmt: skip
    if DETERMINISTIC:
        _pass_turn(pending_turn_ptr, pending_turn)
    return dk, dv


@triton.jit(do_not_specialize=["n_queries", "n_keys"])
def fused_backward_kernel(
    Q, K, V, dOut, Lse, LseLow, Delta, DqPartial, Turns, dQ, dK, dV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_batches, n_q_heads, n_kv_heads, n_queries, n_keys, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    TENSOR_DESCRIPTORS: tl.constexpr, WHOLE_QUERY_BLOCKS: tl.constexpr, DETERMINISTIC: tl.constexpr,
):  # fmt: skip
    """dK, dV for BLOCK_N keys of one key/value head, and those keys' part of dQ for every query head of
    its GQA group (module docstring).

    Q, dOut, dQ (B, Hq, Nq, HEAD_DIM); K, V, dK, dV (B, Hkv, Nk, HEAD_DIM); any strides, 64-bit offsets.
    Lse (B, Hq, Nq) and LseLow (1, B, Hq, Nq) as the forward saved them, Delta (1, B, Hq, Nq), float32
    contiguous. DqPartial: float32 (B, Hq, cdiv(Nq, BLOCK_M) * BLOCK_M, BLOCK_D) contiguous, zeroed
    unless DETERMINISTIC. Turns: int32 (B, Hq, cdiv(Nq, BLOCK_M)) zeros (DETERMINISTIC only).
    Without DETERMINISTIC dQ is not written here (dq_from_accumulator_kernel).
    Grid: (cdiv(Nk, BLOCK_N) * n_batches * n_kv_heads,), key blocks slowest, kv heads fastest.
    WHOLE_QUERY_BLOCKS: Nq is a multiple of BLOCK_M (unmasked row statistics, backward.py).
    """
    program = tl.program_id(0)
    key_block = program // (n_batches * n_kv_heads)
    kv_head = program % n_kv_heads
    batch = (program // n_kv_heads) % n_batches
    kv_group = n_q_heads // n_kv_heads
    start_n = key_block * BLOCK_N
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

    # Query i sees key j iff j <= i + diagonal (as in backward.py.backward_dkdv_kernel): rows below
    # row_start see none of this tile's keys, rows from unmasked_start on see all of them.
    diagonal = n_keys - n_queries
    n_key_blocks = tl.cdiv(n_keys, BLOCK_N)
    padded_rows = tl.cdiv(n_queries, BLOCK_M) * BLOCK_M
    if CAUSAL:
        row_start = (tl.maximum(start_n - diagonal, 0) // BLOCK_M) * BLOCK_M
        unmasked_start = tl.maximum(
            row_start, tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diagonal, 0), BLOCK_M) * BLOCK_M
        )
        unmasked_start = tl.minimum(unmasked_start, padded_rows)
    else:
        row_start = 0
        unmasked_start = 0
    # The last key block takes the masked path for all its query blocks: a ragged one must mask its keys
    # past Nk, and it is the last to add to every query block it sees below the diagonal, whose dQ only
    # the masked path writes (DETERMINISTIC). Elsewhere the last adder is on the diagonal: masked too.
    unmasked_start = tl.where(key_block == n_key_blocks - 1, padded_rows, unmasked_start)

    first_head = kv_head * kv_group
    # fp16/bf16 save a zero LSE low part for typical rows; when all of this program's rows have one, it
    # runs the loop without its load and subtraction (as backward_dkdv_kernel does, bitwise the same).
    nonzero_lows = 0
    for group_member in range(0, kv_group):
        stat_offset = (batch.to(tl.int64) * n_q_heads + first_head + group_member) * n_queries
        nonzero_lows += _nonzero_count(LseLow, stat_offset, row_start, n_queries, LOW_PART_SCAN_BLOCK)
    if nonzero_lows > 0:
        dk, dv = _gradients_from_group(
            dk, dv, k, v, Q, dOut, Lse, LseLow, Delta, DqPartial, Turns, dQ, stride_qb, stride_qh, stride_qm,
            stride_qd, stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm,
            stride_dqd, batch, first_head, kv_group, n_q_heads, row_start, unmasked_start, keys, key_ok,
            key_block, n_key_blocks, n_queries, diagonal, qk_scale, sm_scale, d_ok, offs_d, HEAD_DIM, CAUSAL,
            EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, BASE_2, PRECISE_EXP, True, TENSOR_DESCRIPTORS,
            WHOLE_QUERY_BLOCKS, DETERMINISTIC,
        )  # fmt: skip
    else:
        dk, dv = _gradients_from_group(
            dk, dv, k, v, Q, dOut, Lse, LseLow, Delta, DqPartial, Turns, dQ, stride_qb, stride_qh, stride_qm,
            stride_qd, stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm,
            stride_dqd, batch, first_head, kv_group, n_q_heads, row_start, unmasked_start, keys, key_ok,
            key_block, n_key_blocks, n_queries, diagonal, qk_scale, sm_scale, d_ok, offs_d, HEAD_DIM, CAUSAL,
            EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, BASE_2, PRECISE_EXP, False, TENSOR_DESCRIPTORS,
            WHOLE_QUERY_BLOCKS, DETERMINISTIC,
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


@triton.jit(do_not_specialize=["n_queries"])
def dq_from_accumulator_kernel(
    DqPartial, dQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd, n_q_heads, n_queries, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dQ = accumulator * sm_scale in dQ's dtype, for the unordered accumulation. DqPartial as in
    fused_backward_kernel (its BLOCK_M, the row padding). Grid: (cdiv(Nq, BLOCK_M), Hq, B)."""
    head = tl.program_id(1)
    batch = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    padded_rows = tl.cdiv(n_queries, BLOCK_M) * BLOCK_M
    head_rows = (batch.to(tl.int64) * n_q_heads + head) * padded_rows
    total = tl.load(DqPartial + (head_rows + rows)[:, None] * BLOCK_D + offs_d[None, :])
    dq_ptrs = (
        dQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
        + rows.to(tl.int64)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    )  # fmt: skip
    mask = (rows < n_queries)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(dq_ptrs, (total * sm_scale).to(dQ.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_queries", "n_keys"])
def delta_from_p_and_dp_kernel(
    Q, K, V, dOut, Lse, LseLow, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_q_heads, kv_group, n_queries, n_keys, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BASE_2: tl.constexpr, PRECISE_EXP: tl.constexpr,
    TENSOR_DESCRIPTORS: tl.constexpr, LOW_PLANE: tl.constexpr,
):  # fmt: skip
    """Delta = sum_j P_ij dP_ij / sum_j P_ij + (the preprocess's -dLSE term already in Delta), for
    fp16/bf16 inputs whose LSE has a gradient or while plans.PreciseDelta is on: the same pass, and the
    same sums in the same order, as
    backward.py's backward_dq_kernel with DELTA_IN_DQ (its comment says why dO . O is not enough
    there). The fused kernel needs every row's Delta before it starts, so the pass runs on its own:
    two matmuls per tile pair. Arguments and grid as backward_dq_kernel's. LOW_PLANE: Delta is
    (2, B, Hq, Nq) and its plane [1] gets the low part, the float64 sum's rounding error to float32 (the
    split dQ kernel's delta_low)."""
    block_m_index = tl.program_id(0)
    if CAUSAL:
        block_m_index = tl.num_programs(0) - 1 - block_m_index
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // kv_group
    start_m = block_m_index * BLOCK_M
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
    stat_rows = (batch.to(tl.int64) * n_q_heads + head) * n_queries + rows
    lse, lse_low, max_low, delta = _load_row_stats(Lse, LseLow, Delta, stat_rows, row_ok, 0, False)

    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    diagonal = n_keys - n_queries
    whole_blocks_end = (n_keys // BLOCK_N) * BLOCK_N
    if CAUSAL:
        fully_visible = (tl.maximum(start_m + diagonal + 1, 0) // BLOCK_N) * BLOCK_N
        unmasked_end = tl.minimum(fully_visible, whole_blocks_end)
        key_end = tl.minimum(n_keys, tl.maximum(start_m + BLOCK_M + diagonal, 0))
    else:
        unmasked_end = whole_blocks_end
        key_end = n_keys
    if TENSOR_DESCRIPTORS:
        k_src = _head_rows(k_base, n_keys, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_src = _head_rows(v_base, n_keys, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D)
        k_tail, v_tail = k_src, v_src
    else:
        k_src = k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
        v_src = v_base + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn
        k_tail = k_src + unmasked_end.to(tl.int64) * stride_kn
        v_tail = v_src + unmasked_end.to(tl.int64) * stride_vn
    p_dp_sum, p_sum = _p_dp_row_sums(
        tl.zeros([BLOCK_M], dtype=tl.float64), tl.zeros([BLOCK_M], dtype=tl.float64), q, do, lse, lse_low,
        max_low, k_src, v_src, stride_kn, stride_vn, 0, unmasked_end, rows, n_keys, diagonal, qk_scale, d_ok,
        False, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION, BASE_2, PRECISE_EXP, False, TENSOR_DESCRIPTORS,
    )  # fmt: skip
    p_dp_sum, p_sum = _p_dp_row_sums(
        p_dp_sum, p_sum, q, do, lse, lse_low, max_low, k_tail, v_tail, stride_kn, stride_vn, unmasked_end,
        key_end, rows, n_keys, diagonal, qk_scale, d_ok, True, CAUSAL, EVEN_D, BLOCK_N, DOT_PRECISION,
        BASE_2, PRECISE_EXP, False, TENSOR_DESCRIPTORS,
    )  # fmt: skip
    # A row that sees no key has no P at all: its Delta is the preprocess's -dLSE term alone.
    row_sums = tl.where(p_sum > 0.0, p_dp_sum / tl.where(p_sum > 0.0, p_sum, 1.0), 0.0)
    row_sums += delta.to(tl.float64)  # the preprocess's -dLSE term
    delta = row_sums.to(tl.float32)
    tl.store(Delta + stat_rows, delta, mask=row_ok)
    if LOW_PLANE:
        rows_in_all_heads = tl.num_programs(2).to(tl.int64) * n_q_heads * n_queries
        delta_low = (row_sums - delta.to(tl.float64)).to(tl.float32)
        tl.store(Delta + rows_in_all_heads + stat_rows, delta_low, mask=row_ok)
