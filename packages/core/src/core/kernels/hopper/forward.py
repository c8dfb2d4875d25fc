"""The Hopper forward in Gluon: one producer warp streams K and V through the copy engine (TMA) into a
ring of shared-memory stages, and two consumer warpgroups each own BLOCK_M query rows of one 2 x BLOCK_M
tile, computing S = Q K^T and O += P V with asynchronous warpgroup MMAs (wgmma).

Inside a consumer the score MMA of key block j is issued before the P V MMA of block j - 1, and the
softmax of block j runs while that P V MMA is still on the tensor cores (FlashAttention-3's intra-
warpgroup overlap). The two consumers are separate partitions with their own register budget; the warp
scheduler interleaves one's softmax with the other's MMAs.

The arithmetic is the portable forward's (core.kernels.portable.forward) for fp16/bf16, step for step:
scores in base 2 rounded once to float32 before the max is subtracted (mul.rn, no FMA), running max
and Kahan-compensated running sum in float32, P rounded to the input dtype before P V, and the LSE
saved in two parts with the same rules.
Only the final division differs: a reciprocal per row times the accumulator (two roundings in float32,
hidden by the output's rounding to fp16/bf16).

The persistent kernel (persistent.py) runs these partitions' pieces (_consume, _load_query_tile,
_load_key_blocks) over many tiles per program; their ring slots and query phases are its arguments.

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

# |LSE2| below which no low part is saved (the portable forward's LOW_PART_NEGLIGIBLE_BELOW, same rule).
LOW_PART_NEGLIGIBLE_BELOW = gl.constexpr(256.0)

CONSUMERS = gl.constexpr(2)  # consumer warpgroups per program, each with BLOCK_M query rows
CONSUMER_WARPS = gl.constexpr(4)  # one warpgroup: the smallest unit a wgmma runs on


@gluon.jit
def _scaled(scores, qk_scale):
    """scores * qk_scale rounded to float32 before anything is subtracted from it (core.kernels.shared's
    _scaled_scores): mul.rn cannot be contracted into an FMA with the subtraction of the row max, so the
    max's own exponent is exactly 0 and the backward recomputes the same numbers."""
    return gl.inline_asm_elementwise(
        "mul.rn.f32 $0, $1, $2;", "=r,r,r", [scores, qk_scale], dtype=gl.float32, is_pure=True, pack=1
    )


# Gluon's names moved after Triton 3.6 (the old ones raise in later releases): the copy engine's
# transfers became tma.async_load / async_store, and the shared-buffer view `_reinterpret` became public.
_copy_to_shared = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_copy_to_global = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
if hasattr(gl.shared_memory_descriptor, "reinterpret"):

    @gluon.jit
    def _tile_view(buffer, desc):
        """A (rows, HEAD_DIM) shared buffer seen as the (1, 1, rows, HEAD_DIM) block of `desc`, a 4-D
        (batch, head, row, dim) descriptor: the same bytes and swizzle, the leading dimensions being 1."""
        return buffer.reinterpret(buffer.dtype, desc.block_type.shape, desc.layout)

else:

    @gluon.jit
    def _tile_view(buffer, desc):
        """The same view, by Triton 3.6's name."""
        return buffer._reinterpret(buffer.dtype, desc.block_type.shape, desc.layout)


@gluon.jit
def _softmax_block(
    scores, m_i, l_i, l_comp, qk_scale, block_start, rows, n_keys, diagonal,
    MASKED: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, S_LAYOUT: gl.constexpr,
):  # fmt: skip
    """(p, alpha, m_new, l_i, l_comp) for one raw score block: the portable forward's _attend_to_key_blocks:
    softmax step for fp16/bf16. MASKED blocks hide keys past n_keys and, when CAUSAL, keys j > i +
    diagonal; a row that has seen no key yet keeps m = -inf and gets p = alpha = 0 (no -inf - -inf)."""
    scores = _scaled(scores, qk_scale)
    if MASKED:
        cols = block_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
        visible = gl.expand_dims(cols < n_keys, 0)
        if CAUSAL:
            visible = visible & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows + diagonal, 1))
        scores = gl.where(visible, scores, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(scores, 1))
    if MASKED:
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    p = gl.exp2(scores - gl.expand_dims(m_safe, 1))
    alpha = gl.exp2(m_i - m_safe)
    # The row sum is Kahan-compensated (the LSE is a float32 output whose error would grow with N).
    l_i = l_i * alpha
    l_comp = l_comp * alpha
    row_sum = gl.sum(p, 1) - l_comp
    l_new = l_i + row_sum
    l_comp = (l_new - l_i) - row_sum
    return p, alpha, m_new, l_new, l_comp


