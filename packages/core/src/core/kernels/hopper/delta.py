"""The Hopper backward's Delta pass in Gluon: Delta_i = sum_j P_ij dP_ij / sum_j P_ij (plus the
preprocess's -dLSE term), in two parts, for every query row before the backward kernel (backward.py)
starts. The portable pass (core.kernels.portable.fused_backward: delta_from_p_and_dp_kernel) is the
same sums with `tl` dots; this one runs the forward's partitions (forward.py): a producer warp streams
K and V through a ring of shared-memory stages, two consumer warpgroups each own BLOCK_M query rows and
issue S = Q K^T and dP = dO V^T as asynchronous wgmmas, so one consumer's exps and float64 sums run
while the other's MMAs hold the tensor cores.

The sums are the portable pass's (backward.py: _p_dp_row_sums): each product P dP rounded to float32
and split exactly by an FMA into that rounding and its error; the roundings summed in float64, the
errors in float32 per key block, P's in float32 per key block; then Delta = the float64 ratio, its
float32 rounding in plane [0] and that rounding's error in plane [1]. P and dP are the backward
kernel's numbers: the same wgmma shape (BLOCK_M x BLOCK_N = 64 x 64 per consumer), the score rounded
once to float32 (mul.rn) before both LSE parts are subtracted, so two keys whose P tie in the backward
tie here and their dS cancel exactly there.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from core.kernels.hopper.forward import (
    _blocks_loaded,
    _copy_to_shared,
    _load_key_blocks,
    _scaled,
    _tile_view,
)

CONSUMERS = gl.constexpr(2)  # consumer warpgroups per program, each with BLOCK_M query rows
CONSUMER_WARPS = gl.constexpr(4)


@gluon.jit
def _sum_block(
    q_tile, do_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, j, p_dp_sum, p_sum, lse, lse_low, rows,
    n_keys, diagonal, qk_scale,
    MASKED: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, S_LAYOUT: gl.constexpr,
):  # fmt: skip
    """Add key block j (ring slot j) to the rows' sums of P dP and of P. MASKED blocks hide keys past
    n_keys and, when CAUSAL, keys j > i + diagonal."""
    stage = j % STAGES
    phase = (j // STAGES) & 1
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_LAYOUT)
    mbarrier.wait(k_ready.index(stage), phase)
    s_token = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)), zero, use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(stage), phase)
    dp_token = warpgroup_mma(do_tile, v_smem.index(stage).permute((1, 0)), zero, use_acc=False, is_async=True)
    scores = warpgroup_mma_wait(num_outstanding=1, deps=(s_token,))
    p = gl.exp2((_scaled(scores, qk_scale) - gl.expand_dims(lse, 1)) - gl.expand_dims(lse_low, 1))
    if MASKED:
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
        visible = gl.expand_dims(cols < n_keys, 0)
        if CAUSAL:
            visible = visible & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows + diagonal, 1))
        p = gl.where(visible, p, 0.0)
    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_token,))
    mbarrier.arrive(kv_empty.index(stage), count=1)
    product = p * dp
    error = gl.fma(p, dp, -product)
    p_dp_sum += gl.sum(product.to(gl.float64), 1) + gl.sum(error, 1).to(gl.float64)
    p_sum += gl.sum(p, 1).to(gl.float64)
    return p_dp_sum, p_sum


@gluon.jit
def _consume(
    q_smem, do_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, Lse, LseLow, Delta,
    tile_start, row_offset, rows_in_all_heads, n_queries, n_keys, n_blocks_loaded, qk_scale,
    CONSUMER: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):  # fmt: skip
    """Consumer warpgroup CONSUMER: the tile's BLOCK_M query rows from tile_start + CONSUMER x BLOCK_M
    against the key blocks they see; it releases every stage the producer loaded, the blocks only the
    other consumer's rows see included. Writes Delta's two planes for its rows (row_offset: this head's
    row 0 in them)."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, BLOCK_N, 16]
    )
    ROW_LAYOUT: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    q_tile = q_smem.index(CONSUMER)
    do_tile = do_smem.index(CONSUMER)
    row_start = tile_start + CONSUMER * BLOCK_M

    diagonal = n_keys - n_queries
    whole_blocks = n_keys // BLOCK_N
    if CAUSAL:
        n_unmasked = gl.minimum(gl.maximum(row_start + diagonal + 1, 0) // BLOCK_N, whole_blocks)
        key_end = gl.minimum(n_keys, gl.maximum(row_start + BLOCK_M + diagonal, 0))
    else:
        n_unmasked = whole_blocks
        key_end = n_keys
    n_blocks = (key_end + BLOCK_N - 1) // BLOCK_N
    rows = row_start + gl.arange(0, BLOCK_M, layout=ROW_LAYOUT)
    row_ok = rows < n_queries
    # Rows past Nq and rows that saw no key read LSE +inf: their P is 0.
    lse = gl.load(Lse + row_offset + rows, mask=row_ok, other=float("inf"))
    lse = gl.where(lse == float("-inf"), float("inf"), lse)
    lse_low = gl.load(LseLow + row_offset + rows, mask=row_ok, other=0.0)
    # The preprocess's -dLSE term (0 without a dLSE).
    delta_in = gl.load(Delta + row_offset + rows, mask=row_ok, other=0.0)

    p_dp_sum = gl.zeros([BLOCK_M], gl.float64, ROW_LAYOUT)
    p_sum = gl.zeros([BLOCK_M], gl.float64, ROW_LAYOUT)
    mbarrier.wait(q_ready.index(CONSUMER), 0)
    for j in range(0, n_unmasked):
        p_dp_sum, p_sum = _sum_block(
            q_tile, do_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, j, p_dp_sum, p_sum, lse, lse_low,
            rows, n_keys, diagonal, qk_scale, False, CAUSAL, BLOCK_M, BLOCK_N, STAGES, S_LAYOUT,
        )  # fmt: skip
    for j in range(n_unmasked, n_blocks):
        p_dp_sum, p_sum = _sum_block(
            q_tile, do_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, j, p_dp_sum, p_sum, lse, lse_low,
            rows, n_keys, diagonal, qk_scale, True, CAUSAL, BLOCK_M, BLOCK_N, STAGES, S_LAYOUT,
        )  # fmt: skip
    for j in range(n_blocks, n_blocks_loaded):
        mbarrier.wait(v_ready.index(j % STAGES), (j // STAGES) & 1)
        mbarrier.arrive(kv_empty.index(j % STAGES), count=1)

    # A row that sees no key has no P at all: its Delta is the -dLSE term alone.
    sees_a_key = p_sum > 0.0
    row_sums = gl.where(sees_a_key, p_dp_sum / gl.where(sees_a_key, p_sum, 1.0), 0.0)
    row_sums += delta_in.to(gl.float64)
    delta = row_sums.to(gl.float32)
    delta_low = (row_sums - delta.to(gl.float64)).to(gl.float32)
    gl.store(Delta + row_offset + rows, delta, mask=row_ok)
    gl.store(Delta + rows_in_all_heads + row_offset + rows, delta_low, mask=row_ok)


@gluon.jit
def _produce(
    q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
    batch, head, kv_head, tile_start, n_blocks_loaded,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """The producer warp: each consumer's Q and dO rows (one barrier for both), then K and V block by
    block into the ring (forward.py's loop)."""
    for c in gl.static_range(CONSUMERS):
        ready = q_ready.index(c)
        mbarrier.expect(ready, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        row = tile_start + c * BLOCK_M
        _copy_to_shared(q_desc, [batch, head, row, 0], ready, _tile_view(q_smem.index(c), q_desc))
        _copy_to_shared(do_desc, [batch, head, row, 0], ready, _tile_view(do_smem.index(c), do_desc))
    _load_key_blocks(
        k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_empty, batch, kv_head, 0, n_blocks_loaded,
        BLOCK_N, STAGES,
    )  # fmt: skip


# n_batch too: an int argument equal to 1 would become a constant, with no .to()
@gluon.jit(do_not_specialize=["n_batch", "n_queries", "n_keys"])
def hopper_delta_kernel(
    q_desc, do_desc, k_desc, v_desc, Lse, LseLow, Delta,
    n_batch, n_q_heads, kv_group, n_queries, n_keys, qk_scale,
    HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr, PRODUCER_REGISTERS: gl.constexpr,
):  # fmt: skip
    """Delta's two planes for one tile of 2 x BLOCK_M query rows of one (batch, head).

    q_desc, do_desc: 4-D descriptors over (B, Hq, Nq, HEAD_DIM) in (1, 1, BLOCK_M, HEAD_DIM) blocks;
    k_desc, v_desc: over (B, Hkv, Nk, HEAD_DIM) in (1, 1, BLOCK_N, HEAD_DIM) blocks. Lse (B, Hq, Nq)
    and LseLow (1, B, Hq, Nq) float32 contiguous, as the forwards write them; Delta (2, B, Hq, Nq)
    float32 contiguous, plane [0] holding the preprocess's -dLSE term on entry. Grid: (cdiv(Nq,
    2 BLOCK_M) * Hq * B,), a head's tiles next to each other, causal ones heaviest first.
    """
    n_tiles = (n_queries + CONSUMERS * BLOCK_M - 1) // (CONSUMERS * BLOCK_M)
    program = gl.program_id(0)
    tile = program % n_tiles
    if CAUSAL:
        tile = n_tiles - 1 - tile
    batch_head = program // n_tiles
    head = batch_head % n_q_heads
    batch = batch_head // n_q_heads
    kv_head = head // kv_group
    tile_start = tile * (CONSUMERS * BLOCK_M)
    row_offset = batch_head.to(gl.int64) * n_queries
    rows_in_all_heads = n_batch.to(gl.int64) * n_q_heads * n_queries
    n_blocks_loaded = _blocks_loaded(tile_start, n_queries, n_keys, CAUSAL, BLOCK_M, BLOCK_N)

    dtype: gl.constexpr = q_desc.dtype
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, BLOCK_M, HEAD_DIM], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, BLOCK_M, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(CONSUMERS):
        mbarrier.init(q_ready.index(c), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(kv_empty.index(s), count=CONSUMERS)

    # The argument tuples are written out in the call: a tuple assigned to a name first would turn its
    # constexprs into tensors.
    gl.warp_specialize(
        [
            (_consume, (
                q_smem, do_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, Lse, LseLow, Delta,
                tile_start, row_offset, rows_in_all_heads, n_queries, n_keys, n_blocks_loaded, qk_scale,
                0, CAUSAL, BLOCK_M, BLOCK_N, STAGES,
            )),
            (_consume, (
                q_smem, do_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, Lse, LseLow, Delta,
                tile_start, row_offset, rows_in_all_heads, n_queries, n_keys, n_blocks_loaded, qk_scale,
                1, CAUSAL, BLOCK_M, BLOCK_N, STAGES,
            )),
            (_produce, (
                q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
                kv_empty, batch, head, kv_head, tile_start, n_blocks_loaded, BLOCK_M, BLOCK_N, STAGES,
            )),
        ],
        [CONSUMER_WARPS, 1],
        [CONSUMER_REGISTERS, PRODUCER_REGISTERS],
    )  # fmt: skip
