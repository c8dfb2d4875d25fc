"""How many bytes each rank sends per call: the communication volume of both schemes.

With S = B x Hkv x N_local x D elements in one k (or v) shard, e the input dtype's size, W ranks:

- ring forward: W-1 shifts of k and v, 2 S e bytes each.
- ring backward: W-1 shifts of k and v again, and W shifts of the float32 dK and dV accumulators
  (2 S x 4 bytes each: the last brings them home).
- Ulysses: all-to-all of q, k, v there and of the output back; each rank keeps 1/W of every buffer, so
  it sends (W-1)/W of (Q + 2 S + Q) e bytes (Q = B x Hq x N_local x D) in the forward, and the same in
  the backward (dO there, dQ, dK, dV back). A returned LSE adds (W-1)/W of its B x Hq x N_local float32
  values each way.

Ring traffic per step is independent of W (a shard's k and v), so it hides behind a step's compute once
N_local is long enough; Ulysses' total is a constant fraction of the activations, in 2 (or 3) rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACCUMULATOR_BYTES = 4  # the ring's travelling dK, dV are float32


@dataclass(frozen=True)
class CommunicationVolume:
    """What one rank sends in one call's forward and in its backward, in bytes, and in how many rounds
    (ring shifts, or all-to-alls) each pass sends it."""

    forward_bytes: int
    backward_bytes: int
    forward_rounds: int
    backward_rounds: int


def ring_volume(q: torch.Tensor, k: torch.Tensor, world_size: int) -> CommunicationVolume:
    """Bytes per rank of ring_attention with shards like `q` and `k` (their shapes and dtype are read)."""
    shard = 2 * k.shape.numel()  # k and v
    element = k.dtype.itemsize
    return CommunicationVolume(
        forward_bytes=(world_size - 1) * shard * element,
        backward_bytes=(world_size - 1) * shard * element + world_size * shard * ACCUMULATOR_BYTES,
        forward_rounds=world_size - 1,
        backward_rounds=2 * world_size - 1,
    )


def ulysses_volume(q: torch.Tensor, k: torch.Tensor, world_size: int, return_lse: bool = False):
    """Bytes per rank of ulysses_attention with shards like `q` and `k`."""
    element = q.dtype.itemsize
    activations = (2 * q.shape.numel() + 2 * k.shape.numel()) * element  # q, k, v there, out back
    if return_lse:
        activations += q.shape[:-1].numel() * 4
    sent = activations * (world_size - 1) // world_size
    rounds = 2 if q.shape[2] == k.shape[2] else 3  # q, k, v share one all-to-all when their lengths match
    rounds += 1 if return_lse else 0
    return CommunicationVolume(sent, sent, rounds, rounds)
