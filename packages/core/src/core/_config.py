"""Tile shapes and launch parameters for the kernels, chosen per problem.

One small table instead of autotuning at call time: a lookup costs nanoseconds, keeps the call
capturable in a CUDA graph, and makes every run reproducible. The interpreter gets 16 x 16 tiles so that
even the small CPU test shapes cross several block boundaries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    """BLOCK_M query rows x BLOCK_N keys per tile; num_warps/num_stages as in triton.Config."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


INTERPRETER = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)


def padded_head_dim(head_dim: int) -> int:
    """The head dim the tiles use: a power of two >= 16 (tl.dot's minimum); the rest is masked."""
    return max(16, 1 << (head_dim - 1).bit_length())  # triton.next_power_of_2, without its wrapper


@functools.cache  # called per launch: one lookup instead of building a config
def forward_config(block_d: int, dtype: torch.dtype, interpreted: bool) -> KernelConfig:
    if interpreted:
        return INTERPRETER
    if dtype == torch.float32:  # full-precision fp32 dots: no tensor cores, keep tiles small
        return (
            KernelConfig(64, 32, num_warps=4, num_stages=2) if block_d <= 128 else KernelConfig(32, 32, 4, 1)
        )
    # Measured on an H100 (bf16, causal, N 4k and 16k; docs/perf-notes.md): the fourth stage buys
    # ~6% at D=64 and 8 warps ~3x at D=128, where 4 warps spill the 128 x 128 fp32 accumulator.
    if block_d <= 64:
        return KernelConfig(128, 64, num_warps=4, num_stages=4)
    if block_d <= 128:
        return KernelConfig(128, 64, num_warps=8, num_stages=3)
    # D=256 (H100 sweep, bf16 causal N 4k/16k): 128 x 64 with 8 warps 351/450 TFLOP/s, 64 x 64 with 4 warps
    # 199/240; the longer query tile halves the K/V traffic per flop.
    return KernelConfig(128, 64, num_warps=8, num_stages=2)


@functools.cache
def backward_configs(
    block_d: int, dtype: torch.dtype, interpreted: bool
) -> tuple[KernelConfig, KernelConfig]:
    """(config of the dK/dV kernel, config of the dQ kernel).

    The dK/dV kernel holds BLOCK_N keys and streams queries; the dQ kernel holds BLOCK_M queries and
    streams keys, so each wants its resident side long and its streamed side short.
    """
    if interpreted:
        return INTERPRETER, INTERPRETER
    if dtype == torch.float32:
        small = KernelConfig(32, 32, num_warps=4, num_stages=1)
        return small, small
    # H100 sweep (docs/perf-notes.md): at D=64 two stages beat three for dK/dV (+10%); at D=128 the
    # wide 64 x 128 tiles with 8 warps win for both kernels (+10% each over 32 x 64 / 64 x 32).
    if block_d <= 64:
        return KernelConfig(32, 128, 4, 2), KernelConfig(128, 32, 4, 3)
    if block_d <= 128:
        return KernelConfig(64, 128, 8, 3), KernelConfig(128, 64, 8, 3)
    # D=256 (bf16 causal, N 1k/16k): dK/dV 64 x 64 with 8 warps and 2 stages, backward 119/180 TFLOP/s against
    # 35/36 with 16 x 64 and 4 warps, whose 16-query tiles starve the tensor cores; then dQ 128 x 32 with 8
    # warps and 3 stages 139/205 against 120/183 for 64 x 16.
    return KernelConfig(64, 64, 8, 2), KernelConfig(128, 32, 8, 3)


def preprocess_block_m(interpreted: bool) -> int:
    """Query rows per program of the Delta = rowsum(dO * O) pass (memory-bound; wide rows are fine)."""
    return INTERPRETER.block_m if interpreted else 64
