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
    """BLOCK_M query rows x BLOCK_N keys per tile; num_warps/num_stages as in triton.Config.

    descriptors: read the streamed tiles (K and V in the forward and dQ kernels, Q and dO in the dK/dV
    kernel) through tensor descriptors, i.e. Hopper's copy engine (TMA), wherever the inputs' layout
    allows it (plans.py: descriptors_fit); other layouts take pointer loads with the same tiles.
    prefetch_row_stats: the dK/dV kernel only: load each query block's LSE and Delta one step ahead
    (backward.py: _dkdv_from_query_blocks).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    descriptors: bool = False
    prefetch_row_stats: bool = False


# 16 x 16 tiles cross several block boundaries even at the CPU tests' small shapes. fp16/bf16 read
# through descriptors there too, as they do on the GPU, and their dK/dV kernel prefetches row statistics
# where the GPU's does (head dims up to 64), so the CPU tests run the same code paths.
INTERPRETER = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
INTERPRETER_DESCRIPTORS = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1, descriptors=True)
INTERPRETER_PREFETCH = KernelConfig(
    16, 16, num_warps=1, num_stages=1, descriptors=True, prefetch_row_stats=True
)


def padded_head_dim(head_dim: int) -> int:
    """The head dim the tiles use: a power of two >= 16 (tl.dot's minimum); the rest is masked."""
    return max(16, 1 << (head_dim - 1).bit_length())  # triton.next_power_of_2, without its wrapper


def _interpreter_config(dtype: torch.dtype) -> KernelConfig:
    return INTERPRETER if dtype == torch.float32 else INTERPRETER_DESCRIPTORS


@functools.cache  # called per launch: one lookup instead of building a config
def forward_config(block_d: int, dtype: torch.dtype, interpreted: bool) -> KernelConfig:
    if interpreted:
        return _interpreter_config(dtype)
    if dtype == torch.float32:  # full-precision fp32 dots: no tensor cores, keep tiles small
        return (
            KernelConfig(64, 32, num_warps=4, num_stages=2) if block_d <= 128 else KernelConfig(32, 32, 4, 1)
        )
    # Small tiles with K and V through the copy engine: the descriptors free the registers and issue
    # slots that pointer arithmetic takes, which pays most with 64-row tiles (sweeps: docs/perf-notes.md).
    if block_d <= 64:
        return KernelConfig(64, 64, num_warps=4, num_stages=4, descriptors=True)
    if block_d <= 128:
        return KernelConfig(64, 64, num_warps=4, num_stages=3, descriptors=True)
    # D=256: a 128-row query tile halves the K/V traffic per flop; 64-row tiles lose.
    return KernelConfig(128, 64, num_warps=8, num_stages=2, descriptors=True)


@functools.cache
def backward_configs(
    block_d: int, dtype: torch.dtype, interpreted: bool
) -> tuple[KernelConfig, KernelConfig]:
    """(config of the dK/dV kernel, config of the dQ kernel).

    The dK/dV kernel holds BLOCK_N keys and streams queries; the dQ kernel holds BLOCK_M queries and
    streams keys, so each wants its resident side long and its streamed side short.
    """
    if interpreted:
        dkdv = (
            INTERPRETER_PREFETCH if dtype != torch.float32 and block_d <= 64 else _interpreter_config(dtype)
        )
        return dkdv, _interpreter_config(dtype)
    if dtype == torch.float32:
        small = KernelConfig(32, 32, num_warps=4, num_stages=1)
        return small, small
    # Each kernel keeps a long resident side and streams the other through the copy engine (sweeps:
    # docs/perf-notes.md). At D=64 the dK/dV kernel prefetches its rows' statistics, which pays only with
    # a third pipeline stage; at D=128 three stages of 64 x 128 tiles plus the prefetch would need more
    # shared memory than the 227 KB a block may have, so it stays off there.
    if block_d <= 64:
        return (
            KernelConfig(32, 128, 4, 3, descriptors=True, prefetch_row_stats=True),
            KernelConfig(64, 64, 4, 3, descriptors=True),
        )
    if block_d <= 128:
        return KernelConfig(64, 128, 8, 3, descriptors=True), KernelConfig(128, 64, 8, 3, descriptors=True)
    # D=256: no tile narrower than 64 rows on the resident side (16-row tiles starve the tensor cores),
    # and the largest that fit the shared memory with 2-3 stages.
    return KernelConfig(64, 64, 8, 2, descriptors=True), KernelConfig(128, 32, 8, 3, descriptors=True)


# The persistent forward's programs per SM (plans.PersistentForward): as many as the one-tile kernel's
# tiles fit at once at D <= 128 (its K/V stages take under half the shared memory); a guess to tune on
# the GPU. The interpreter runs 3 programs in all, so that its small tests still give each several tiles.
PERSISTENT_PROGRAMS_PER_SM = 2
INTERPRETER_PERSISTENT_PROGRAMS = 3


def preprocess_block_m(interpreted: bool) -> int:
    """Query rows per program of the Delta = rowsum(dO * O) pass (memory-bound; wide rows are fine)."""
    return INTERPRETER.block_m if interpreted else 64
