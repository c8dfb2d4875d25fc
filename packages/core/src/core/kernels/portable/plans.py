"""The portable family's host side: allocate outputs, pick tile shapes, launch the kernels. No
validation here (core._validation runs first) and no copies of the inputs: every kernel takes strides.

The work is split in two so that a repeated call does only the second half:

- a plan (`ForwardPlan`, `BackwardPlan`) holds everything that follows from the inputs' shapes,
  strides, dtypes, alignment and the options: tile shapes, grids, every integer argument, whether the
  layout allows tensor descriptors, one bound launch per kernel (core.kernels.launch.BoundLaunch);
- calling the plan allocates the outputs and launches.

core._plans keeps the forward plans of validated call signatures, and each forward plan keeps its
backward plans.
"""

from __future__ import annotations

import functools

import torch

from core._runtime import install_scratch_allocator, is_interpreted, patch_interpreter
from core.kernels.host import OnDevice, ceil_div, layout_of_new_buffer, new_buffer, score_scale, uses_base_2
from core.kernels.launch import BoundLaunch
from core.kernels.portable import config as _config
from core.kernels.portable.backward import (
    backward_dkdv_kernel,
    backward_dq_kernel,
    backward_preprocess_kernel,
)
from core.kernels.portable.forward import attention_forward_kernel


