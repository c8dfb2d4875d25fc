"""The rings the ring attention runs on: a torch.distributed process group, or a simulated one in one process.

A ring plays one or more of its ranks in this process (`ranks`) and moves tensors one rank along:
`shift(tensors_per_rank)` sends each played rank's tensors to the next rank and returns a pending
receipt whose `wait()` gives, for each played rank, the tensors of the previous rank.

- `ProcessGroupRing` plays this process's rank of a process group, with
  `torch.distributed.batch_isend_irecv`. The requests are asynchronous, so the caller computes while the
  shards travel. With NCCL the transfers run on the process group's own CUDA stream, ordered after the
  work queued on the current stream when they are posted, and `wait()` makes the current stream wait for
  them: that internal stream is the side stream that overlaps communication with compute. With gloo
  (CPU) they run on gloo's threads.
- `LocalRing(world_size)` plays every rank of a ring in one process, on one device: a shift just hands
  each rank the previous rank's tensors (no copy), and counts the bytes a real ring would send. The ring
  code is the same, so the simulation measures everything but the transfers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class LocalRing:
    """A ring of `world_size` ranks simulated in one process: pass it as `group=` and give the ring
    functions every rank's shard in rank order (lists); they return every rank's result.

    `sent_bytes[r]` counts the bytes rank r has sent since the ring was made (or `reset()`), which is what
    each rank of a real ring would send.
    """

    def __init__(self, world_size: int):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"LocalRing needs a world_size >= 1, got {world_size!r}")
        self.world_size = world_size
        self.ranks = tuple(range(world_size))
        self.sent_bytes = [0] * world_size

    def reset(self) -> None:
        self.sent_bytes = [0] * self.world_size

    def shift(self, tensors_per_rank: list[list[torch.Tensor]], tag: int = 0) -> _Received:
        for rank, tensors in enumerate(tensors_per_rank):
            self.sent_bytes[rank] += sum(t.numel() * t.element_size() for t in tensors)
        return _Received(
            [tensors_per_rank[(rank - 1) % self.world_size] for rank in range(self.world_size)], ()
        )

    def __repr__(self) -> str:
        return f"LocalRing(world_size={self.world_size})"


class ProcessGroupRing:
    """This process's rank of a torch.distributed process group (None: the default group), as a ring."""

    def __init__(self, group):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group first "
                "(or pass group=core.distributed.LocalRing(world_size) to simulate a ring in one process)"
            )
        self.group = dist.group.WORLD if group is None else group
        self.world_size = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        if rank < 0:
            raise ValueError("this process is not a member of the process group it was given")
        self.ranks = (rank,)
        # P2P takes global ranks.
        self.next = dist.get_global_rank(self.group, (rank + 1) % self.world_size)
        self.previous = dist.get_global_rank(self.group, (rank - 1) % self.world_size)

    def shift(self, tensors_per_rank: list[list[torch.Tensor]], tag: int = 0) -> _Received:
        """Send this rank's tensors to the next rank and receive the previous rank's. Tensor i travels
        with tag `tag + i`: gloo matches messages by tag, and two shifts may be in flight at once."""
        if self.world_size == 1:  # a ring of one: its tensors come back to it
            return _Received(tensors_per_rank, ())
        (tensors,) = tensors_per_rank
        operations, received = [], []
        for index, tensor in enumerate(tensors):
            wire, restore = as_wire_buffer(tensor)
            buffer = torch.empty_like(wire)
            operations.append(dist.P2POp(dist.isend, wire, self.next, self.group, tag + index))
            operations.append(dist.P2POp(dist.irecv, buffer, self.previous, self.group, tag + index))
            received.append(buffer.permute(restore))
        return _Received([received], dist.batch_isend_irecv(operations))


class _Received:
    """Tensors on their way; `wait()` returns them once they have arrived."""

    def __init__(self, tensors_per_rank, requests):
        self.tensors_per_rank, self.requests = tensors_per_rank, requests

    def wait(self) -> list[list[torch.Tensor]]:
        for request in self.requests:
            request.wait()
        return self.tensors_per_rank


def as_wire_buffer(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """`tensor` as a contiguous tensor that P2P can send, and the permutation that gives back its shape.

    A dense tensor in any dim order (a BSHD view, say) is sent as it lies in memory, without a copy: its
    dims are permuted into memory order, which makes it contiguous, and the receiver un-permutes a buffer
    of that contiguous shape into the sender's strides. Only a tensor with gaps (a slice) is copied.
    """
    order = sorted(range(tensor.dim()), key=lambda d: (tensor.stride(d), tensor.shape[d]), reverse=True)
    wire = tensor.permute(order)
    if not wire.is_contiguous():
        wire = wire.contiguous()
    restore = tuple(sorted(range(len(order)), key=order.__getitem__))
    return wire, restore


def ring_of(group):
    """The ring for `group=`: a LocalRing as it is, else this process's rank of a process group."""
    if isinstance(group, LocalRing):
        return group
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            "group must be None (the default process group), a torch.distributed.ProcessGroup or a "
            f"core.distributed.LocalRing, got {type(group).__name__}"
        )
    return ProcessGroupRing(group)


_AGREED: set[tuple] = set()


def check_same_call_on_every_rank(group, world_size: int, what: str, call: tuple) -> None:
    """Raise ValueError on every rank if the ranks of `group` disagree on `call` (shapes, dtypes, options).

    Checked once per distinct call of this process and group, with one all_gather_object: a model calls
    attention with the same shapes step after step, and mismatched shards would otherwise hang the ring
    or mix tensors of different shapes. (With NCCL, all_gather_object needs the current CUDA device set
    to this rank's, as NCCL needs anyway.)
    """
    key = (id(group), call)
    if key in _AGREED:
        return
    if world_size > 1:
        calls: list = [None] * world_size
        dist.all_gather_object(calls, call, group=group)
        if any(other != call for other in calls):
            listing = "\n".join(f"  rank {rank}: {other}" for rank, other in enumerate(calls))
            raise ValueError(
                f"{what}: the ranks were called with different shapes, dtypes or options; every rank must "
                f"pass shards of one shape and dtype, with the same options:\n{listing}"
            )
    _AGREED.add(key)
