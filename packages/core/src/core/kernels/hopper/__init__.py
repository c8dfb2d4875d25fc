"""The Hopper family: a warp-specialised Gluon forward for sm_90 (forward.py: a TMA producer warp, two
consumer warpgroups with asynchronous wgmma, each softmax overlapped with the previous block's P V).
Its backward is the portable family's, which reads this forward's LSE and low parts (the same
conventions, core.kernels.host).

It takes fp16/bf16 calls on an sm_90 GPU whose layouts the copy engine can read, at the head dims and
lengths where it measures faster than the portable forward (docs/perf-notes.md): D 128 with at least one
full tile of queries, and D 64 where the persistent kernel runs (below). `supports` never imports Gluon,
so this package imports on any machine and under the interpreter (where `supports` is False); a plan
compiles the kernel on first use. CORE_HOPPER=0 in the environment turns the family off.

Two kernels compute the same results, bit for bit: one program per tile of 2 x BLOCK_M query rows
(forward.py), or one program per SM walking a heaviest-first list of tiles (persistent.py). A plan takes
the persistent one where it pays (`persistent_pays`: non-causal calls with at most PERSISTENT_MAX_KEYS
keys, where a tile's key loop is short enough that overlapping one tile's prologue and epilogue with
its neighbours' work shows, and every tile weighs the same); elsewhere the one-tile kernel.
PERSISTENT forces one of them (CORE_HOPPER_PERSISTENT=1 or 0 in the environment;
core.testing.hopper_persistent in tests); None, the default, leaves the choice to that rule. Both are
read when a plan is made.

The backward is the portable family's unless BACKWARD is on (CORE_HOPPER_BACKWARD=1;
core.testing.hopper_backward in tests): then the calls `backward_supports` takes run the Gluon backward
(backward.py: dK, dV and dQ in one kernel, dQ summed in key block order), behind its switch until it
measures faster.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from core.kernels import portable
from core.kernels.hopper.backward_plan import BackwardPlan
from core.kernels.host import PLAIN, Features, OnDevice, new_buffer, score_scale

NAME = "hopper"

ENABLED = os.environ.get("CORE_HOPPER", "1") != "0"
PERSISTENT: bool | None = {"1": True, "0": False}.get(os.environ.get("CORE_HOPPER_PERSISTENT", ""))
PERSISTENT_MAX_KEYS = 4096
BACKWARD: bool = os.environ.get("CORE_HOPPER_BACKWARD", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128)  # what the kernels compile for; `faster_than_portable` says where they are used
_TMA_DIM_LIMIT = 2**32  # the copy engine's largest extent per dimension
_GRID_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class TileConfig:
    """block_m query rows per consumer warpgroup (a program has two), block_n keys per K/V stage,
    stages in the shared-memory ring; registers per thread of the consumer and producer partitions
    (setmaxnreg), and the kernel's register limit that they are carved from."""

    block_m: int
    block_n: int
    stages: int
    consumer_registers: int = 240
    producer_registers: int = 24
    max_registers: int = 168


@functools.cache
def tile_config(head_dim: int) -> TileConfig:
    # Shared memory per program: 2 query tiles + stages x (K + V) tiles. D 64: 16 + 4 x 32 KB;
    # D 128: 32 + 2 x 64 KB (three stages would leave no room in the 227 KB).
    if head_dim <= 64:
        return TileConfig(block_m=64, block_n=128, stages=4)
    return TileConfig(block_m=64, block_n=128, stages=2)


@functools.cache
def _is_sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


@functools.cache
def _multiprocessors(device: torch.device) -> int | None:
    """The GPU's SM count; None off a GPU (the compile probe's plans over CPU tensors launch nothing)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _fits_copy_engine(t: torch.Tensor) -> bool:
    """Whether a (B, H, N, D) tensor can be read (or written) by 4-D copy-engine descriptors: unit D
    stride, a 16-byte aligned start, 16-byte multiple strides for every dimension longer than 1 (the
    others are never stepped), no broadcast (stride 0) and rows that do not overlap."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    size = t.element_size()
    for extent, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if extent > 1 and (stride <= 0 or (stride * size) % 16):
            return False
    return t.shape[2] <= 1 or t.stride(2) >= t.shape[-1]