@gluon.jit
def _overlapped_step(
    j, ring_base, q_smem, k_smem, v_smem, k_ready, v_ready, kv_empty, acc, p_prev, m_i, l_i, l_comp,
    qk_scale, rows, n_keys, diagonal,
    MASKED: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr,
):  # fmt: skip
    """Key block j (j >= 1), in ring slot ring_base + j: issue S_j = Q K_j^T, then O += P_{j-1} V_{j-1};
    take the softmax of S_j while the second MMA runs; then rescale O to block j's max. Returns the state
    with P_j pending."""
    slot = ring_base + j
    stage = slot % STAGES
    prev = (slot - 1) % STAGES
    mbarrier.wait(k_ready.index(stage), (slot // STAGES) & 1)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_LAYOUT)
    s_token = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(prev), ((slot - 1) // STAGES) & 1)
    o_token = warpgroup_mma(p_prev, v_smem.index(prev), acc, is_async=True)
    scores = warpgroup_mma_wait(num_outstanding=1, deps=(s_token,))
    p, alpha, m_i, l_i, l_comp = _softmax_block(
        scores, m_i, l_i, l_comp, qk_scale, j * BLOCK_N, rows, n_keys, diagonal, MASKED, CAUSAL, BLOCK_N,
        S_LAYOUT,
    )  # fmt: skip
    acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(o_token, p_prev))
    mbarrier.arrive(kv_empty.index(prev), count=1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT)), 1)
    p_prev = gl.convert_layout(p.to(p_prev.dtype), P_LAYOUT)
    return acc, p_prev, m_i, l_i, l_comp


