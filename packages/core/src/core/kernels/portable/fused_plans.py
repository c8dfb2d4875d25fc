"""The fused backward (fused_backward.py: one kernel for dK, dV and dQ, five matmuls per tile pair, dQ
summed in float32 in key block order by default) behind a switch: off by default, since it measures
slower than the split backward (docs/perf-notes.md); `core.testing.fused_backward(True)` or
CORE_FUSED_BACKWARD=1 turns it on for the fp16/bf16 calls it supports.

Host side: tiles, grids, scratch buffers and the bound launches, built once per call signature like
plans.BackwardPlan (whose preprocess kernel computes Delta here too)."""

from __future__ import annotations

import functools
import os

import torch

from core._runtime import install_scratch_allocator, is_interpreted
from core.kernels.host import OnDevice, ceil_div, layout_of_new_buffer, new_buffer, score_scale
from core.kernels.launch import BoundLaunch
from core.kernels.portable import config as _config
from core.kernels.portable.backward import backward_preprocess_kernel
from core.kernels.portable.fused_backward import (
    delta_from_p_and_dp_kernel,
    dq_from_accumulator_kernel,
    fused_backward_kernel,
)
from core.kernels.portable.plans import (
    _attention_meta,
    _or_unused,
    _precision_flags,
    _prepare_launch,
    _use_descriptors,
    delta_from_keys,
    descriptors_pay_off,
    whole_query_blocks,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
MAX_PROGRAMS = 2**31 - 1  # one grid axis


class FusedBackward:
    """The switch: whether fp16/bf16 calls that `supports` takes use the fused backward."""

    enabled: bool = os.environ.get("CORE_FUSED_BACKWARD", "0") == "1"


# The interpreter's 16 x 16 tiles (config.py) cross several query and key blocks at the CPU tests'
# small shapes, so turns are taken and passed on there too.
INTERPRETER = _config.INTERPRETER_DESCRIPTORS


def _plain(meta):
    """The split kernels' (constexprs, options) without the feature flags (WINDOW, SOFTCAP, VARLEN),
    which the fused kernels do not take: they run plain attention only."""
    constexprs, options = meta
    return tuple((name, value) for name, value in constexprs if name not in _FEATURE_FLAGS), options


_FEATURE_FLAGS = ("WINDOW", "SOFTCAP", "VARLEN")


@functools.cache
def fused_config(block_d: int, interpreted: bool) -> _config.KernelConfig:
    """BLOCK_M query rows x BLOCK_N keys per step. A program holds its keys' dK and dV (BLOCK_N x BLOCK_D,
    float32) for its whole life, so BLOCK_N is the long side, as in today's dK/dV kernel; each step's dQ
    part is BLOCK_M x BLOCK_D, and its adds per flop fall as BLOCK_N grows. Not tuned yet: at D = 128
    these tiles spill (benchmarks/kernel_report.py's compile), and fused_bwd_check.py --sweep times
    the alternatives."""
    if interpreted:
        return INTERPRETER
    return _config.KernelConfig(64, 128, num_warps=8, num_stages=2, descriptors=True)


class FusedBackwardPlan(OnDevice):
    """The fused backward of one call signature and dO layout .
    `plan(dout, dlse, q, k, v, out, lse, lse_low)` returns (dq, dk, dv) as plans.BackwardPlan does.
    `config` overrides the tile table (benchmarks)."""

    def __init__(self, dout, dlse, q, k, v, causal: bool, sm_scale: float, deterministic: bool = True,
                 config: _config.KernelConfig | None = None):  # fmt: skip
        super().__init__(q)
        batch, q_heads, n_queries, head_dim = q.shape
        kv_heads, n_keys = k.shape[1], k.shape[2]
        interpreted, block_d = _prepare_launch(q)
        config = config or fused_config(block_d, interpreted)
        q_layout = layout_of_new_buffer(q)  # dq's, and the forward's output's
        self.deterministic = deterministic
        n_query_blocks = ceil_div(n_queries, config.block_m)
        self.accumulator_shape = (batch, q_heads, n_query_blocks * config.block_m, block_d)
        self.turns_shape = (batch, q_heads, n_query_blocks)

        self.delta = DeltaPlan(dout, dlse, q, k, v, causal, sm_scale)
        input_strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
        scales = (sm_scale, score_scale(q.dtype, sm_scale))

        descriptors = _use_descriptors(config, descriptors_pay_off(n_keys, config.block_n), q, dout)
        self.needs_scratch = descriptors and not interpreted
        constexprs, options = _plain(
            _attention_meta(head_dim, causal, block_d, config, q.dtype, interpreted, descriptors)
        )
        self.fused = BoundLaunch(
            fused_backward_kernel,
            # Key blocks slowest, kv heads fastest: the dispatch order that makes waiting safe (_kernel).
            (ceil_div(n_keys, config.block_n) * batch * kv_heads, 1, 1),
            (*input_strides, *q_layout, *layout_of_new_buffer(k), *layout_of_new_buffer(v), batch, q_heads,
             kv_heads, n_queries, n_keys),
            scales,
            (*constexprs, ("WHOLE_QUERY_BLOCKS", whole_query_blocks(n_queries, config.block_m)),
             ("DETERMINISTIC", deterministic)),
            options,
        )  # fmt: skip
        self.dq_from_accumulator = None
        if not deterministic:
            self.dq_from_accumulator = BoundLaunch(
                dq_from_accumulator_kernel,
                (n_query_blocks, q_heads, batch),
                (*q_layout, q_heads, n_queries),
                (sm_scale,),
                (("HEAD_DIM", head_dim), ("BLOCK_M", config.block_m), ("BLOCK_D", block_d)),
                (),
            )  # fmt: skip

    def __call__(self, dout, dlse, q, k, v, out, lse, lse_low):
        return self.on_device(self._run, dout, dlse, q, k, v, out, lse, lse_low)

    def _run(self, dout, dlse, q, k, v, out, lse, lse_low):
        if self.needs_scratch:
            install_scratch_allocator()
        delta = self.delta(self.index, dout, dlse, q, k, v, out, lse, lse_low)
        dq, dk, dv = new_buffer(q), new_buffer(k), new_buffer(v)
        if self.deterministic:
            # Key block 0 stores into the accumulator before anyone adds: no zero fill.
            accumulator = new_buffer(q, self.accumulator_shape)
            turns = torch.zeros(self.turns_shape, dtype=torch.int32, device=q.device)
        else:
            accumulator = torch.zeros(self.accumulator_shape, dtype=torch.float32, device=q.device)
            turns = lse  # not read without turns
        self.fused(self.index, q, k, v, dout, lse, lse_low, delta, accumulator, turns, dq, dk, dv)
        if self.dq_from_accumulator is not None:
            self.dq_from_accumulator(self.index, accumulator, dq)
        return dq, dk, dv


class DeltaPlan:
    """Every row's Delta before a fused backward starts: the preprocess (dO . O - dLSE; where
    plans.delta_from_keys, the -dLSE term alone) and then the pass that completes it from P and dP
    (delta_from_p_and_dp_kernel), two matmuls per tile pair, the split dQ kernel's sums. `two_parts`:
    Delta is (2, B, Hq, Nq), plane [1] its low part (the float64 sum's rounding error; 0 without the
    pass), for kernels that take dP - Delta as the split dQ kernel does (backward.py, LOW_DELTA);
    else (1, B, Hq, Nq). Without `with_pass` the preprocess's part only: a caller with a pass of its own
    (the Hopper family's) completes it; `from_keys` says whether it must.
    `plan(index, dout, dlse, q, k, v, out, lse, lse_low)` returns it."""

    def __init__(self, dout, dlse, q, k, v, causal: bool, sm_scale: float, two_parts: bool = False,
                 with_pass: bool = True):  # fmt: skip
        batch, q_heads, n_queries, head_dim = q.shape
        kv_heads, n_keys = k.shape[1], k.shape[2]
        interpreted, block_d = _prepare_launch(q)
        dot_precision, base_2, _ = _precision_flags(q.dtype, interpreted)
        self.shape = (2 if two_parts else 1, batch, q_heads, n_queries)
        has_dlse = dlse is not None
        self.from_keys = delta_from_keys(q.dtype, has_dlse)
        rows_per_program = _config.preprocess_block_m(interpreted)
        self.preprocess = BoundLaunch(
            backward_preprocess_kernel,
            (ceil_div(n_queries, rows_per_program), q_heads, batch),
            (*layout_of_new_buffer(q), *dout.stride(), q_heads, n_queries),
            (),
            (("HEAD_DIM", head_dim), ("HAS_DLSE", has_dlse), base_2, dot_precision,
             ("BLOCK_M", rows_per_program), ("BLOCK_D", block_d), ("DELTA_IN_DQ", self.from_keys),
             ("VARLEN", False), ("PADDED_STATS", False)),
            (),
            trailing_tensors=5,
        )  # fmt: skip
        self.delta_pass = None
        self.needs_scratch = False
        if self.from_keys and with_pass:
            # The split backward's dQ tiles, so that Delta comes out as the split backward's.
            config = _config.backward_configs(block_d, q.dtype, interpreted)[1]
            descriptors = _use_descriptors(config, descriptors_pay_off(n_queries, config.block_m), k, v)
            self.needs_scratch = descriptors and not interpreted
            constexprs, options = _plain(
                _attention_meta(head_dim, causal, block_d, config, q.dtype, interpreted, descriptors)
            )
            self.delta_pass = BoundLaunch(
                delta_from_p_and_dp_kernel,
                (ceil_div(n_queries, config.block_m), q_heads, batch),
                (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), q_heads, q_heads // kv_heads,
                 n_queries, n_keys),
                (score_scale(q.dtype, sm_scale),),
                (*constexprs, ("LOW_PLANE", two_parts)),
                options,
            )  # fmt: skip

    def __call__(self, index, dout, dlse, q, k, v, out, lse, lse_low):
        if self.needs_scratch:
            install_scratch_allocator()
        if self.shape[0] == 2 and not self.from_keys:
            delta = torch.zeros(self.shape, dtype=torch.float32, device=q.device)  # no low parts
        else:
            delta = new_buffer(q, self.shape)
        # delta stands in for cu_seqlens and the padded statistics' sources and planes (none here)
        self.preprocess(index, out, dout, _or_unused(dlse, lse), delta, *[delta] * 5)
        if self.delta_pass is not None:
            self.delta_pass(index, q, k, v, dout, lse, lse_low, delta)
        return delta


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, causal: bool) -> bool:
    """Whether the fused backward takes these (validated) inputs: fp16/bf16 throughout (float32 keeps the
    split backward, whose numerics it needs), head dim <= 128, on the device core's kernels were built
    for. Causal or not, any lengths, GQA and any strides are taken."""
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype == dout.dtype):
        return False
    if q.shape[-1] > MAX_HEAD_DIM:
        return False
    if q.device.type != ("cpu" if is_interpreted() else "cuda"):
        return False
    batch, kv_heads, n_keys = k.shape[0], k.shape[1], k.shape[2]
    block_n = fused_config(_config.padded_head_dim(q.shape[-1]), is_interpreted()).block_n
    return -(-n_keys // block_n) * batch * kv_heads <= MAX_PROGRAMS
