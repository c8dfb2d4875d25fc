"""Tile shapes of the decode kernels and the split rule: how many programs share one KV head's keys.

Like the portable family's table (core.kernels.portable.config), everything here is a function of the
call's shapes and the device, never of tensor values: a decode step stays capturable in a CUDA graph and
traceable by torch.compile, and a run is reproducible.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from core.kernels import host

# The query rows of one KV head (its GQA group times the queries) that one program holds at most: more
# rows are spread over several row blocks, each streaming the same keys.
MAX_BLOCK_M = 64
# A split keeps at least this many key tiles: a program pays its prologue (the query tile, the first
# loads' latency) and writes a partial row per query, which a handful of tiles amortises.
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 128  # also the most a caller may ask for (num_splits)
# Partial elements (splits x head dims) that one merge program reads at once.
MERGE_TILE = 4096
# The split rule aims at filling this many programs per SM at once: the kernel is bound by memory, and
# a second resident program keeps loads in flight while the first one computes.
PROGRAMS_PER_SM = 2
# Balanced splits (split_count): as many splits as one wave of programs holds, then as few as give every
# split the same number of key tiles, instead of the fewest splits that fill the waves to 85%. It only
# changes one-sequence rows, where the waves rule left splits uneven; timed faster there
# (docs/perf-notes.md; `run.py decode --sweep` labels the two "x2b" and "x2").
BALANCE_TILES = True
# Programmatic dependent launch (sm_90 on): the merge kernel is launched while the split kernel's
# programs still run, and waits for them inside (griddepcontrol.wait), so the gap between the two
# launches overlaps the split kernel's tail. From this many splits on (None: never). It pays where the
# merge has many partials to read and the split kernel is one short wave (one sequence, GQA), and cost
# where it had two (docs/perf-notes.md; `run.py decode --sweep` labels the rule from 2 splits "pdl" and
# this one "pdl16").
OVERLAP_MERGE_FROM_SPLITS: int | None = 16
# Under the interpreter there is no device to fill: the rule plans for a stand-in of a few SMs, so that
# the small CPU test shapes split their keys too.
INTERPRETER_SMS = 4


@dataclass(frozen=True)
class DecodeConfig:
    """BLOCK_M query rows (of one KV head: group x queries) x BLOCK_N keys per tile."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


def block_m_for(rows: int) -> int:
    """The row tile: the rows of a KV head rounded up to a power of two, at least tl.dot's 16, at most
    MAX_BLOCK_M (more rows take several row blocks)."""
    return min(MAX_BLOCK_M, max(16, 1 << (rows - 1).bit_length()))


@functools.cache
def decode_config(
    rows: int, block_d: int, dtype: torch.dtype, paged: bool, interpreted: bool
) -> DecodeConfig:
    """Tiles for a call with `rows` query rows per KV head. A first choice, not yet tuned on hardware:
    two programs' buffered K and V tiles fit an H100 SM's shared memory."""
    block_m = block_m_for(rows)
    if interpreted:  # tiles that cross several key blocks even at the CPU tests' lengths
        return DecodeConfig(block_m, 16, num_warps=1, num_stages=1)
    # A paged tile's addresses come from a load (the block table): Triton's pipeliner gives that load
    # stages of its own before the K and V loads, so paged caches take two stages more for as many K
    # and V tiles in flight as dense ones (docs/design.md, "Decode").
    extra_stages = 2 if paged else 0
    if dtype == torch.float32:  # float64 dots (the float32 precision path): small tiles
        return DecodeConfig(block_m, 32, num_warps=4, num_stages=2 + extra_stages)
    # One buffered stage of K and V is 2 x BLOCK_N x BLOCK_D x 2 bytes: 32 KB at D 128 with 64 keys
    # (and at D 256 with 32). Three stages keep two tiles in flight: two programs fit one SM.
    return DecodeConfig(block_m, 64 if block_d <= 128 else 32, num_warps=4, num_stages=3 + extra_stages)


def multiprocessors(device: torch.device, interpreted: bool) -> int:
    """The SMs the split rule fills: the GPU's, or INTERPRETER_SMS under the interpreter or off a GPU."""
    return (None if interpreted else host.multiprocessors(device)) or INTERPRETER_SMS


def overlaps_merge(splits: int, device: torch.device, interpreted: bool) -> bool:
    """Whether a call of `splits` splits launches its merge early (OVERLAP_MERGE_FROM_SPLITS) on this
    device: compiled, and on a GPU with griddepcontrol (sm_90 and later). Off a GPU (the compile probe's
    CPU tensors) the target is Hopper."""
    if OVERLAP_MERGE_FROM_SPLITS is None or splits < max(2, OVERLAP_MERGE_FROM_SPLITS) or interpreted:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)


def split_count(programs_per_split: int, key_tiles: int, sm_count: int) -> int:
    """How many splits of the keys: FlashAttention-2's wave rule (flash_fwd_launch_template's
    num_splits_heuristic) over PROGRAMS_PER_SM programs per SM.

    `programs_per_split` is the grid without splitting (batch x KV heads x row blocks), `key_tiles` the
    most key tiles a row block can see. Where that grid already fills most of the machine nothing is
    split. Otherwise each split count s gives waves = programs_per_split * s / slots, and a last wave
    that is only partly full wastes the rest of it: the rule takes the smallest s whose efficiency
    waves / ceil(waves) is within 85% of the best, so that the merge and the per-split prologue stay
    few. A split keeps at least MIN_TILES_PER_SPLIT tiles.

    With BALANCE_TILES (the default) the count is instead the most that one wave holds, lowered to the
    fewest splits with the same tiles per split: every program of the wave then streams as many tiles
    (the wave rule can leave one sequence's 512 tiles in 29 splits of 18, where 32 splits of 16 fit the
    same wave).
    """
    slots = PROGRAMS_PER_SM * sm_count
    if programs_per_split >= 0.8 * slots:
        return 1
    most = max(1, min(MAX_SPLITS, slots, key_tiles // MIN_TILES_PER_SPLIT))
    if BALANCE_TILES:
        one_wave = max(1, min(most, slots // programs_per_split))
        return math.ceil(key_tiles / math.ceil(key_tiles / one_wave)) if key_tiles else 1

    def efficiency(splits: int) -> float:
        waves = programs_per_split * splits / slots
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if efficiency(s) >= 0.85 * best)


def merge_block_s(splits: int, block_d: int) -> int:
    """Splits the merge reads at once: all of them up to a tile of 4096 partial elements (32 registers
    a thread in float32 with 4 warps, 64 for their float64 products)."""
    return min(1 << (splits - 1).bit_length(), MERGE_TILE // block_d)


def min_keys_for_attention(interpreted: bool) -> int:
    """The fewest keys at which core.attention hands a decode-shaped call to this family: below that the
    portable forward's few query tiles already have little to stream. The interpreter's threshold is
    scaled down with its tiles, so the CPU suite runs this family on its decode-shaped calls."""
    return 32 if interpreted else 2048
