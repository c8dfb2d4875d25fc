"""DeepSpeed-Ulysses attention: all-to-all from sequence shards to head shards and back.

Each rank holds a contiguous shard of the sequence for every head. One all-to-all gives each rank the
whole sequence for H / W of the heads (query heads and their key/value heads alike, so GQA groups stay
together), core.attention runs there, and a second all-to-all returns each rank's tokens for every head.
The all-to-alls are torch.distributed's functional collectives, which differentiate (the backward of
an all-to-all is the reverse all-to-all) and which torch.compile traces.

Buffers are laid out so that only the send side copies: a rank packs q, k and v into one send buffer of
shape (W, N_local, B, heads, D) (one all-to-all for all three), and what arrives is already the whole
sequence, (N, B, heads, D), which core reads in place as a (B, heads, N, D) view.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives

import core
from core._runtime import is_interpreted
from core._validation import validate_attention_inputs
from core.distributed import comm

# Read once, as core.api does: a traced call should see a constant, not trace into the lookup.
_INTERPRETED = is_interpreted()


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = True,
    sm_scale: float | None = None,
    return_lse: bool = False,
):
    """Attention over a sequence sharded across the ranks of `group`, by head-parallel all-to-all.

    Args:
        q: this rank's query shard (B, Hq, N_local, D); k, v: (B, Hkv, N_local, D), as core.attention
            takes them. The shards are contiguous pieces of the sequence in rank order
            (shard_sequence(x, layout="contiguous")); Hq and Hkv must be multiples of the group's size.
        group: a torch.distributed ProcessGroup (None: the default group).
        causal, sm_scale: as core.attention, over the whole sequence.
        return_lse: also return this rank's rows' log-sum-exp (B, Hq, N_local), natural log, float32.

    Returns:
        out like q (q's strides when q is dense), or (out, lse). Differentiable; traceable by
        torch.compile (fullgraph).
    """
    if isinstance(group, comm.LocalRing):
        raise TypeError(
            "ulysses_attention runs on a torch.distributed process group (a LocalRing simulates only "
            "ring_attention)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be None or a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group first"
        )
    group = dist.group.WORLD if group is None else group
    world_size = dist.get_world_size(group)
    validate_attention_inputs(q, k, v, causal, sm_scale, return_lse, _INTERPRETED)
    _validate_heads_and_lengths(q, k, causal, world_size)
    if not torch.compiler.is_compiling():
        call = (tuple(q.shape), tuple(k.shape), str(q.dtype), causal, sm_scale)
        comm.check_same_call_on_every_rank(group, world_size, "ulysses_attention", call)

    if q.shape[2] == k.shape[2]:
        q_heads, k_heads, v_heads = _to_head_shards([q, k, v], group, world_size)
    else:
        (q_heads,) = _to_head_shards([q], group, world_size)
        k_heads, v_heads = _to_head_shards([k, v], group, world_size)
    result = core.attention(
        q_heads, k_heads, v_heads, causal=causal, sm_scale=sm_scale, return_lse=return_lse
    )
    if not return_lse:
        return _to_sequence_shard(result, q, group, world_size)
    out, lse = result
    return _to_sequence_shard(out, q, group, world_size), _lse_to_sequence_shard(lse, group, world_size)


def _validate_heads_and_lengths(q, k, causal: bool, world_size: int) -> None:
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if q_heads % world_size or kv_heads % world_size:
        raise ValueError(
            f"ulysses_attention splits the heads over the {world_size} ranks: q's {q_heads} heads and k/v's "
            f"{kv_heads} heads must both be multiples of {world_size} (ring_attention takes any head count)"
        )
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"causal attention over a sharded sequence needs q and k shards of the same length, got "
            f"{q.shape[2]} and {k.shape[2]}"
        )


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Piece i of x's first dim goes to rank i; piece i of the result came from rank i."""
    return functional_collectives.wait_tensor(
        functional_collectives.all_to_all_single_autograd(x, None, None, group)
    )


def _to_head_shards(tensors, group, world_size: int):
    """(B, H, N_local, D) sequence shards of every head -> (B, H / W, N, D) views of the whole sequence
    for this rank's heads, one all-to-all for all of `tensors` (which share B, N_local and D)."""
    pieces = [t.unflatten(1, (world_size, t.shape[1] // world_size)).permute(1, 3, 0, 2, 4) for t in tensors]
    send = torch.cat(pieces, dim=3) if len(pieces) > 1 else pieces[0].contiguous()  # (W, N_local, B, h, D)
    received = _all_to_all(send, group)  # piece i: rank i's tokens, so in sequence order
    whole = received.flatten(0, 1).permute(1, 2, 0, 3)  # (B, h, N, D)
    return whole.split([piece.shape[3] for piece in pieces], dim=1)


def _to_sequence_shard(out: torch.Tensor, like: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """(B, H / W, N, D) of this rank's heads -> (B, H, N_local, D) of its tokens, laid out like `like`."""
    by_token = out.permute(2, 0, 1, 3).contiguous()  # (N, B, h, D): a view when out is laid out like q_heads
    received = _all_to_all(by_token.unflatten(0, (world_size, -1)), group)  # piece i: head group i
    shard = torch.empty_like(like)
    shard.unflatten(1, (world_size, -1)).copy_(received.permute(2, 0, 3, 1, 4))
    return shard


def _lse_to_sequence_shard(lse: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """(B, H / W, N) -> (B, H, N_local)."""
    by_token = lse.permute(2, 0, 1).contiguous()  # (N, B, h)
    received = _all_to_all(by_token.unflatten(0, (world_size, -1)), group)  # (W, N_local, B, h)
    return received.permute(2, 0, 3, 1).flatten(1, 2)
