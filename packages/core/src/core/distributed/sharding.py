"""Moving a whole sequence to its shards and back (the attention itself never gathers it)."""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as functional_collectives

from core.distributed import comm
from core.distributed import layout as layouts

# torch renamed the differentiable all-gather (all_gather_tensor_autograd, deprecated from 2.13 on).
_all_gather = (
    getattr(functional_collectives, "all_gather_single_autograd", None)
    or functional_collectives.all_gather_tensor_autograd
)


def shard_sequence(x: torch.Tensor, group=None, layout: str = "zigzag", seq_dim: int = 2):
    """This rank's shard of `x`, the whole sequence (the same on every rank), along `seq_dim`.

    `layout` "zigzag": the sequence is cut into 2W equal chunks and rank r gets chunks r and 2W-1-r, in
    that order (the length must be a multiple of 2W); "contiguous": W equal chunks, rank r gets chunk r
    (a multiple of W). seq_dim is 2 for (B, H, N, D) tensors, 1 for (B, N, H, D), or any other dim.

    Returns a new tensor (a slice would keep the whole sequence alive), differentiable. With
    group=LocalRing(W): the list of every rank's shard, in rank order.
    """
    ring = comm.ring_of(group)
    return _for_played_ranks(ring, lambda rank: layouts.shard(x, layout, rank, ring.world_size, seq_dim))


def unshard_sequence(x, group=None, layout: str = "zigzag", seq_dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's shard `x` (the inverse of shard_sequence), on every rank.

    All-gathers the shards with torch.distributed's differentiable functional collective: the gradient of
    a rank's shard is the sum over the ranks of the gradients of their copies of the whole. With a
    LocalRing, `x` is the list of every rank's shard. This materialises the whole sequence: it is for
    outputs, checks and losses, not for the attention.
    """
    ring = comm.ring_of(group)
    if isinstance(ring, comm.LocalRing):
        if not isinstance(x, (list, tuple)) or len(x) != ring.world_size:
            raise TypeError(
                f"with a LocalRing of {ring.world_size} ranks, pass the list of every rank's shard"
            )
        return layouts.unshard(list(x), layout, seq_dim)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be this rank's shard as a torch.Tensor, got {type(x).__name__}")
    layouts.validate_layout(layout)
    gathered = functional_collectives.wait_tensor(_all_gather(x.contiguous(), 0, ring.group))
    return layouts.unshard(list(gathered.chunk(ring.world_size)), layout, seq_dim)


def _for_played_ranks(ring, make):
    if isinstance(ring, comm.LocalRing):
        return [make(rank) for rank in ring.ranks]
    return make(ring.ranks[0])