@gluon.jit
def _consume(
    q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, o_desc, Lse, LseLow,
    batch, head, row_start, row_offset, n_queries, n_keys, n_blocks_loaded, qk_scale, ring_base, q_phase,
    HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):  # fmt: skip
    """One consumer warpgroup: BLOCK_M query rows from row_start against the key blocks they see, in the
    order the producer loads them; it releases every stage the producer loaded, including the blocks
    past its own causal end (the other consumer's rows see more keys). Writes out, LSE and its low part,
    staging the output in q_smem; returns once the copy engine has read it from there.
    row_offset: the index of this head's row 0 in Lse and LseLow. Key block j sits in ring slot
    ring_base + j (stage slot % STAGES, its (slot // STAGES)-th use); q_ready completes its phase
    q_phase when the query tile has landed."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, BLOCK_N, 16]
    )
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    ROW_LAYOUT: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    dtype: gl.constexpr = q_smem.dtype

    # Query i sees key j iff j <= i + diagonal (bottom-right aligned causal mask). Blocks below
    # n_unmasked are visible to every row of this warpgroup; blocks up to n_blocks to some of them.
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

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, ROW_LAYOUT)
    l_i = gl.zeros([BLOCK_M], gl.float32, ROW_LAYOUT)
    l_comp = gl.zeros([BLOCK_M], gl.float32, ROW_LAYOUT)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, O_LAYOUT)
    p_prev = gl.zeros([BLOCK_M, BLOCK_N], dtype, P_LAYOUT)
    mbarrier.wait(q_ready, q_phase)

    if n_blocks > 0:
        # Block 0 alone: its scores, softmax and P; its P V is issued with block 1's scores.
        first = ring_base % STAGES
        mbarrier.wait(k_ready.index(first), (ring_base // STAGES) & 1)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_LAYOUT)
        s_token = warpgroup_mma(
            q_smem, k_smem.index(first).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        scores = warpgroup_mma_wait(num_outstanding=0, deps=(s_token,))
        p, _, m_i, l_i, l_comp = _softmax_block(
            scores, m_i, l_i, l_comp, qk_scale, 0, rows, n_keys, diagonal, True, CAUSAL, BLOCK_N, S_LAYOUT
        )
        p_prev = gl.convert_layout(p.to(dtype), P_LAYOUT)
        for j in range(1, n_unmasked):
            acc, p_prev, m_i, l_i, l_comp = _overlapped_step(
                j, ring_base, q_smem, k_smem, v_smem, k_ready, v_ready, kv_empty, acc, p_prev, m_i, l_i,
                l_comp, qk_scale, rows, n_keys, diagonal, False, CAUSAL, BLOCK_M, BLOCK_N, STAGES, S_LAYOUT,
                O_LAYOUT, P_LAYOUT,
            )  # fmt: skip
        for j in range(gl.maximum(n_unmasked, 1), n_blocks):
            acc, p_prev, m_i, l_i, l_comp = _overlapped_step(
                j, ring_base, q_smem, k_smem, v_smem, k_ready, v_ready, kv_empty, acc, p_prev, m_i, l_i,
                l_comp, qk_scale, rows, n_keys, diagonal, True, CAUSAL, BLOCK_M, BLOCK_N, STAGES, S_LAYOUT,
                O_LAYOUT, P_LAYOUT,
            )  # fmt: skip
        # The last block's P V.
        last = ring_base + n_blocks - 1
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        o_token = warpgroup_mma(p_prev, v_smem.index(last % STAGES), acc, is_async=True)
        acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(o_token, p_prev))
        mbarrier.arrive(kv_empty.index(last % STAGES), count=1)
    # Blocks only the other consumer's rows see: hand their stages back as they arrive.
    for slot in range(ring_base + n_blocks, ring_base + n_blocks_loaded):
        mbarrier.wait(v_ready.index(slot % STAGES), (slot // STAGES) & 1)
        mbarrier.arrive(kv_empty.index(slot % STAGES), count=1)

    # l_i >= 1 for every row that saw a key (its max contributes exp2(0)); rows that saw none output 0
    # and LSE -inf.
    sees_a_key = l_i > 0.0
    l_safe = gl.where(sees_a_key, l_i, 1.0)
    inv_l = gl.where(sees_a_key, 1.0 / l_safe, 0.0)
    out = acc * gl.expand_dims(gl.convert_layout(inv_l, gl.SliceLayout(1, O_LAYOUT)), 1)
    # The query tile is no longer read by any MMA: it stages the output for the copy engine, which
    # clips the rows past n_queries.
    q_smem.store(out.to(dtype))
    fence_async_shared()
    _copy_to_global(o_desc, [batch, head, row_start, 0], _tile_view(q_smem, o_desc))

    # The LSE in two parts, as the portable forward saves it: TwoSum's rounding error of m + log2(l), zero
    # where |LSE2| < 2^8 (there it cannot move P by a fraction of fp16's rounding) and for empty rows.
    log_l = gl.log2(l_safe)
    lse = gl.where(sees_a_key, m_i + log_l, float("-inf"))
    log_l_part = lse - m_i
    lse_low = gl.where(sees_a_key, (m_i - (lse - log_l_part)) + (log_l - log_l_part), 0.0)
    lse_low = gl.where(gl.abs(lse) < LOW_PART_NEGLIGIBLE_BELOW, 0.0, lse_low)
    row_ok = rows < n_queries
    gl.store(Lse + row_offset + rows, lse, mask=row_ok)
    gl.store(LseLow + row_offset + rows, lse_low, mask=row_ok)
    tma.store_wait(pendings=0)


@gluon.jit
def _blocks_loaded(
    tile_start, n_queries, n_keys, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr
):  # fmt: skip
    """The key blocks that the last row of the tile of CONSUMERS x BLOCK_M rows from tile_start sees
    (the producer loads them all; the first consumer may see fewer)."""
    if CAUSAL:
        key_end = gl.minimum(n_keys, gl.maximum(tile_start + CONSUMERS * BLOCK_M + n_keys - n_queries, 0))
    else:
        key_end = n_keys
    return (key_end + BLOCK_N - 1) // BLOCK_N


@gluon.jit
def _produce(
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
    batch, head, kv_head, tile_start, n_blocks_loaded,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """The producer warp: both consumers' query tiles, then K and V block by block into the ring, each
    stage reused once both consumers have released it. K and V have their own ready barriers, so the
    score MMA can start before V has landed."""
    for c in gl.static_range(CONSUMERS):
        _load_query_tile(q_desc, q_smem.index(c), q_ready.index(c), batch, head, tile_start + c * BLOCK_M)
    _load_key_blocks(
        k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_empty, batch, kv_head, 0, n_blocks_loaded,
        BLOCK_N, STAGES,
    )  # fmt: skip


@gluon.jit
def _load_query_tile(q_desc, q_smem, q_ready, batch, head, row_start):
    """BLOCK_M query rows from row_start into q_smem; q_ready completes a phase when they have landed."""
    mbarrier.expect(q_ready, q_desc.block_type.nbytes)
    _copy_to_shared(q_desc, [batch, head, row_start, 0], q_ready, _tile_view(q_smem, q_desc))


@gluon.jit
def _load_key_blocks(
    k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_empty, batch, kv_head, ring_base, n_blocks,
    BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """Key blocks 0 .. n_blocks - 1 of one (batch, kv head) into ring slots ring_base + j, each stage
    reused once both consumers have released its previous use."""
    for j in range(n_blocks):
        slot = ring_base + j
        stage = slot % STAGES
        # A fresh barrier counts as having completed the phase before its first: the first pass
        # through the ring does not wait.
        mbarrier.wait(kv_empty.index(stage), ((slot // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        _copy_to_shared(
            k_desc, [batch, kv_head, j * BLOCK_N, 0], k_ready.index(stage),
            _tile_view(k_smem.index(stage), k_desc),
        )  # fmt: skip
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        _copy_to_shared(
            v_desc, [batch, kv_head, j * BLOCK_N, 0], v_ready.index(stage),
            _tile_view(v_smem.index(stage), v_desc),
        )  # fmt: skip


@gluon.jit
def _second_consumer(
    q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, o_desc, Lse, LseLow,
    batch, head, tile_start, row_offset, n_queries, n_keys, n_blocks_loaded, qk_scale,
    HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):  # fmt: skip
    _consume(
        q_smem.index(1), k_smem, v_smem, q_ready.index(1), k_ready, v_ready, kv_empty, o_desc, Lse, LseLow,
        batch, head, tile_start + BLOCK_M, row_offset, n_queries, n_keys, n_blocks_loaded, qk_scale, 0, 0,
        HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, STAGES,
    )  # fmt: skip


@gluon.jit
def _first_consumer(
    q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, o_desc, Lse, LseLow,
    batch, head, tile_start, row_offset, n_queries, n_keys, n_blocks_loaded, qk_scale,
    HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):  # fmt: skip
    _consume(
        q_smem.index(0), k_smem, v_smem, q_ready.index(0), k_ready, v_ready, kv_empty, o_desc, Lse, LseLow,
        batch, head, tile_start, row_offset, n_queries, n_keys, n_blocks_loaded, qk_scale, 0, 0,
        HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, STAGES,
    )  # fmt: skip


@gluon.jit(do_not_specialize=["n_queries", "n_keys"])
def hopper_attention_forward_kernel(
    q_desc, k_desc, v_desc, o_desc, Lse, LseLow,
    n_q_heads, kv_group, n_queries, n_keys, qk_scale,
    HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr, PRODUCER_REGISTERS: gl.constexpr,
):  # fmt: skip
    """Out, LSE2 and its low part for one tile of 2 x BLOCK_M query rows of one (batch, head).

    q_desc, o_desc: 4-D descriptors over (B, Hq, Nq, HEAD_DIM) in (1, 1, BLOCK_M, HEAD_DIM) blocks;
    k_desc, v_desc: over (B, Hkv, Nk, HEAD_DIM) in (1, 1, BLOCK_N, HEAD_DIM) blocks. The copy engine
    zero-fills rows past N and clips stores there, per head. Lse (B, Hq, Nq) and LseLow (1, B, Hq, Nq)
    float32 contiguous, as the portable forward writes them. Grid: (cdiv(Nq, 2 BLOCK_M) * Hq * B,), the
    query tiles of one head next to each other (they share K and V in L2); causal tiles of a head
    heaviest first.
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

    n_blocks_loaded = _blocks_loaded(tile_start, n_queries, n_keys, CAUSAL, BLOCK_M, BLOCK_N)

    dtype: gl.constexpr = q_desc.dtype
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, BLOCK_M, HEAD_DIM], q_layout)
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
            (_first_consumer, (
                q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, o_desc, Lse, LseLow,
                batch, head, tile_start, row_offset, n_queries, n_keys, n_blocks_loaded, qk_scale,
                HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, STAGES,
            )),
            (_second_consumer, (
                q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, o_desc, Lse, LseLow,
                batch, head, tile_start, row_offset, n_queries, n_keys, n_blocks_loaded, qk_scale,
                HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, STAGES,
            )),
            (_produce, (
                q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
                batch, head, kv_head, tile_start, n_blocks_loaded, BLOCK_M, BLOCK_N, STAGES,
            )),
        ],
        [CONSUMER_WARPS, 1],
        [CONSUMER_REGISTERS, PRODUCER_REGISTERS],
    )  # fmt: skip
