"""How a sequence is split over the ranks of a ring, and which part of the attention each ring step computes.

Two layouts of a sequence of N tokens over W ranks:

- "contiguous": rank r holds tokens [r N/W, (r+1) N/W). Causal attention is unbalanced: rank r's queries
  see the keys of ranks 0..r, so the last rank works W times as long as the first.
- "zigzag": the sequence is cut into 2W chunks of N/(2W) tokens and rank r holds chunks r and 2W-1-r,
  one from each end. Every rank then does the same causal work at every ring step (see `ring_block`).

`shard_sequence` / `unshard_sequence` move a whole sequence to and from the shards; the attention
itself never gathers the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("zigzag", "contiguous")
EVERYTHING = slice(None)


def validate_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


@dataclass(frozen=True)
class Block:
    """The attention one rank computes at one ring step: its query rows `rows` against the keys `keys` of
    the visiting shard, with core's causal mask on that pair (bottom-right aligned) or none."""

    rows: slice
    keys: slice
    causal: bool


def ring_block(layout: str, causal: bool, rank: int, source: int, n_local: int) -> Block | None:
    """The block rank `rank` computes when the shard of rank `source` visits, or None when its queries see
    none of those keys. `n_local` is the shards' length (q and k alike when causal).

    Causal attention sees key j from query i iff j <= i in the global order. With the contiguous
    layout, shards of earlier ranks are fully visible, later ones invisible, and a rank's own shard is
    the causal diagonal. With the zigzag layout, for a shard of chunks (s, 2W-1-s) visiting a rank of
    chunks (r, 2W-1-r):

    - s == r: the rank's own shard. Its first chunk's queries see their own chunk causally and not the
      second chunk; the second chunk's queries see all of the first chunk and their own causally: that
      is exactly core's causal mask on the 2c x 2c pair, so one causal call.
    - s < r: chunk s precedes both of the rank's chunks (fully visible); chunk 2W-1-s follows both
      (invisible). So every query row against the first half of the keys, no mask.
    - s > r: both visiting chunks (s and 2W-1-s) follow chunk r and precede chunk 2W-1-r. So the second
      half of the query rows against every key, no mask.

    Each zigzag step therefore scores 2c x c pairs (c = n_local / 2), and the diagonal step's causal
    2c x 2c triangle is the same amount: the ring stays balanced.
    """
    if not causal:
        return Block(EVERYTHING, EVERYTHING, False)
    if source == rank:
        return Block(EVERYTHING, EVERYTHING, True)
    if layout == "contiguous":
        return Block(EVERYTHING, EVERYTHING, False) if source < rank else None
    half = n_local // 2
    if source < rank:
        return Block(EVERYTHING, slice(0, half), False)
    return Block(slice(half, None), EVERYTHING, False)


def _chunks_of_rank(layout: str, rank: int, world_size: int) -> tuple[int, ...]:
    """The chunks (of `chunk_count` equal ones) a rank holds, in the order it holds them."""
    if layout == "contiguous":
        return (rank,)
    return (rank, 2 * world_size - 1 - rank)


def chunk_count(layout: str, world_size: int) -> int:
    return world_size if layout == "contiguous" else 2 * world_size


def _check_dim(x: torch.Tensor, seq_dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(seq_dim, int) or isinstance(seq_dim, bool) or not -x.dim() <= seq_dim < x.dim():
        raise ValueError(
            f"seq_dim must be a dim of the {x.dim()}-dim tensor (2 for (B, H, N, D), 1 for (B, N, H, D)), "
            f"got {seq_dim!r}"
        )
    return seq_dim % x.dim()


def shard(x: torch.Tensor, layout: str, rank: int, world_size: int, seq_dim: int) -> torch.Tensor:
    """Rank `rank`'s shard of the whole sequence `x`: a new tensor (never a view that would keep the whole
    sequence alive), differentiable."""
    validate_layout(layout)
    seq_dim = _check_dim(x, seq_dim)
    chunks = chunk_count(layout, world_size)
    n = x.shape[seq_dim]
    if n % chunks:
        raise ValueError(
            f"the {layout} layout over {world_size} ranks cuts the sequence into {chunks} equal chunks, "
            f"but its length {n} (dim {seq_dim}) is not a multiple of {chunks}"
        )
    size = n // chunks
    parts = [x.narrow(seq_dim, chunk * size, size) for chunk in _chunks_of_rank(layout, rank, world_size)]
    return torch.cat(parts, dim=seq_dim)


def unshard(shards: list[torch.Tensor], layout: str, seq_dim: int) -> torch.Tensor:
    """The whole sequence from every rank's shard, in rank order (the inverse of `shard`)."""
    validate_layout(layout)
    world_size = len(shards)
    seq_dim = _check_dim(shards[0], seq_dim)
    pieces = len(_chunks_of_rank(layout, 0, world_size))
    n_local = shards[0].shape[seq_dim]
    if n_local % pieces:
        raise ValueError(f"a {layout} shard holds {pieces} equal chunks, but its length {n_local} is odd")
    size = n_local // pieces
    chunks: list[torch.Tensor | None] = [None] * chunk_count(layout, world_size)
    for rank, piece in enumerate(shards):
        for position, chunk in enumerate(_chunks_of_rank(layout, rank, world_size)):
            chunks[chunk] = piece.narrow(seq_dim, position * size, size)
    return torch.cat(chunks, dim=seq_dim)
