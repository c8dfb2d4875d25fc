"""Context parallelism: attention over a sequence sharded across the ranks of a torch.distributed group.

    import core.distributed as cd
    shards = [cd.shard_sequence(x, layout="zigzag") for x in (q, k, v)]  # this rank's (B, H, N/W, D)
    out = cd.ring_attention(*shards, causal=True, layout="zigzag")      # this rank's rows
    shards = [cd.shard_sequence(x, layout="contiguous") for x in (q, k, v)]
    out = cd.ulysses_attention(*shards, causal=True)                    # Hq, Hkv multiples of W

Two schemes, both on core's own ops (torch.ops.core.attention_forward / attention_backward):

- `ring_attention`: keys and values travel around the ring while each rank attends its queries to
  them; partial results merge by their log-sum-exp. Memory and traffic per rank are O(N / W); causal work
  is balanced by the zigzag layout.
- `ulysses_attention` (DeepSpeed-Ulysses): an all-to-all turns sequence shards into head shards, each
  rank runs core.attention on the whole sequence for H / W heads, and an all-to-all turns the result back.

`LocalRing(world_size)` runs a whole ring in one process (for tests and single-GPU measurements), and
`ring_volume` / `ulysses_volume` give the bytes each rank sends. docs/distributed.md has the details.
"""

from core.distributed.comm import LocalRing
from core.distributed.ring import ring_attention
from core.distributed.sharding import shard_sequence, unshard_sequence
from core.distributed.ulysses import ulysses_attention
from core.distributed.volume import CommunicationVolume, ring_volume, ulysses_volume

__all__ = [
    "CommunicationVolume",
    "LocalRing",
    "ring_attention",
    "ring_volume",
    "shard_sequence",
    "ulysses_attention",
    "ulysses_volume",
    "unshard_sequence",
]
