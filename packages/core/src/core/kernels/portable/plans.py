"""The portable family's host side: allocate outputs, pick tile shapes, launch the kernels. No
validation here (core._validation runs first) and no copies of the inputs: every kernel takes strides.

The work is split in two so that a repeated call does only the second half:

- a plan (`ForwardPlan`, `BackwardPlan`) holds everything that follows from the inputs' shapes,
  strides, dtypes, alignment and the options: tile shapes, grids, every integer argument, whether the
  layout allows tensor descriptors, one bound launch per kernel (core.kernels.launch.BoundLaunch);
- calling the plan allocates the outputs and launches.

core._plans keeps the forward plans of validated call signatures, and each forward plan keeps its
backward plans.

A call's Features (core.kernels.host) become the kernels' switches (WINDOW, SOFTCAP, VARLEN) and their
arguments; a plain call passes them off, and its kernels are the plain ones. A varlen plan (packed
(total, H, D) inputs) takes each call's Packed sequences: their cumulative lengths go to the kernels as
pointers, and the longest sequence sizes that call's grid.
"""

from __future__ import annotations

import functools
import os

import torch

from core._runtime import install_scratch_allocator, is_interpreted, patch_interpreter
from core.kernels.host import (
    LOG2E,
    PLAIN,
    Features,
    OnDevice,
    Packed,
    ceil_div,
    layout_of_new_buffer,
    multiprocessors,
    new_buffer,
    score_scale,
    uses_base_2,
)
from core.kernels.launch import BoundLaunch
from core.kernels.portable import config as _config
from core.kernels.portable.backward import (
    STATS_ROW_PAD,
    backward_dkdv_kernel,
    backward_dq_kernel,
    backward_preprocess_kernel,
)
from core.kernels.portable.forward import attention_forward_kernel, attention_forward_persistent_kernel

FP32_MAX = torch.finfo(torch.float32).max