def _or_unused(optional: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel never reads (dLSE when the LSE was not used) still needs a tensor."""
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


def descriptors_fit(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may read these (B, H, N, D) tensors through tensor descriptors (the copy
    engine, TMA): unit stride along D, and 16-byte aligned start, batch, head and row steps, with rows
    that do not overlap. Any other layout is read with pointer loads, which take every stride."""
    for t in tensors:
        size = t.element_size()
        batch_stride, head_stride, row_stride, d_stride = t.stride()
        if d_stride != 1 or t.data_ptr() % 16 or (t.shape[-1] * size) % 16 or row_stride < t.shape[-1]:
            return False
        if (batch_stride * size) % 16 or (head_stride * size) % 16 or (row_stride * size) % 16:
            return False
    return True


@functools.cache
def _attention_meta(
    head_dim: int, causal: bool, block_d: int, config, dtype, interpreted: bool, descriptors: bool
):
    """(constexprs, options) of the forward, dK/dV and dQ kernels, which share their constexpr list (the
    dK/dV and dQ kernels' end with one more each), in signature order (a bound launch passes
    constexprs by position). Cached: built once per shape."""
    constexprs = (
        ("HEAD_DIM", head_dim), ("CAUSAL", causal),
        ("BLOCK_M", config.block_m), ("BLOCK_N", config.block_n), ("BLOCK_D", block_d),
        *_precision_flags(dtype, interpreted),
        ("TENSOR_DESCRIPTORS", descriptors),
    )  # fmt: skip
    return constexprs, (("num_warps", config.num_warps), ("num_stages", config.num_stages))


def whole_query_blocks(n_queries: int, block_m: int) -> bool:
    """Whether the dK/dV kernel's query blocks are all whole (Nq a multiple of BLOCK_M): then it loads
    the rows' LSE and Delta without masks, as aligned vectors (backward.py: _whole_block_offsets).
    One more compiled variant per shape class, for a third fewer instructions in its loop at D=128."""
    return n_queries > 0 and n_queries % block_m == 0


def descriptors_pay_off(resident_rows: int, resident_block: int) -> bool:
    """Whether a problem is big enough for descriptor loads: the rows a program keeps (queries in the
    forward and dQ kernels, keys in the dK/dV kernel) fill at least one tile. Below that every program
    is short and bound by memory or by the launch, and descriptors only cost: building them takes device
    time, and their scratch memory host time, on every launch (docs/perf-notes.md, "Host overhead")."""
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
    low part (forward.py).

    With keep_statistics False the caller wants only out (no autograd, no LSE): the kernel's LSE and
    low parts then go to one throwaway buffer, which saves an allocation (a visible part of a small
    call's host time); both come back as None.

    Valid for inputs with the shapes, strides, dtypes, device and 16-byte alignment of the ones it was
    built from (core._plans keys on exactly these)."""

    def __init__(self, q, k, v, causal: bool, sm_scale: float, config: _config.KernelConfig | None = None):
        super().__init__(q)
        batch, q_heads, n_queries, head_dim = q.shape
        kv_heads, n_keys = k.shape[1], k.shape[2]
        interpreted, block_d = _prepare_launch(q)
        config = config or _config.forward_config(block_d, q.dtype, interpreted)
        self.causal, self.sm_scale = causal, sm_scale
        self.lse_shape = (batch, q_heads, n_queries)
        self.low_shape = (2 if q.dtype == torch.float32 else 1, *self.lse_shape)
        self.descriptors = _use_descriptors(config, descriptors_pay_off(n_queries, config.block_m), k, v)
        self.needs_scratch = self.descriptors and not interpreted
        self.launch = BoundLaunch(
            attention_forward_kernel,
            (ceil_div(n_queries, config.block_m), q_heads, batch),
            (*q.stride(), *k.stride(), *v.stride(), *layout_of_new_buffer(q), q_heads, q_heads // kv_heads,
             n_queries, n_keys),
            (score_scale(q.dtype, sm_scale),),
            *_attention_meta(head_dim, causal, block_d, config, q.dtype, interpreted, self.descriptors),
        )  # fmt: skip
        self.backward_plans: dict[tuple, BackwardPlan] = {}

    def __call__(self, q, k, v, keep_statistics: bool = True):
        return self.on_device(self._run, q, k, v, keep_statistics)

    def _run(self, q, k, v, keep_statistics):
        if self.needs_scratch:
            install_scratch_allocator()
        out = new_buffer(q)
        if not keep_statistics:
            # The kernel writes the rows' LSE and their low parts into this one buffer (the same
            # addresses, so it ends up holding one or the other), and nothing reads it.
            discarded = new_buffer(q, self.low_shape)
            self.launch(self.index, q, k, v, out, discarded, discarded)
            return out, None, None
        lse = new_buffer(q, self.lse_shape)
        lse_low = new_buffer(q, self.low_shape)
        self.launch(self.index, q, k, v, out, lse, lse_low)
        return out, lse, lse_low

    def backward_plan(self, dout, dlse, q, k, v):
        """The backward for this forward's inputs and a dO of dout's layout (and a dLSE or none): the
        split backward, or the fused one where its switch is on (fused_plans.py)."""
        from core.kernels.portable import fused_plans  # it builds on this module

        fused = fused_plans.FusedBackward.enabled and fused_plans.supports(q, k, v, dout, self.causal)
        key = (dout.stride(), dout.dtype, dout.data_ptr() & 15, dlse is None, fused)
        plan = self.backward_plans.get(key)
        if plan is None:
            if len(self.backward_plans) >= 64:
                self.backward_plans.clear()
            kind = fused_plans.FusedBackwardPlan if fused else BackwardPlan
            plan = self.backward_plans[key] = kind(dout, dlse, q, k, v, self.causal, self.sm_scale)
        return plan


class BackwardPlan(OnDevice):
    """The backward of one call signature and dO layout. `plan(dout, dlse, q, k, v, out, lse, lse_low)`
    returns (dq, dk, dv), each laid out like its input. lse is the forward's LSE (in the kernels' base)
    and dlse its gradient (contiguous float32), or None when the LSE was not used; lse_low is the
    forward's."""

    def __init__(self, dout, dlse, q, k, v, causal: bool, sm_scale: float):
        super().__init__(q)
        batch, q_heads, n_queries, head_dim = q.shape
        kv_heads, n_keys = k.shape[1], k.shape[2]
        interpreted, block_d = _prepare_launch(q)
        dkdv_config, dq_config = _config.backward_configs(block_d, q.dtype, interpreted)
        dot_precision, base_2, _ = _precision_flags(q.dtype, interpreted)
        q_layout = layout_of_new_buffer(q)  # the forward's output and dq are laid out like this

        # float32 saves Delta in two parts (backward.py: backward_dq_kernel), like the LSE's low parts.
        self.delta_shape = (2 if q.dtype == torch.float32 else 1, batch, q_heads, n_queries)
        # The dQ kernel sums Delta from P and dP for float32, and for a gradient of the LSE in any dtype.
        delta_in_dq = ("DELTA_IN_DQ", q.dtype == torch.float32 or dlse is not None)
        rows_per_program = _config.preprocess_block_m(interpreted)
        self.preprocess = BoundLaunch(
            backward_preprocess_kernel,
            (ceil_div(n_queries, rows_per_program), q_heads, batch),
            (*q_layout, *dout.stride(), q_heads, n_queries),
            (),
            (("HEAD_DIM", head_dim), ("HAS_DLSE", dlse is not None), base_2, dot_precision,
             ("BLOCK_M", rows_per_program), ("BLOCK_D", block_d), delta_in_dq),
            (),
        )  # fmt: skip

        sizes = (q_heads, q_heads // kv_heads, n_queries, n_keys)
        scales = (sm_scale, score_scale(q.dtype, sm_scale))
        input_strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
        dq_descriptors = _use_descriptors(dq_config, descriptors_pay_off(n_queries, dq_config.block_m), k, v)
        dkdv_descriptors = _use_descriptors(
            dkdv_config, descriptors_pay_off(n_keys, dkdv_config.block_n), q, dout
        )
        self.needs_scratch = (dq_descriptors or dkdv_descriptors) and not interpreted
        dq_constexprs, dq_options = _attention_meta(
            head_dim, causal, block_d, dq_config, q.dtype, interpreted, dq_descriptors
        )
        self.dq = BoundLaunch(
            backward_dq_kernel,
            (ceil_div(n_queries, dq_config.block_m), q_heads, batch),
            (*input_strides, *q_layout, *sizes),
            scales,
            (*dq_constexprs, delta_in_dq),
            dq_options,
        )  # fmt: skip
        dkdv_constexprs, dkdv_options = _attention_meta(
            head_dim, causal, block_d, dkdv_config, q.dtype, interpreted, dkdv_descriptors
        )
        self.dkdv = BoundLaunch(
            backward_dkdv_kernel,
            (ceil_div(n_keys, dkdv_config.block_n), kv_heads, batch),
            (*input_strides, *layout_of_new_buffer(k), *layout_of_new_buffer(v), *sizes),
            scales,
            (
                *dkdv_constexprs,
                ("PREFETCH_ROW_STATS", dkdv_config.prefetch_row_stats),
                ("WHOLE_QUERY_BLOCKS", whole_query_blocks(n_queries, dkdv_config.block_m)),
            ),
            dkdv_options,
        )  # fmt: skip

    def __call__(self, dout, dlse, q, k, v, out, lse, lse_low):
        return self.on_device(self._run, dout, dlse, q, k, v, out, lse, lse_low)

    def _run(self, dout, dlse, q, k, v, out, lse, lse_low):
        if self.needs_scratch:
            install_scratch_allocator()
        delta = new_buffer(q, self.delta_shape)
        self.preprocess(self.index, out, dout, _or_unused(dlse, lse), delta)
        dq, dk, dv = new_buffer(q), new_buffer(k), new_buffer(v)
        # dQ first: it may complete Delta, which the dK/dV kernel reads (backward.py, DELTA_IN_DQ).
        self.dq(self.index, q, k, v, dout, lse, lse_low, delta, dq)
        self.dkdv(self.index, q, k, v, dout, lse, lse_low, delta, dk, dv)
        return dq, dk, dv
