"""The Hopper backward in Gluon: one program per 2 x KEYS keys of one (batch, kv head) computes their dK
and dV and adds each query block's dQ into a float32 accumulator, five matmuls per tile pair (the split
backward's kernels take seven; core.kernels.portable.fused_backward is this design in `tl`).

Partitions, as in the forward (forward.py): a producer warp streams the query blocks' Q and dO through
the copy engine into a ring of shared-memory stages (the program's K and V it loads once); two consumer
warpgroups each own KEYS of the program's keys and hold their dK and dV in registers. Per step (one
query block of BLOCK_M rows of one query head of the GQA group), with score tiles of queries x keys (a
thread holds two query rows, so it loads two rows' statistics, not sixteen):

    S = Q K^T,  P = exp2(S * qk_scale - LSE2 - LSE2_low),  dP = dO V^T,
    dS = P (dP - Delta)   (Delta in two parts, from delta.py: backward.py's LOW_DELTA rule),
    dV += P^T dO,  dK += dS^T Q   (P and dS through shared memory: transposed A operands),
    dQ_c = dS_c K_c   (dS from registers)

The two consumers' dQ parts meet in shared memory: the first stores its part, the second takes it as
its MMA's accumulator (so the query block's dQ from the program's keys is one float32 MMA sum), and adds
the result into the accumulator, one `red` per element.

DETERMINISTIC: the adds into each query block's accumulator come in key block order. Every (batch,
query head, query block) has a turn counter; key block j adds once it reads j and then stores j + 1.
Waiting is safe because key blocks are the grid's slowest index (kv heads fastest): programs are
dispatched in increasing id, so every program waited on has started, and it only waits on earlier ones.
Each program visits its query blocks from the last down, so the key blocks of one head that run side by
side move in step, each one step behind the one before. Otherwise the adds are unordered.

Numerics are the split backward's for fp16/bf16 (backward.py): scores rounded once to float32 (mul.rn),
P from both LSE parts, dS from the two-part Delta with TwoSum (two keys of equal P get exactly opposite
differences), P and dS rounded to the input dtype for their MMAs, dK and dQ scaled by sm_scale once at
the end (dQ by dq_from_accumulator_kernel). dQ's float32 sums run in another order than the split dQ
kernel's: its bits differ, not its error bound.

This module imports Gluon at import time; core.kernels.hopper imports it only when a plan needs it.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from core.kernels.hopper.forward import _copy_to_global, _copy_to_shared, _scaled, _tile_view

# The barrier of a partition's own warps (bar.sync with its id inside gl.warp_specialize) is
# gl.thread_barrier in Triton 3.6, gl.barrier after it.
_partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

CONSUMERS = gl.constexpr(2)  # consumer warpgroups per program, each with KEYS keys
CONSUMER_WARPS = gl.constexpr(4)  # one warpgroup: the smallest unit a wgmma runs on


@gluon.jit
def _wait_for_turn(turn_ptr, turn):
    """Spin until the counter at turn_ptr holds `turn` (acquire: the adds of the program that stored it
    are visible after). Returns 0, for the caller to add to the accumulator's address, so that no add
    can be issued before the wait."""
    return gl.inline_asm_elementwise(
        """{
        .reg .pred waiting;
        .reg .b32 now;
        spin:
        ld.acquire.gpu.global.b32 now, [$1];
        setp.ne.s32 waiting, now, $2;
        @waiting bra spin;
        mov.b32 $0, 0;
        }""",
        "=r,l,r",
        [turn_ptr.to(gl.int64), turn],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _pass_turn(turn_ptr, next_turn):
    """Store next_turn once every thread of the warpgroup has issued its adds: the partition's barrier
    gathers them and each thread's release store orders what it has observed (cumulativity)."""
    _partition_barrier()
    gl.inline_asm_elementwise(
        "st.release.gpu.global.b32 [$1], $2;\n mov.b32 $0, 0;",
        "=r,l,r",
        [turn_ptr.to(gl.int64), next_turn],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _add_to_accumulator(ptrs, values):
    """*ptrs += values (float32), one `red` per element in the MMA's own layout, the old values never
    read back (tl.atomic_add's `atom` would make the compiler wait for them)."""
    gl.inline_asm_elementwise(
        "red.global.gpu.relaxed.add.f32 [$1], $2;\n mov.b32 $0, 0;",
        "=r,l,r",
        [ptrs.to(gl.int64), values],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _row_statistics(Lse, LseLow, Delta, stat_offset, rows_in_all_heads, rows, n_queries):
    """(lse, lse_low, delta, delta_low) of one query block's rows: the LSE read as +inf for rows past Nq
    and rows that saw no key (so their P is 0), the low parts and Delta as 0 there. Delta's low part is
    its plane [1], rows_in_all_heads in."""
    row_ok = rows < n_queries
    offsets = stat_offset + rows
    lse = gl.load(Lse + offsets, mask=row_ok, other=float("inf"))
    lse = gl.where(lse == float("-inf"), float("inf"), lse)
    lse_low = gl.load(LseLow + offsets, mask=row_ok, other=0.0)
    delta = gl.load(Delta + offsets, mask=row_ok, other=0.0)
    delta_low = gl.load(Delta + rows_in_all_heads + offsets, mask=row_ok, other=0.0)
    return lse, lse_low, delta, delta_low


@gluon.jit
def _consume(
    k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dq_smem, kv_ready, q_ready, do_ready, qdo_empty,
    dq_ready, dq_free, dk_desc, dv_desc, Lse, LseLow, Delta, DqAccumulator, Turns,
    batch, kv_head, n_batch, kv_group, n_q_heads, key_block, key_start, first_block, n_query_blocks,
    n_queries, n_keys, qk_scale, sm_scale,
    CONSUMER: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
    KEYS: gl.constexpr, STAGES: gl.constexpr, DETERMINISTIC: gl.constexpr,
):  # fmt: skip
    """One consumer warpgroup: keys [key_start, key_start + KEYS) against every query block the producer
    loads, in its order; then dK (scaled) and dV through the copy engine. CONSUMER 0 hands its dQ part
    to consumer 1 through dq_smem; consumer 1 adds the query block's dQ into DqAccumulator.

    Score tiles are (queries x keys), so each thread holds two query rows and their statistics; P and
    dS go through shared memory to be the A operands (keys x queries, transposed views) of dV's and
    dK's MMAs, and dS from registers is dQ's."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, KEYS, 16]
    )
    ACC_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC_LAYOUT, k_width=2)
    ROW_LAYOUT: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    KEY_LAYOUT: gl.constexpr = gl.SliceLayout(0, S_LAYOUT)
    dtype: gl.constexpr = q_smem.dtype

    k_tile = k_smem.index(CONSUMER)
    v_tile = v_smem.index(CONSUMER)
    my_p = p_smem.index(CONSUMER)
    my_ds = ds_smem.index(CONSUMER)
    diagonal = n_keys - n_queries
    keys = key_start + gl.arange(0, KEYS, layout=KEY_LAYOUT)
    # Query blocks from unmasked_from on see every one of these keys (none past Nk, and, causal, all
    # at or below their diagonal); earlier ones are masked.
    if key_start + KEYS > n_keys:
        unmasked_from = n_queries + BLOCK_M
    elif CAUSAL:
        unmasked_from = key_start + KEYS - 1 - diagonal
    else:
        unmasked_from = 0
    rows_in_all_heads = n_batch.to(gl.int64) * n_q_heads * n_queries  # Delta's plane
    n_steps = n_query_blocks - first_block

    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, ACC_LAYOUT)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, ACC_LAYOUT)
    mbarrier.wait(kv_ready, 0)
    for member in range(kv_group):
        head = kv_head * kv_group + member
        batch_head = batch * n_q_heads + head
        stat_offset = batch_head.to(gl.int64) * n_queries
        for index in range(n_steps):
            step = member * n_steps + index
            stage = step % STAGES
            block = n_query_blocks - 1 - index
            block_start = block * BLOCK_M
            rows = block_start + gl.arange(0, BLOCK_M, layout=ROW_LAYOUT)
            lse, lse_low, delta, delta_low = _row_statistics(
                Lse, LseLow, Delta, stat_offset, rows_in_all_heads, rows, n_queries
            )

            mbarrier.wait(q_ready.index(stage), (step // STAGES) & 1)
            q_tile = q_smem.index(stage)
            s_zero = gl.zeros([BLOCK_M, KEYS], gl.float32, S_LAYOUT)
            s_token = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(stage), (step // STAGES) & 1)
            do_tile = do_smem.index(stage)
            dp_token = warpgroup_mma(do_tile, v_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            scores = warpgroup_mma_wait(num_outstanding=1, deps=(s_token,))
            exponent = (_scaled(scores, qk_scale) - gl.expand_dims(lse, 1)) - gl.expand_dims(lse_low, 1)
            p = gl.exp2(exponent)
            if block_start < unmasked_from:
                visible = gl.expand_dims(keys < n_keys, 0)
                if CAUSAL:
                    visible = visible & (gl.expand_dims(keys, 0) <= gl.expand_dims(rows + diagonal, 1))
                p = gl.where(visible, p, 0.0)
            # The previous step's MMAs have finished reading my_p and my_ds (waited below).
            my_p.store(p.to(dtype))
            fence_async_shared()
            _partition_barrier()
            dv_token = warpgroup_mma(my_p.permute((1, 0)), do_tile, dv, is_async=True)
            dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp_token,))
            # dP - Delta as the split dQ kernel takes it (backward.py: _dp_minus_delta, LOW_DELTA).
            difference = dp - gl.expand_dims(delta, 1)
            virtual = difference - dp
            error = (dp - (difference - virtual)) + (-gl.expand_dims(delta, 1) - virtual)
            ds = (p * (difference + (error - gl.expand_dims(delta_low, 1)))).to(dtype)
            my_ds.store(ds)
            fence_async_shared()
            _partition_barrier()
            dk_token = warpgroup_mma(my_ds.permute((1, 0)), q_tile, dk, is_async=True)
            ds_operand = gl.convert_layout(ds, A_LAYOUT)
            if CONSUMER == 0:
                dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, ACC_LAYOUT)
                dq_token = warpgroup_mma(ds_operand, k_tile, dq_zero, use_acc=False, is_async=True)
                dv, dk, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dv_token, dk_token, dq_token))
                mbarrier.arrive(qdo_empty.index(stage), count=1)
                mbarrier.wait(dq_free, (step & 1) ^ 1)
                dq_smem.store(dq)
                mbarrier.arrive(dq_ready, count=1)
            else:
                mbarrier.wait(dq_ready, step & 1)
                partial = dq_smem.load(ACC_LAYOUT)
                mbarrier.arrive(dq_free, count=1)
                dq_token = warpgroup_mma(ds_operand, k_tile, partial, is_async=True)
                dv, dk, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dv_token, dk_token, dq_token))
                mbarrier.arrive(qdo_empty.index(stage), count=1)
                dq_rows = block_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC_LAYOUT))
                dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ACC_LAYOUT))
                head_base = batch_head.to(gl.int64) * (n_query_blocks * BLOCK_M)
                offsets = gl.expand_dims((head_base + dq_rows) * HEAD_DIM, 1) + gl.expand_dims(dims, 0)
                if DETERMINISTIC:
                    turn_ptr = Turns + batch_head.to(gl.int64) * n_query_blocks + block
                    after_wait = _wait_for_turn(turn_ptr, key_block)
                    _add_to_accumulator(DqAccumulator + (offsets + after_wait), dq)
                    _pass_turn(turn_ptr, key_block + 1)
                else:
                    _add_to_accumulator(DqAccumulator + offsets, dq)

    # K and V are read by no MMA any more: they stage dK and dV for the copy engine, which clips the
    # rows past Nk.
    k_tile.store((dk * sm_scale).to(dtype))
    v_tile.store(dv.to(dtype))
    fence_async_shared()
    _copy_to_global(dk_desc, [batch, kv_head, key_start, 0], _tile_view(k_tile, dk_desc))
    _copy_to_global(dv_desc, [batch, kv_head, key_start, 0], _tile_view(v_tile, dv_desc))
    tma.store_wait(pendings=0)


@gluon.jit
def _produce(
    q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_smem, do_smem, kv_ready, q_ready, do_ready,
    qdo_empty, batch, kv_head, kv_group, key_start, first_block, n_query_blocks,
    BLOCK_M: gl.constexpr, KEYS: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """The producer warp: the program's keys and values once, then Q and dO of every query block the
    consumers visit (each group member's, from the last block down) into the ring, each stage reused
    once both consumers have released it."""
    mbarrier.expect(kv_ready, CONSUMERS * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for c in gl.static_range(CONSUMERS):
        _copy_to_shared(
            k_desc, [batch, kv_head, key_start + c * KEYS, 0], kv_ready, _tile_view(k_smem.index(c), k_desc)
        )
        _copy_to_shared(
            v_desc, [batch, kv_head, key_start + c * KEYS, 0], kv_ready, _tile_view(v_smem.index(c), v_desc)
        )
    n_steps = n_query_blocks - first_block
    for member in range(kv_group):
        head = kv_head * kv_group + member
        for index in range(n_steps):
            step = member * n_steps + index
            stage = step % STAGES
            row_start = (n_query_blocks - 1 - index) * BLOCK_M
            # A fresh barrier counts as having completed the phase before its first.
            mbarrier.wait(qdo_empty.index(stage), ((step // STAGES) & 1) ^ 1)
            mbarrier.expect(q_ready.index(stage), q_desc.block_type.nbytes)
            _copy_to_shared(
                q_desc, [batch, head, row_start, 0], q_ready.index(stage),
                _tile_view(q_smem.index(stage), q_desc),
            )  # fmt: skip
            mbarrier.expect(do_ready.index(stage), do_desc.block_type.nbytes)
            _copy_to_shared(
                do_desc, [batch, head, row_start, 0], do_ready.index(stage),
                _tile_view(do_smem.index(stage), do_desc),
            )  # fmt: skip


# n_batch too: an int argument equal to 1 would become a constant, with no .to()
@gluon.jit(do_not_specialize=["n_batch", "n_queries", "n_keys"])
def hopper_attention_backward_kernel(
    q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, Lse, LseLow, Delta, DqAccumulator, Turns,
    n_batch, n_kv_heads, kv_group, n_queries, n_keys, qk_scale, sm_scale,
    HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, KEYS: gl.constexpr,
    STAGES: gl.constexpr, DETERMINISTIC: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr,
    PRODUCER_REGISTERS: gl.constexpr,
):  # fmt: skip
    """dK and dV of 2 x KEYS keys of one (batch, kv head), and their part of every query block's dQ.

    q_desc, do_desc: 4-D descriptors over (B, Hq, Nq, HEAD_DIM) in (1, 1, BLOCK_M, HEAD_DIM) blocks;
    k_desc, v_desc, dk_desc, dv_desc: over (B, Hkv, Nk, HEAD_DIM) in (1, 1, KEYS, HEAD_DIM) blocks (the
    copy engine zero-fills rows past N and clips stores there). Lse (B, Hq, Nq) and LseLow (1, B, Hq, Nq)
    float32 contiguous, as the forwards write them; Delta (2, B, Hq, Nq) float32 contiguous, its two
    parts. DqAccumulator (B, Hq, cdiv(Nq, BLOCK_M) * BLOCK_M, HEAD_DIM) float32 contiguous, zeroed;
    Turns (B, Hq, cdiv(Nq, BLOCK_M)) int32 zeroed (DETERMINISTIC; else never read).
    Grid: (cdiv(Nk, 2 KEYS) * B * Hkv,), kv heads fastest, key blocks slowest (safe waiting; causal,
    the heaviest key blocks first).
    """
    program = gl.program_id(0)
    batch_kv_head = program % (n_batch * n_kv_heads)
    key_block = program // (n_batch * n_kv_heads)
    batch = batch_kv_head // n_kv_heads
    kv_head = batch_kv_head % n_kv_heads
    n_q_heads = n_kv_heads * kv_group
    key_start = key_block * (CONSUMERS * KEYS)
    n_query_blocks = (n_queries + BLOCK_M - 1) // BLOCK_M
    if CAUSAL:
        # The first row that sees key_start (bottom-right causal mask); none may.
        first_row = gl.minimum(gl.maximum(key_start - (n_keys - n_queries), 0), n_query_blocks * BLOCK_M)
        first_block = first_row // BLOCK_M
    else:
        first_block = 0

    dtype: gl.constexpr = q_desc.dtype
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KEYS, HEAD_DIM], dtype)
    s_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, KEYS], dtype)
    # Swizzled so that the accumulator layout's stores and loads of the dQ hand-over meet no bank
    # conflict (gl.bank_conflicts: 0 here, 3 per wavefront unswizzled).
    dq_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    k_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, KEYS, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, KEYS, HEAD_DIM], kv_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
    p_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, BLOCK_M, KEYS], s_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, BLOCK_M, KEYS], s_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM], dq_layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    dq_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    dq_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    mbarrier.init(dq_ready, count=1)
    mbarrier.init(dq_free, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(s), count=1)
        mbarrier.init(do_ready.index(s), count=1)
        mbarrier.init(qdo_empty.index(s), count=CONSUMERS)

    # The argument tuples are written out in the call: a tuple assigned to a name first would turn its
    # constexprs into tensors.
    gl.warp_specialize(
        [
            (_consume, (
                k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dq_smem, kv_ready, q_ready, do_ready,
                qdo_empty, dq_ready, dq_free, dk_desc, dv_desc, Lse, LseLow, Delta, DqAccumulator, Turns,
                batch, kv_head, n_batch, kv_group, n_q_heads, key_block, key_start, first_block,
                n_query_blocks, n_queries, n_keys, qk_scale, sm_scale,
                0, HEAD_DIM, CAUSAL, BLOCK_M, KEYS, STAGES, DETERMINISTIC,
            )),
            (_consume, (
                k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dq_smem, kv_ready, q_ready, do_ready,
                qdo_empty, dq_ready, dq_free, dk_desc, dv_desc, Lse, LseLow, Delta, DqAccumulator, Turns,
                batch, kv_head, n_batch, kv_group, n_q_heads, key_block, key_start + KEYS, first_block,
                n_query_blocks, n_queries, n_keys, qk_scale, sm_scale,
                1, HEAD_DIM, CAUSAL, BLOCK_M, KEYS, STAGES, DETERMINISTIC,
            )),
            (_produce, (
                q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_smem, do_smem, kv_ready, q_ready,
                do_ready, qdo_empty, batch, kv_head, kv_group, key_start, first_block, n_query_blocks,
                BLOCK_M, KEYS, STAGES,
            )),
        ],
        [CONSUMER_WARPS, 1],
        [CONSUMER_REGISTERS, PRODUCER_REGISTERS],
    )  # fmt: skip