def persistent_pays(causal: bool, n_keys: int) -> bool:
    """Whether a plan takes the persistent kernel when PERSISTENT leaves the choice to it: non-causal
    calls with at most PERSISTENT_MAX_KEYS keys, where it measured faster than one program a tile;
    causal calls measured slower (its heaviest-first list runs many heads' tiles at once:
    docs/perf-notes.md)."""
    return not causal and n_keys <= PERSISTENT_MAX_KEYS


def faster_than_portable(head_dim: int, causal: bool, n_keys: int) -> bool:
    """Where this family's forward measures faster than the portable one: D 128 always; D 64 only
    where the persistent kernel runs (the one-tile kernel at D 64 measured no faster)."""
    return head_dim == 128 or (head_dim == 64 and persistent_pays(causal, n_keys))


def available() -> bool:
    """Whether this machine can run the family at all: compiled kernels (not the interpreter) and an
    sm_90 GPU."""
    from core._runtime import is_interpreted

    return ENABLED and not is_interpreted() and torch.cuda.is_available() and _is_sm90(torch.device("cuda"))


def supports(q, k, v, causal: bool, features: Features = PLAIN, head_dims=None) -> bool:
    """Whether this family takes a validated call: plain attention (no window, softcap or packing)
    in fp16/bf16 on an sm_90 GPU, where it is faster than the portable forward (`faster_than_portable`;
    or, given `head_dims`, any call at those of KERNEL_HEAD_DIMS: the checks run both kernels
    everywhere), at least one full tile of queries (shorter calls are launch-bound and the portable
    kernels' smaller tiles waste less), and layouts the copy engine can read."""
    if not ENABLED or features != PLAIN or q.device.type != "cuda" or q.dtype not in _DTYPES:
        return False
    batch, q_heads, n_queries, head_dim = q.shape
    n_keys = k.shape[2]
    if head_dims is None:
        if not faster_than_portable(head_dim, causal, n_keys):
            return False
    elif head_dim not in head_dims or head_dim not in KERNEL_HEAD_DIMS:
        return False
    if n_queries < 2 * tile_config(head_dim).block_m:
        return False
    if max(batch, q_heads, n_queries, n_keys) >= _TMA_DIM_LIMIT:
        return False
    if -(-n_queries // (2 * tile_config(head_dim).block_m)) * q_heads * batch > _GRID_LIMIT:
        return False
    return all(_fits_copy_engine(t) for t in (q, k, v)) and _is_sm90(q.device)


def backward_supports(q, k, v, dout) -> bool:
    """Whether the Hopper backward takes a call this family's forward ran (BACKWARD on): a dO of q's
    dtype that the copy engine can read, at a head dim the kernel compiles for, key blocks within one
    grid axis."""
    if not BACKWARD or dout.dtype != q.dtype or q.shape[-1] not in KERNEL_HEAD_DIMS:
        return False
    batch, kv_heads, n_keys = k.shape[0], k.shape[1], k.shape[2]
    if -(-n_keys // 128) * batch * kv_heads > _GRID_LIMIT:
        return False
    return _fits_copy_engine(dout)


def _descriptor(t: torch.Tensor, rows: int, layout):
    """A 4-D (B, H, N, D) copy-engine descriptor in (1, 1, rows, D) blocks. Dimensions of extent 1 get a
    stride that the copy engine accepts (it never steps along them)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    strides = list(t.stride())
    for dim in (0, 1, 2):
        if t.shape[dim] == 1:
            strides[dim] = t.shape[-1] * max(t.shape[2], 1) if dim < 2 else t.shape[-1]
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, rows, t.shape[-1]], layout)


class ForwardPlan(OnDevice):
    """The forward of one call signature (core.kernels' contract): `plan(q, k, v)` returns (out, lse,
    lse_low) with the portable forward's conventions: out like q; lse (B, Hq, Nq) float32 in base 2,
    -inf for rows that see no key; lse_low (1, B, Hq, Nq), its TwoSum rounding error, 0 where
    |lse| < 256 and for rows that see no key. The backward is the portable family's. The kernel, one
    program per tile or persistent, is PERSISTENT's when the plan is made, or `persistent_pays`' when
    PERSISTENT is None."""

    def __init__(self, q, k, v, causal: bool, sm_scale: float, features: Features = PLAIN):
        super().__init__(q)
        from triton.experimental.gluon import language as gl

        self.causal, self.sm_scale = causal, sm_scale
        batch, q_heads, n_queries, head_dim = q.shape
        self.config = config = tile_config(head_dim)
        self.lse_shape = (batch, q_heads, n_queries)
        element = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
        self.q_layout = gl.NVMMASharedLayout.get_default_for([1, 1, config.block_m, head_dim], element)
        self.kv_layout = gl.NVMMASharedLayout.get_default_for([1, 1, config.block_n, head_dim], element)
        tiles = -(-n_queries // (2 * config.block_m)) * q_heads * batch
        self.persistent = persistent_pays(causal, k.shape[2]) if PERSISTENT is None else PERSISTENT
        self.kernel = kernel(self.persistent)
        if self.persistent:
            self.grid = (min(tiles, _multiprocessors(q.device) or tiles),)
            counts = dict(n_batch_heads=batch * q_heads)
        else:
            self.grid = (tiles,)
            counts = {}
        kv_group = q_heads // k.shape[1]
        self.scalars = dict(
            **counts, n_q_heads=q_heads, kv_group=kv_group, n_queries=n_queries, n_keys=k.shape[2],
            qk_scale=score_scale(q.dtype, sm_scale), HEAD_DIM=head_dim, CAUSAL=bool(causal),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, STAGES=config.stages,
            CONSUMER_REGISTERS=config.consumer_registers, PRODUCER_REGISTERS=config.producer_registers,
        )  # fmt: skip
        self.options = dict(num_warps=4, maxnreg=config.max_registers)
        self._portable = portable.ForwardPlan(q, k, v, causal, sm_scale)
        self._backward_plans = {}

    def __call__(self, q, k, v, keep_statistics: bool = True):
        return self.on_device(self._run, q, k, v)

    def _run(self, q, k, v):
        out = new_buffer(q)
        lse = new_buffer(q, self.lse_shape)
        lse_low = new_buffer(q, (1, *self.lse_shape))
        arguments = self.arguments(q, k, v, out, lse, lse_low)
        self.kernel[self.grid](**arguments, **self.options)
        return out, lse, lse_low

    def arguments(self, q, k, v, out, lse, lse_low) -> dict:
        """self.kernel's arguments by name for one call: copy-engine descriptors over q, k, v and out, the
        statistics' buffers, the scalars and constexprs (launch options: self.options)."""
        config = self.config
        return dict(
            q_desc=_descriptor(q, config.block_m, self.q_layout),
            k_desc=_descriptor(k, config.block_n, self.kv_layout),
            v_desc=_descriptor(v, config.block_n, self.kv_layout),
            o_desc=_descriptor(out, config.block_m, self.q_layout),
            Lse=lse, LseLow=lse_low, **self.scalars,
        )  # fmt: skip

    def backward_plan(self, dout, dlse, q, k, v, deterministic: bool = True):
        """The Hopper backward where BACKWARD is on and it takes the call (backward_supports), else the
        portable family's; one plan per dO layout, dLSE or none, and `deterministic` (False: dQ's
        parts added in whatever order they come)."""
        if not backward_supports(q, k, v, dout):
            return self._portable.backward_plan(dout, dlse, q, k, v, deterministic=deterministic)
        key = (dout.stride(), dlse is None, deterministic)
        plan = self._backward_plans.get(key)
        if plan is None:
            if len(self._backward_plans) >= 64:
                self._backward_plans.clear()
            plan = self._backward_plans[key] = BackwardPlan(
                dout, dlse, q, k, v, self.causal, self.sm_scale, deterministic
            )
        return plan


__all__ = [
    "BACKWARD", "KERNEL_HEAD_DIMS", "NAME", "PERSISTENT", "PERSISTENT_MAX_KEYS", "BackwardPlan",
    "ForwardPlan", "TileConfig", "available", "backward_supports", "faster_than_portable", "kernel",
    "persistent_pays", "supports", "tile_config",
]  # fmt: skip


def kernel(persistent: bool = False):
    """The Gluon kernel itself, one program per tile or persistent (compiling it for a report needs no
    GPU; importing it needs Gluon)."""
    if persistent:
        from core.kernels.hopper.persistent import hopper_attention_forward_persistent_kernel

        return hopper_attention_forward_persistent_kernel
    from core.kernels.hopper.forward import hopper_attention_forward_kernel

    return hopper_attention_forward_kernel