def _or_unused(optional: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel never reads (dLSE when the LSE was not used, cu_seqlens of a call
    that is not packed) still needs a tensor."""
    return stand_in if optional is None else optional


@functools.cache
def _precision_flags(dtype: torch.dtype, interpreted: bool) -> tuple:
    """float32 inputs get float32 arithmetic throughout: full-precision dots ("ieee", not TF32), natural
    base, and libdevice's exp/log instead of the hardware approximations. fp16/bf16 ignore DOT_PRECISION
    (their dots are exact products summed in fp32) and keep the fast exp2. The interpreter's exp is
    numpy's, which is already precise (and it has no libdevice)."""
    full_fp32 = dtype == torch.float32
    return (
        ("DOT_PRECISION", "ieee" if full_fp32 else "tf32"),
        ("BASE_2", uses_base_2(dtype)),
        ("PRECISE_EXP", full_fp32 and not interpreted),
    )


def _as_kernel_strides(strides: tuple[int, ...]) -> tuple[int, ...]:
    if len(strides) == 3:  # packed (total, H, D)
        row_stride, head_stride, d_stride = strides
        return 0, head_stride, row_stride, d_stride
    return strides


def kernel_strides(t: torch.Tensor) -> tuple[int, ...]:
    """The (batch, head, row, head dim) strides a kernel takes for t: a (B, H, N, D) tensor's own, or for a
    packed (total, H, D) one batch stride 0 (VARLEN kernels place each sequence by its first row)."""
    return _as_kernel_strides(t.stride())


def _kernel_strides_of_new_buffer(like: torch.Tensor) -> tuple[int, ...]:
    """kernel_strides of new_buffer(like), without allocating."""
    return _as_kernel_strides(layout_of_new_buffer(like))


def descriptors_fit(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may read these (B, H, N, D) or packed (total, H, D) tensors through tensor
    descriptors (the copy engine, TMA): unit stride along D, and 16-byte aligned start, batch, head and
    row steps, with rows that do not overlap. (A packed sequence's first row is then aligned too.) Any
    other layout is read with pointer loads, which take every stride, and so is an empty packed tensor
    (no sequence has keys), whose address may be null."""
    for t in tensors:
        if t.numel() == 0:
            return False
        size = t.element_size()
        batch_stride, head_stride, row_stride, d_stride = kernel_strides(t)
        if d_stride != 1 or t.data_ptr() % 16 or (t.shape[-1] * size) % 16 or row_stride < t.shape[-1]:
            return False
        if (batch_stride * size) % 16 or (head_stride * size) % 16 or (row_stride * size) % 16:
            return False
    return True


@functools.cache
def _attention_meta(
    head_dim: int, causal: bool, block_d: int, config, dtype, interpreted: bool, descriptors: bool,
    window: bool = False, softcap: bool = False, varlen: bool = False,
):  # fmt: skip
    """(constexprs, options) of the forward, dK/dV and dQ kernels, which share their constexpr list (the
    dK/dV and dQ kernels' end with one more each), in signature order (a bound launch passes
    constexprs by position). Cached: built once per shape."""
    constexprs = (
        ("HEAD_DIM", head_dim), ("CAUSAL", causal),
        ("BLOCK_M", config.block_m), ("BLOCK_N", config.block_n), ("BLOCK_D", block_d),
        *_precision_flags(dtype, interpreted),
        ("TENSOR_DESCRIPTORS", descriptors), ("WINDOW", window), ("SOFTCAP", softcap), ("VARLEN", varlen),
    )  # fmt: skip
    return constexprs, (("num_warps", config.num_warps), ("num_stages", config.num_stages))


def _side(size: int, unbounded: int) -> int:
    """A window side as the kernels take it: -1 (no bound) as `unbounded`, one past every key, and a bound
    clipped to the same."""
    return unbounded if size < 0 else min(size, unbounded)


class _Call:
    """What the kernels take from a call's features: the masks and their integer arguments, the softcap's
    scales, and the sizes (packed totals for varlen).

    causal: the kernels' CAUSAL, a causal call without a left window bound (a causal window is a WINDOW
    whose right side is 0). window: the kernels' (window_left, window_right), each side without a bound
    passed as one past every key (left: Nk, right: Nq, or the packed totals: no sequence is longer), and a
    bound side clipped to the same, so that the kernels' index arithmetic stays within int32.
    softcap: (softcap_in, softcap_out) = (sm_scale / softcap, softcap in the kernels' base); softcap_in is
    clipped to float32's range (beyond it every nonzero logit's tanh is +-1 anyway, and an infinite
    scale would make a zero dot NaN).
    """

    def __init__(self, q, k, causal: bool, sm_scale: float, features: Features):
        self.varlen = features.varlen
        if self.varlen:
            self.batch, self.n_queries, self.q_heads, self.head_dim = None, *q.shape
            self.n_keys, self.kv_heads = k.shape[0], k.shape[1]
            self.lse_shape = (self.q_heads, self.n_queries)
        else:
            self.batch, self.q_heads, self.n_queries, self.head_dim = q.shape
            self.kv_heads, self.n_keys = k.shape[1], k.shape[2]
            self.lse_shape = (self.batch, self.q_heads, self.n_queries)
        self.low_shape = (2 if q.dtype == torch.float32 else 1, *self.lse_shape)
        self.windowed = features.windowed
        self.causal = causal and not self.windowed
        if self.windowed:
            self.window = (
                _side(features.window_left, self.n_keys),
                _side(features.window_right, self.n_queries),
            )
        else:
            self.window = (0, 0)
        self.softcapped = features.softcap > 0
        if self.softcapped:
            softcap_in = max(-FP32_MAX, min(FP32_MAX, sm_scale / features.softcap))
            self.softcap = (softcap_in, features.softcap * (LOG2E if uses_base_2(q.dtype) else 1.0))
        else:
            self.softcap = (0.0, 0.0)

    @property
    def trailing(self) -> tuple[int, tuple]:
        """(trailing_tensors, extra) of the kernels' bound launches: the feature arguments, after the
        plain kernels' own (core.kernels.launch.BoundLaunch): cu_seqlens_q and cu_seqlens_k (stand-ins
        for plain calls), the window's two sides, the softcap's two scales."""
        return 2, (*self.window, *self.softcap)

    def meta(self, block_d, config, dtype, interpreted: bool, descriptors: bool):
        return _attention_meta(
            self.head_dim, self.causal, block_d, config, dtype, interpreted, descriptors, self.windowed,
            self.softcapped, self.varlen,
        )  # fmt: skip

    def grid(self, block: int, heads: int, rows: int):
        """A grid over `rows` (queries or keys) in blocks of `block`, `heads` and the batch; None for
        varlen, whose grid each call gives (_launch)."""
        return None if self.varlen else (ceil_div(rows, block), heads, self.batch)


def _launch(launch: BoundLaunch, index, packed: Packed | None, block: int, heads: int, *tensors,
            longest_queries: bool = True) -> None:  # fmt: skip
    """Run a bound launch on its own grid, or for a varlen call on one over the call's longest query (or
    key) sequence in blocks, the heads and the sequences."""
    if packed is None:
        launch(index, *tensors)
        return
    longest = packed.max_seqlen_q if longest_queries else packed.max_seqlen_k
    launch(index, *tensors, grid=(ceil_div(longest, block), heads, packed.cu_seqlens_q.shape[0] - 1))


class PreciseDelta:
    """The switch: whether fp16/bf16 backwards sum Delta = sum_j P_ij dP_ij in the dQ kernel's extra pass
    (backward.py: backward_dq_kernel, DELTA_IN_DQ) instead of taking dO . O from the preprocess, as
    float32 inputs and a gradient of the LSE always do. dO . O reads O rounded to the input dtype, so
    a row's dS sums to dO . (O - O rounded) instead of 0; sm_scale times that times the row's mean key
    is noise in dq (and dk) that eager attention does not have, and where the true dq is 0 (a query
    row whose keys tie) it is all of dq (a pinned GPU fuzz failure, fuzz/test_accuracy.py). On: correct
    in every such row, at the cost of the pass (two more matmuls per tile in the dQ kernel). Off: the
    FlashAttention-style backward, faster, with that noise."""

    enabled: bool = os.environ.get("CORE_PRECISE_DELTA", "1") == "1"


class PersistentForward:
    """The switch: whether dense (not packed) forwards run attention_forward_persistent_kernel, a few
    programs per SM walking the tiles (config.PERSISTENT_PROGRAMS_PER_SM), instead of one program per
    tile (CORE_PORTABLE_PERSISTENT=1). The same bits either way; off until it measures faster
    (docs/perf-notes.md)."""

    enabled: bool = os.environ.get("CORE_PORTABLE_PERSISTENT", "0") == "1"


def persistent_programs(device: torch.device, interpreted: bool) -> int:
    """The persistent forward's grid, before capping at the call's tiles: PERSISTENT_PROGRAMS_PER_SM on
    each SM; INTERPRETER_PERSISTENT_PROGRAMS under the interpreter (and off a GPU, where nothing runs)."""
    sms = None if interpreted else multiprocessors(device)
    if sms is None:
        return _config.INTERPRETER_PERSISTENT_PROGRAMS
    return sms * _config.PERSISTENT_PROGRAMS_PER_SM


def delta_from_keys(dtype: torch.dtype, has_dlse: bool) -> bool:
    """Whether the backward sums Delta from the call's own keys (sum_j P dP / sum_j P, the dQ kernel's
    pass) rather than dO . O: then a call over some of a row's keys (a context-parallel block) gets
    that block's Delta, not the row's (core.distributed.ring corrects it)."""
    return dtype == torch.float32 or has_dlse or PreciseDelta.enabled


def padded_stat_rows(total_queries: int, sequences: int) -> int:
    """Rows of each head in the padded copy of a packed call's row statistics: where
    backward.py's _padded_stat_rows places the last of `sequences` sequences of `total_queries` rows
    in all, it ends by this many. From the shapes alone, so the host reads no sequence length."""
    return STATS_ROW_PAD.value * (sequences + total_queries // STATS_ROW_PAD.value)


def whole_query_blocks(n_queries: int, block_m: int) -> bool:
    """Whether a dense call's query blocks are all whole (Nq a multiple of BLOCK_M): then the dK/dV
    kernel loads Q and dO without masks (backward.py: WHOLE_QUERY_BLOCKS; its rows' statistics come
    whole and aligned from the padded copy at any Nq), and the fused backward its rows' LSE and Delta
    in place too (fused_backward.py)."""
    return n_queries > 0 and n_queries % block_m == 0


def descriptors_pay_off(resident_rows: int, resident_block: int) -> bool:
    """Whether a problem is big enough for descriptor loads: the rows a program keeps (queries in the
    forward and dQ kernels, keys in the dK/dV kernel) fill at least one tile. Below that every program
    is short and bound by memory or by the launch, and descriptors only cost: building them takes device
    time, and their scratch memory host time, on every launch (docs/perf-notes.md, "Host overhead"). A
    varlen plan, which knows only the packed totals, judges by those."""
    return resident_rows >= resident_block


def _use_descriptors(config: _config.KernelConfig, fills_a_tile: bool, *tensors: torch.Tensor) -> bool:
    """Tensor descriptors where the table asks for them, the problem is big enough
    (descriptors_pay_off) and the layout allows (descriptors_fit). The scratch memory the compiled
    kernels build them in comes from core's allocator unless the caller set one: plans that use them
    call install_scratch_allocator before each launch."""
    return config.descriptors and fills_a_tile and descriptors_fit(*tensors)


def _prepare_launch(q: torch.Tensor):
    interpreted = is_interpreted()
    if interpreted:
        patch_interpreter()
    return interpreted, _config.padded_head_dim(q.shape[-1])


class ForwardPlan(OnDevice):
    """The forward of one call signature. `plan(q, k, v)` returns (out, lse, lse_low): out like q; lse
    (B, Hq, Nq) float32 contiguous, the log-sum-exp of the scaled scores in the kernels' base
    (`uses_base_2`: natural LSE = lse * ln 2 in base 2); lse_low its low parts for the backward,
    (1, B, Hq, Nq) for fp16/bf16 and (2, B, Hq, Nq) for float32, whose second plane is the row max's
    low part (forward.py). A varlen plan takes packed (total, H, D) inputs and each call's Packed
    sequences, `plan(q, k, v, packed=...)`, and its lse is (Hq, total_q) (low parts (1 or 2, Hq, total_q)).

    With keep_statistics False the caller wants only out (no autograd, no LSE): the kernel's LSE and
    low parts then go to one throwaway buffer, which saves an allocation (a visible part of a small
    call's host time); both come back as None.

    Valid for inputs with the shapes, strides, dtypes, device and 16-byte alignment of the ones it was
    built from (core._plans keys on exactly these)."""

    def __init__(
        self, q, k, v, causal: bool, sm_scale: float, config: _config.KernelConfig | None = None,
        features: Features = PLAIN,
    ):  # fmt: skip
        super().__init__(q)
        call = _Call(q, k, causal, sm_scale, features)
        interpreted, block_d = _prepare_launch(q)
        config = config or _config.forward_config(block_d, q.dtype, interpreted)
        self.causal, self.sm_scale, self.features = causal, sm_scale, features
        self.lse_shape, self.low_shape = call.lse_shape, call.low_shape
        self.q_heads, self.block_m = call.q_heads, config.block_m
        self.descriptors = _use_descriptors(config, descriptors_pay_off(call.n_queries, config.block_m), k, v)
        self.needs_scratch = self.descriptors and not interpreted
        kernel, grid = attention_forward_kernel, call.grid(config.block_m, call.q_heads, call.n_queries)
        trailing_tensors, extra = call.trailing
        self.persistent = PersistentForward.enabled and not call.varlen
        if self.persistent:
            tiles = ceil_div(call.n_queries, config.block_m) * call.q_heads * call.batch
            programs = min(tiles, persistent_programs(q.device, interpreted))
            kernel, grid, extra = (
                attention_forward_persistent_kernel,
                (max(programs, 1),),
                (*extra, call.batch),
            )
        self.launch = BoundLaunch(
            kernel, grid,
            (*kernel_strides(q), *kernel_strides(k), *kernel_strides(v), *_kernel_strides_of_new_buffer(q),
             call.q_heads, call.q_heads // call.kv_heads, call.n_queries, call.n_keys),
            (score_scale(q.dtype, sm_scale),),
            *call.meta(block_d, config, q.dtype, interpreted, self.descriptors),
            trailing_tensors, extra,
        )  # fmt: skip
        self.backward_plans: dict[tuple, BackwardPlan] = {}

    def __call__(self, q, k, v, keep_statistics: bool = True, packed: Packed | None = None):
        return self.on_device(self._run, q, k, v, keep_statistics, packed)

    def _run(self, q, k, v, keep_statistics, packed):
        if self.needs_scratch:
            install_scratch_allocator()
        out = new_buffer(q)
        if not keep_statistics:
            # The kernel writes the rows' LSE and their low parts into this one buffer (the same
            # addresses, so it ends up holding one or the other), and nothing reads it.
            discarded = new_buffer(q, self.low_shape)
            sequences = (discarded, discarded) if packed is None else packed[:2]
            _launch(
                self.launch, self.index, packed, self.block_m, self.q_heads, q, k, v, out, discarded,
                discarded, *sequences,
            )  # fmt: skip
            return out, None, None
        lse = new_buffer(q, self.lse_shape)
        lse_low = new_buffer(q, self.low_shape)
        sequences = (lse, lse) if packed is None else packed[:2]
        _launch(
            self.launch, self.index, packed, self.block_m, self.q_heads, q, k, v, out, lse, lse_low,
            *sequences,
        )  # fmt: skip
        return out, lse, lse_low

    def backward_plan(self, dout, dlse, q, k, v, deterministic: bool = True):
        """The backward for this forward's inputs and a dO of dout's layout (and a dLSE or none): the
        split backward, or the fused one where its switch is on (fused_plans.py). Both are deterministic
        whatever `deterministic` says: neither has an unordered sum."""
        from core.kernels.portable import fused_plans  # it builds on this module

        fused = (
            fused_plans.FusedBackward.enabled
            and self.features == PLAIN
            and fused_plans.supports(q, k, v, dout, self.causal)
        )
        key = (dout.stride(), dout.dtype, dout.data_ptr() & 15, dlse is None, fused)
        plan = self.backward_plans.get(key)
        if plan is None:
            if len(self.backward_plans) >= 64:
                self.backward_plans.clear()
            if fused:
                plan = fused_plans.FusedBackwardPlan(dout, dlse, q, k, v, self.causal, self.sm_scale)
            else:
                plan = BackwardPlan(dout, dlse, q, k, v, self.causal, self.sm_scale, self.features)
            self.backward_plans[key] = plan
        return plan


class BackwardPlan(OnDevice):
    """The backward of one call signature and dO layout. `plan(dout, dlse, q, k, v, out, lse, lse_low)`
    returns (dq, dk, dv), each laid out like its input. lse is the forward's LSE (in the kernels' base)
    and dlse its gradient (contiguous float32), or None when the LSE was not used; lse_low is the
    forward's. A varlen plan takes the call's Packed sequences too (packed=...)."""

    def __init__(self, dout, dlse, q, k, v, causal: bool, sm_scale: float, features: Features = PLAIN):
        super().__init__(q)
        call = _Call(q, k, causal, sm_scale, features)
        q_heads, kv_heads, n_queries, n_keys = call.q_heads, call.kv_heads, call.n_queries, call.n_keys
        interpreted, block_d = _prepare_launch(q)
        dkdv_config, dq_config = _config.backward_configs(block_d, q.dtype, interpreted)
        dot_precision, base_2, _ = _precision_flags(q.dtype, interpreted)
        q_layout = _kernel_strides_of_new_buffer(q)  # the forward's output and dq are laid out like this

        # float32 saves Delta in two parts (backward.py: backward_dq_kernel), like the LSE's low parts.
        # The preprocess writes them to the padded copy of the row statistics, which holds every plane
        # the dQ and dK/dV kernels read: the LSE, its low parts, Delta's parts (in this order).
        # A dense call's copy: each (batch, head)'s rows rounded up (backward.py: _padded_stat_rows).
        self.padded_rows = ceil_div(n_queries, STATS_ROW_PAD.value) * STATS_ROW_PAD.value
        self.batch = call.batch
        self.low_planes = call.low_shape[0]
        # The dQ kernel sums Delta from P and dP for float32, for a gradient of the LSE in any dtype, and
        # for fp16/bf16 while PreciseDelta is on.
        delta_in_dq = ("DELTA_IN_DQ", delta_from_keys(q.dtype, dlse is not None))
        rows_per_program = _config.preprocess_block_m(interpreted)
        # The preprocess pads the padded copy's last block of each sequence to its own block: every block
        # the dK/dV kernel reads lies in one it writes.
        assert rows_per_program % dkdv_config.block_m == 0
        self.blocks = (rows_per_program, dq_config.block_m, dkdv_config.block_n)
        self.heads = (q_heads, kv_heads)
        self.preprocess = BoundLaunch(
            backward_preprocess_kernel,
            call.grid(rows_per_program, q_heads, n_queries),
            (*q_layout, *kernel_strides(dout), q_heads, n_queries),
            (),
            (("HEAD_DIM", call.head_dim), ("HAS_DLSE", dlse is not None), base_2, dot_precision,
             ("BLOCK_M", rows_per_program), ("BLOCK_D", block_d), delta_in_dq, ("VARLEN", call.varlen),
             ("PADDED_STATS", True)),
            (),
            trailing_tensors=5,
        )  # fmt: skip

        sizes = (q_heads, q_heads // kv_heads, n_queries, n_keys)
        scales = (sm_scale, score_scale(q.dtype, sm_scale))
        input_strides = (*kernel_strides(q), *kernel_strides(k), *kernel_strides(v), *kernel_strides(dout))
        dq_descriptors = _use_descriptors(dq_config, descriptors_pay_off(n_queries, dq_config.block_m), k, v)
        dkdv_descriptors = _use_descriptors(
            dkdv_config, descriptors_pay_off(n_keys, dkdv_config.block_n), q, dout
        )
        self.needs_scratch = (dq_descriptors or dkdv_descriptors) and not interpreted
        dq_constexprs, dq_options = call.meta(block_d, dq_config, q.dtype, interpreted, dq_descriptors)
        self.dq = BoundLaunch(
            backward_dq_kernel,
            call.grid(dq_config.block_m, q_heads, n_queries),
            (*input_strides, *q_layout, *sizes),
            scales,
            (*dq_constexprs, delta_in_dq),
            dq_options,
            *call.trailing,
        )  # fmt: skip
        dkdv_constexprs, dkdv_options = call.meta(
            block_d, dkdv_config, q.dtype, interpreted, dkdv_descriptors
        )
        # Q and dO load unmasked where every query block is whole (a packed sequence ends anywhere).
        whole = not call.varlen and whole_query_blocks(n_queries, dkdv_config.block_m)
        self.dkdv = BoundLaunch(
            backward_dkdv_kernel,
            call.grid(dkdv_config.block_n, kv_heads, n_keys),
            (*input_strides, *_kernel_strides_of_new_buffer(k), *_kernel_strides_of_new_buffer(v), *sizes),
            scales,
            (
                *dkdv_constexprs,
                ("PREFETCH_ROW_STATS", dkdv_config.prefetch_row_stats),
                ("WHOLE_QUERY_BLOCKS", whole),
            ),
            dkdv_options,
            *call.trailing,
        )  # fmt: skip

    def __call__(self, dout, dlse, q, k, v, out, lse, lse_low, packed: Packed | None = None):
        return self.on_device(self._run, dout, dlse, q, k, v, out, lse, lse_low, packed)

    def _run(self, dout, dlse, q, k, v, out, lse, lse_low, packed):
        if self.needs_scratch:
            install_scratch_allocator()
        (_, dq_rows, dkdv_keys), (q_heads, kv_heads) = self.blocks, self.heads
        row_lse, row_lse_low, delta = self.row_statistics(dout, dlse, q, out, lse, lse_low, packed)
        cu_q, cu_k = (delta, delta) if packed is None else packed[:2]
        dq, dk, dv = new_buffer(q), new_buffer(k), new_buffer(v)
        # dQ first: it may complete Delta, which the dK/dV kernel reads (backward.py, DELTA_IN_DQ).
        _launch(
            self.dq, self.index, packed, dq_rows, q_heads, q, k, v, dout, row_lse, row_lse_low, delta, dq,
            cu_q, cu_k,
        )  # fmt: skip
        _launch(
            self.dkdv, self.index, packed, dkdv_keys, kv_heads, q, k, v, dout, row_lse, row_lse_low, delta,
            dk, dv, cu_q, cu_k, longest_queries=False,
        )  # fmt: skip
        return dq, dk, dv

    def row_statistics(self, dout, dlse, q, out, lse, lse_low, packed: Packed | None = None):
        """The preprocess: (lse, lse_low, delta) of a new padded copy of the row statistics, the only ones
        the dQ and dK/dV kernels read (backward.py, PADDED_STATS), with Delta as far as the preprocess
        computes it (the dQ kernel may complete it: DELTA_IN_DQ)."""
        preprocess_rows, q_heads = self.blocks[0], self.heads[0]
        if packed is None:
            rows = (self.batch, q_heads, self.padded_rows)
        else:
            rows = (q_heads, padded_stat_rows(q.shape[0], packed.cu_seqlens_q.shape[0] - 1))
        stats = new_buffer(q, (1 + 2 * self.low_planes, *rows))
        low_end = 1 + self.low_planes
        row_lse, row_lse_low, delta = stats[0], stats[1:low_end], stats[low_end:]
        cu_q = delta if packed is None else packed.cu_seqlens_q
        _launch(
            self.preprocess, self.index, packed, preprocess_rows, q_heads, out, dout, _or_unused(dlse, lse),
            delta, cu_q, lse, lse_low, row_lse, row_lse_low,
        )  # fmt: skip
        return row_lse, row_lse_low, delta
