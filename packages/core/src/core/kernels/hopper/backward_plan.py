"""Host side of the Hopper backward (backward.py): Delta first (the portable fused backward's DeltaPlan,
in two parts: its preprocess, then this family's Gluon pass, delta.py, or the portable one), then the
Gluon kernel into a zeroed float32 dQ accumulator, then dQ from it (scaled and cast by the portable
fused backward's conversion kernel)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.kernels.host import OnDevice, ceil_div, layout_of_new_buffer, new_buffer, score_scale
from core.kernels.launch import BoundLaunch


@dataclass(frozen=True)
class BackwardTiles:
    """block_m query rows per step; keys per consumer warpgroup (a program has two); stages of the Q/dO
    ring; registers per thread of the consumer and producer partitions and the launch limit."""

    block_m: int = 64
    keys: int = 64
    stages: int = 2
    consumer_registers: int = 240
    producer_registers: int = 24
    max_registers: int = 168


# Both head dims take the same tiles. Shared memory per program, D 128: K and V 2 x 32 KB, the Q/dO
# ring 2 x 2 x 16 KB, P and dS 4 x 8 KB, the dQ hand-over 32 KB (192 KB of 227).
TILES = BackwardTiles()


# The Delta pass's tiles: the backward kernel's 64 x 64 score tiles per consumer (so P and dP are the
# same numbers there), and as many K/V stages as the shared memory holds beside Q and dO.
DELTA_BLOCK_M, DELTA_BLOCK_N = 64, 64
DELTA_STAGES = {64: 6, 128: 4}


def kernel():
    """The Gluon kernel (compiling it for a report needs no GPU; importing it needs Gluon)."""
    from core.kernels.hopper.backward import hopper_attention_backward_kernel

    return hopper_attention_backward_kernel


def delta_kernel():
    """The Gluon Delta pass (delta.py)."""
    from core.kernels.hopper.delta import hopper_delta_kernel

    return hopper_delta_kernel


class BackwardPlan(OnDevice):
    """The Hopper backward of one call signature and dO layout (core.kernels' contract):
    `plan(dout, dlse, q, k, v, out, lse, lse_low)` returns (dq, dk, dv), laid out like q, k and v. lse
    and lse_low as either forward saves them. DETERMINISTIC (the default) adds each query block's dQ
    in key block order: bitwise the same from run to run. `gluon_delta`: Delta's pass is this family's
    (delta.py), else the portable one (the same sums; for comparisons)."""

    def __init__(self, dout, dlse, q, k, v, causal: bool, sm_scale: float, deterministic: bool = True,
                 gluon_delta: bool = True):  # fmt: skip
        super().__init__(q)
        from triton.experimental.gluon import language as gl

        from core.kernels.portable.fused_backward import dq_from_accumulator_kernel
        from core.kernels.portable.fused_plans import DeltaPlan

        batch, q_heads, n_queries, head_dim = q.shape
        kv_heads, n_keys = k.shape[1], k.shape[2]
        self.tiles = tiles = TILES
        self.deterministic = deterministic
        self.delta = DeltaPlan(
            dout, dlse, q, k, v, causal, sm_scale, two_parts=True, with_pass=not gluon_delta
        )
        self.gluon_delta = gluon_delta and self.delta.from_keys
        n_query_blocks = ceil_div(n_queries, tiles.block_m)
        self.accumulator_shape = (batch, q_heads, n_query_blocks * tiles.block_m, head_dim)
        self.turns_shape = (batch, q_heads, n_query_blocks) if deterministic else (1,)
        element = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
        self.q_layout = gl.NVMMASharedLayout.get_default_for([1, 1, tiles.block_m, head_dim], element)
        self.kv_layout = gl.NVMMASharedLayout.get_default_for([1, 1, tiles.keys, head_dim], element)
        self.kernel = kernel()
        # Key blocks slowest, kv heads fastest: the dispatch order that makes waiting safe (backward.py).
        self.grid = (ceil_div(n_keys, 2 * tiles.keys) * batch * kv_heads,)
        self.scalars = dict(
            n_batch=batch, n_kv_heads=kv_heads, kv_group=q_heads // kv_heads, n_queries=n_queries,
            n_keys=n_keys, qk_scale=score_scale(q.dtype, sm_scale), sm_scale=sm_scale, HEAD_DIM=head_dim,
            CAUSAL=bool(causal), BLOCK_M=tiles.block_m, KEYS=tiles.keys, STAGES=tiles.stages,
            DETERMINISTIC=deterministic, CONSUMER_REGISTERS=tiles.consumer_registers,
            PRODUCER_REGISTERS=tiles.producer_registers,
        )  # fmt: skip
        self.options = dict(num_warps=4, maxnreg=tiles.max_registers)
        self.delta_kernel = delta_kernel() if self.gluon_delta else None
        self.delta_layouts = tuple(
            gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], element)
            for rows in (DELTA_BLOCK_M, DELTA_BLOCK_N)
        )
        self.delta_grid = (ceil_div(n_queries, 2 * DELTA_BLOCK_M) * q_heads * batch,)
        self.delta_scalars = dict(
            n_batch=batch, n_q_heads=q_heads, kv_group=q_heads // kv_heads, n_queries=n_queries,
            n_keys=n_keys, qk_scale=self.scalars["qk_scale"], HEAD_DIM=head_dim, CAUSAL=bool(causal),
            BLOCK_M=DELTA_BLOCK_M, BLOCK_N=DELTA_BLOCK_N, STAGES=DELTA_STAGES[head_dim],
            CONSUMER_REGISTERS=tiles.consumer_registers, PRODUCER_REGISTERS=tiles.producer_registers,
        )  # fmt: skip
        self.dq_from_accumulator = BoundLaunch(
            dq_from_accumulator_kernel,
            (n_query_blocks, q_heads, batch),
            (*layout_of_new_buffer(q), q_heads, n_queries),
            (sm_scale,),
            (("HEAD_DIM", head_dim), ("BLOCK_M", tiles.block_m), ("BLOCK_D", head_dim)),
            (),
        )  # fmt: skip

    def __call__(self, dout, dlse, q, k, v, out, lse, lse_low):
        return self.on_device(self._run, dout, dlse, q, k, v, out, lse, lse_low)

    def _run(self, dout, dlse, q, k, v, out, lse, lse_low):
        delta = self.delta(self.index, dout, dlse, q, k, v, out, lse, lse_low)
        if self.gluon_delta:
            self.delta_kernel[self.delta_grid](**self.delta_arguments(q, k, v, dout, lse, lse_low, delta),
                                               **self.options)  # fmt: skip
        dq, dk, dv = new_buffer(q), new_buffer(k), new_buffer(v)
        accumulator = torch.zeros(self.accumulator_shape, dtype=torch.float32, device=q.device)
        turns = torch.zeros(self.turns_shape, dtype=torch.int32, device=q.device)
        arguments = self.arguments(q, k, v, dout, dk, dv, lse, lse_low, delta, accumulator, turns)
        self.kernel[self.grid](**arguments, **self.options)
        self.dq_from_accumulator(self.index, accumulator, dq)
        return dq, dk, dv

    def delta_arguments(self, q, k, v, dout, lse, lse_low, delta) -> dict:
        """self.delta_kernel's arguments by name for one call (launch options: self.options)."""
        from core.kernels.hopper import _descriptor

        rows_layout, keys_layout = self.delta_layouts
        return dict(
            q_desc=_descriptor(q, DELTA_BLOCK_M, rows_layout),
            do_desc=_descriptor(dout, DELTA_BLOCK_M, rows_layout),
            k_desc=_descriptor(k, DELTA_BLOCK_N, keys_layout),
            v_desc=_descriptor(v, DELTA_BLOCK_N, keys_layout),
            Lse=lse, LseLow=lse_low, Delta=delta, **self.delta_scalars,
        )  # fmt: skip

    def arguments(self, q, k, v, dout, dk, dv, lse, lse_low, delta, accumulator, turns) -> dict:
        """self.kernel's arguments by name for one call (launch options: self.options)."""
        from core.kernels.hopper import _descriptor

        rows, keys = self.tiles.block_m, self.tiles.keys
        return dict(
            q_desc=_descriptor(q, rows, self.q_layout), k_desc=_descriptor(k, keys, self.kv_layout),
            v_desc=_descriptor(v, keys, self.kv_layout), do_desc=_descriptor(dout, rows, self.q_layout),
            dk_desc=_descriptor(dk, keys, self.kv_layout), dv_desc=_descriptor(dv, keys, self.kv_layout),
            Lse=lse, LseLow=lse_low, Delta=delta, DqAccumulator=accumulator, Turns=turns, **self.scalars,
        )  # fmt: skip
