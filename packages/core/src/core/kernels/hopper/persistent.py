"""The Hopper forward, persistent: one program per SM (at most one per tile) walks a fixed list of tiles,
so the barriers, the setup and the tail of one tile overlap the next tile's loads, and causal work is
balanced across the SMs.

The partitions are forward.py's: one producer warp (copy engine, TMA) and two consumer warpgroups of
BLOCK_M query rows each. Every partition walks the same tiles: program p takes positions p, p + P,
p + 2P, ... (P programs) of the schedule

- causal: the heaviest tiles first: position t is query tile n_tiles - 1 - t // (B Hq) of
  (batch, head) t % (B Hq), so all heads' last tiles (the most key blocks) come first, then every
  head's second to last, and so on. Taken in static strides, each round of P positions hands the
  programs tiles of similar weight (equal where P divides B Hq) and the lightest tiles come last,
  where they fill the tail (FlashAttention-3's causal persistent schedule).
- not causal: every tile has the same weight; position t is query tile t % n_tiles of (batch, head)
  t // n_tiles, a head's tiles next to each other, so the programs running at once read the same
  K and V through L2 (the one-tile kernel's grid order).

Across tiles nothing drains: the K/V ring's slots are counted from the program's first tile (a block's
stage and phase come from that running count), so the producer loads the next tile's key blocks as
soon as stages are free; and each consumer has two query buffers, so the producer loads the next tile's
queries while the current tile still runs. A query buffer also stages its tile's output for the copy
engine: the producer refills it only after its consumer has seen that store read out (q_free).

Results are bitwise the one-tile kernel's (forward.hopper_attention_forward_kernel): each tile is
computed by the same consumer code (forward._consume), from the same key blocks in the same order, with
the same instructions; only the program that runs it, the ring stages and the query buffer differ.

This module imports Gluon at import time; core.kernels.hopper imports it only when a plan needs it.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from core.kernels.hopper.forward import (
    CONSUMER_WARPS,
    CONSUMERS,
    _blocks_loaded,
    _consume,
    _load_key_blocks,
    _load_query_tile,
)

QUERY_BUFFERS = gl.constexpr(2)  # per consumer: the next tile's queries land while this tile runs


@gluon.jit
def _tile_at(
    position, n_batch_heads, n_q_heads, kv_group, n_queries, n_keys,
    CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
):  # fmt: skip
    """(batch, head, kv_head, tile_start, row_offset, n_blocks_loaded) of the tile at `position` of the
    schedule (the module's docstring)."""
    n_tiles = (n_queries + CONSUMERS * BLOCK_M - 1) // (CONSUMERS * BLOCK_M)
    if CAUSAL:
        tile = n_tiles - 1 - position // n_batch_heads
        batch_head = position % n_batch_heads
    else:
        tile = position % n_tiles
        batch_head = position // n_tiles
    head = batch_head % n_q_heads
    tile_start = tile * (CONSUMERS * BLOCK_M)
    n_blocks_loaded = _blocks_loaded(tile_start, n_queries, n_keys, CAUSAL, BLOCK_M, BLOCK_N)
    row_offset = batch_head.to(gl.int64) * n_queries
    return batch_head // n_q_heads, head, head // kv_group, tile_start, row_offset, n_blocks_loaded


@gluon.jit
def _consume_tiles(
    q_smem, k_smem, v_smem, q_ready, q_free, k_ready, v_ready, kv_empty, o_desc, Lse, LseLow,
    n_batch_heads, n_q_heads, kv_group, n_queries, n_keys, qk_scale,
    CONSUMER: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """Consumer CONSUMER (0 or 1): rows CONSUMER x BLOCK_M .. + BLOCK_M of each of the program's tiles.
    Its i-th tile's queries sit in its buffer i % QUERY_BUFFERS, whose ready barrier completes its
    (i // QUERY_BUFFERS)-th phase then; the buffer is handed back once the output staged in it is read."""
    n_tiles = (n_queries + CONSUMERS * BLOCK_M - 1) // (CONSUMERS * BLOCK_M)
    ring_base = 0
    done = 0  # the program's tiles so far (a Gluon loop has no enumerate)
    for position in range(gl.program_id(0), n_tiles * n_batch_heads, gl.num_programs(0)):
        batch, head, _, tile_start, row_offset, n_blocks_loaded = _tile_at(
            position, n_batch_heads, n_q_heads, kv_group, n_queries, n_keys, CAUSAL, BLOCK_M, BLOCK_N
        )
        buffer = CONSUMER * QUERY_BUFFERS + done % QUERY_BUFFERS
        _consume(
            q_smem.index(buffer), k_smem, v_smem, q_ready.index(buffer), k_ready, v_ready, kv_empty,
            o_desc, Lse, LseLow, batch, head, tile_start + CONSUMER * BLOCK_M, row_offset, n_queries,
            n_keys, n_blocks_loaded, qk_scale, ring_base, (done // QUERY_BUFFERS) & 1,
            HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, STAGES,
        )  # fmt: skip
        mbarrier.arrive(q_free.index(buffer), count=1)
        ring_base += n_blocks_loaded
        done += 1  # noqa: SIM113


@gluon.jit
def _produce_tiles(
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_free, k_ready, v_ready, kv_empty,
    n_batch_heads, n_q_heads, kv_group, n_queries, n_keys,
    CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """The producer warp: for each of the program's tiles, both consumers' query tiles (each into a
    buffer its consumer has handed back), then the tile's key blocks into the ring, whose slots run on
    from the previous tile's."""
    n_tiles = (n_queries + CONSUMERS * BLOCK_M - 1) // (CONSUMERS * BLOCK_M)
    ring_base = 0
    done = 0  # the program's tiles so far (a Gluon loop has no enumerate)
    for position in range(gl.program_id(0), n_tiles * n_batch_heads, gl.num_programs(0)):
        batch, head, kv_head, tile_start, _, n_blocks_loaded = _tile_at(
            position, n_batch_heads, n_q_heads, kv_group, n_queries, n_keys, CAUSAL, BLOCK_M, BLOCK_N
        )
        for c in gl.static_range(CONSUMERS):
            buffer = c * QUERY_BUFFERS + done % QUERY_BUFFERS
            # A fresh barrier counts as having completed the phase before its first: each buffer's
            # first load does not wait.
            mbarrier.wait(q_free.index(buffer), ((done // QUERY_BUFFERS) & 1) ^ 1)
            _load_query_tile(
                q_desc, q_smem.index(buffer), q_ready.index(buffer), batch, head, tile_start + c * BLOCK_M
            )
        _load_key_blocks(
            k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_empty, batch, kv_head, ring_base,
            n_blocks_loaded, BLOCK_N, STAGES,
        )  # fmt: skip
        ring_base += n_blocks_loaded
        done += 1  # noqa: SIM113


@gluon.jit(do_not_specialize=["n_queries", "n_keys"])
def hopper_attention_forward_persistent_kernel(
    q_desc, k_desc, v_desc, o_desc, Lse, LseLow,
    n_batch_heads, n_q_heads, kv_group, n_queries, n_keys, qk_scale,
    HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr, PRODUCER_REGISTERS: gl.constexpr,
):  # fmt: skip
    """Out, LSE2 and its low part for every tile of 2 x BLOCK_M query rows of every (batch, head), the
    program's share of them in the module's schedule. Arguments as the one-tile kernel's, with
    n_batch_heads = B x Hq. Grid: (min(SMs, cdiv(Nq, 2 BLOCK_M) x B x Hq),)."""
    dtype: gl.constexpr = q_desc.dtype
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS * QUERY_BUFFERS, BLOCK_M, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [CONSUMERS * QUERY_BUFFERS, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [CONSUMERS * QUERY_BUFFERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(CONSUMERS * QUERY_BUFFERS):
        mbarrier.init(q_ready.index(b), count=1)
        mbarrier.init(q_free.index(b), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(kv_empty.index(s), count=CONSUMERS)

    # The argument tuples are written out in the call: a tuple assigned to a name first would turn its
    # constexprs into tensors.
    gl.warp_specialize(
        [
            (_consume_tiles, (
                q_smem, k_smem, v_smem, q_ready, q_free, k_ready, v_ready, kv_empty, o_desc, Lse, LseLow,
                n_batch_heads, n_q_heads, kv_group, n_queries, n_keys, qk_scale,
                0, HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, STAGES,
            )),
            (_consume_tiles, (
                q_smem, k_smem, v_smem, q_ready, q_free, k_ready, v_ready, kv_empty, o_desc, Lse, LseLow,
                n_batch_heads, n_q_heads, kv_group, n_queries, n_keys, qk_scale,
                1, HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, STAGES,
            )),
            (_produce_tiles, (
                q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_free, k_ready, v_ready,
                kv_empty, n_batch_heads, n_q_heads, kv_group, n_queries, n_keys,
                CAUSAL, BLOCK_M, BLOCK_N, STAGES,
            )),
        ],
        [CONSUMER_WARPS, 1],
        [CONSUMER_REGISTERS, PRODUCER_REGISTERS],
    )  # fmt: skip
