"""Ring attention: each rank keeps its queries and passes its keys and values around the ring.

Forward, on every rank, for step s = 0 .. W-1: the key/value shard of rank (r - s) mod W is here; the
next one is already on its way (posted before the compute, waited for after it). The rank computes the
block of its queries that sees those keys (core.distributed.layout.ring_block: the causal diagonal, a
fully visible block, part of one, or nothing) with core's forward op, and folds the block's (out, lse)
into its running result by their log-sum-exp (`_MergedRows`).

Backward, the same ring again: the keys and values travel once more, and with them two float32
accumulators, dK and dV of the travelling shard, which every rank adds its block's gradients to before
passing them on. After W steps each accumulator has visited every rank and one last shift brings it home.
Each block's gradients come from core's backward op given the merged out and lse, so each block's P is
its share of the whole row's softmax.

Deterministic: the steps run in one fixed order, every rank merges its blocks in step order, and each dK,
dV accumulator collects its contributions in ring order, so repeated runs agree bitwise (the kernels
themselves are deterministic). Different world sizes or layouts sum in different orders, so they agree
within rounding, not bitwise.

Where the backward op derives Delta (the row's sum of P dP) from the call's own keys instead of the
merged out (float32 inputs, and fp16/bf16 ones while plans.PreciseDelta is on, its default;
core.kernels.portable.plans.delta_from_keys), that Delta would be the block's, not the row's.
`_BlockBackward` corrects it: it adds the difference between the block's Delta and the row's to the dLSE
it passes (one more forward call per block gives the block's output). Otherwise (fp16/bf16 with the
switch off) it runs the LSE's gradient as a second backward call with dO = 0, where the kernel's own
Delta is exactly right. fp16/bf16 blocks take the row's Delta from the merged output rounded to the
input dtype, as a FlashAttention-style backward does: the ring does not give the single-call
backward's Delta guarantee (docs/numerics-policy.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core import _plans
from core._runtime import is_interpreted
from core._validation import validate_attention_inputs
from core.distributed import comm
from core.distributed.layout import Block, ring_block, validate_layout
from core.kernels.host import uses_base_2
from core.kernels.portable.plans import delta_from_keys

LN2 = math.log(2.0)
# Read once, as core.api does: a traced call should see a constant, not trace into the lookup.
_INTERPRETED = is_interpreted()


@torch.compiler.disable(reason="point-to-point communication (batch_isend_irecv) cannot be traced")
def ring_attention(
    q,
    k,
    v,
    *,
    group=None,
    causal: bool = True,
    sm_scale: float | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
):
    """Attention over a sequence sharded across the ranks of `group`, by ring attention.

    Args:
        q: this rank's query shard (B, Hq, N_local, D); k, v: its key/value shards (B, Hkv, N_local, D).
            As core.attention takes them: fp16/bf16/fp32, GQA (Hq a multiple of Hkv), any D up to 256,
            any strides (a BSHD view is read and sent as it lies in memory). Every rank passes shards of
            the same shape and dtype. With a LocalRing: lists of every rank's shard, in rank order.
        group: a torch.distributed ProcessGroup (None: the default group), or a `LocalRing` to run the
            whole ring in this process.
        causal: causal attention over the whole sequence (q and k shards of equal length, laid out by
            `layout`). Without it the layout does not matter and q and k shards may differ in length.
        sm_scale: softmax scale, 1/sqrt(D) by default.
        layout: how the sequence was sharded (core.distributed.shard_sequence): "zigzag" (rank r holds
            chunks r and 2W-1-r of 2W; balances causal work; N_local must be even) or "contiguous".
        return_lse: also return the log-sum-exp of each row over the whole sequence (natural log,
            (B, Hq, N_local) float32), differentiable like core.attention's.

    Returns:
        out (q's shape and dtype) or (out, lse), for this rank's rows; lists of every rank's with a
        LocalRing. Differentiable: the backward runs the ring again (every rank must call it, as with any
        collective). Under torch.compile this function runs eagerly (a graph break): torch.distributed's
        point-to-point ops cannot be traced.
    """
    ring = comm.ring_of(group)
    qs, ks, vs = _shards(ring, q, k, v)
    validate_layout(layout)
    for rank_q, rank_k, rank_v in zip(qs, ks, vs):
        validate_attention_inputs(rank_q, rank_k, rank_v, causal, sm_scale, return_lse, _INTERPRETED)
    _validate_ring_shapes(ring, qs, ks, causal, layout)
    call = (tuple(qs[0].shape), tuple(ks[0].shape), str(qs[0].dtype), causal, sm_scale, layout)
    if isinstance(ring, comm.ProcessGroupRing):
        comm.check_same_call_on_every_rank(ring.group, ring.world_size, "ring_attention", call)

    spec = _RingSpec(causal, _plans.default_scale(qs[0], sm_scale), layout, qs[0].shape[2])
    results = _RingAttention.apply(ring, spec, *qs, *ks, *vs)
    outs, lses = list(results[: len(qs)]), list(results[len(qs) :])
    if return_lse and uses_base_2(qs[0].dtype):
        lses = [lse * LN2 for lse in lses]
    if isinstance(ring, comm.LocalRing):
        return (outs, lses) if return_lse else outs
    return (outs[0], lses[0]) if return_lse else outs[0]


def _shards(ring, q, k, v):
    """Every played rank's (q, k, v) shards as three lists."""
    if isinstance(ring, comm.LocalRing):
        for name, shards in (("q", q), ("k", k), ("v", v)):
            if not isinstance(shards, (list, tuple)) or len(shards) != ring.world_size:
                given = (
                    f"{len(shards)} shards" if isinstance(shards, (list, tuple)) else type(shards).__name__
                )
                raise TypeError(
                    f"with a LocalRing of {ring.world_size} ranks, {name} must be a list of every rank's "
                    "shard in rank order (core.distributed.shard_sequence(x, group=ring) makes one), "
                    f"got {given}"
                )
        return list(q), list(k), list(v)
    for name, shard in (("q", q), ("k", k), ("v", v)):
        if isinstance(shard, (list, tuple)):
            raise TypeError(
                f"{name} is a {type(shard).__name__}: with a process group pass this rank's shard as a "
                "tensor (lists of every rank's shards go with group=LocalRing(world_size))"
            )
    return [q], [k], [v]


def _validate_ring_shapes(ring, qs, ks, causal: bool, layout: str) -> None:
    """What the ring needs beyond core.attention's own checks (which every rank's shards passed)."""

    def described(rank):
        return f"q {tuple(qs[rank].shape)}, k {tuple(ks[rank].shape)} {qs[rank].dtype} on {qs[rank].device}"

    for rank in range(1, len(qs)):
        if described(rank) != described(0):
            raise ValueError(
                "every rank's shards must share one shape, dtype and device: rank 0 has "
                f"{described(0)}, rank {rank} has {described(rank)}"
            )
    n_queries, n_keys = qs[0].shape[2], ks[0].shape[2]
    if causal and n_queries != n_keys:
        raise ValueError(
            f"causal ring attention shards one sequence: q and k shards must have the same length, got "
            f"{n_queries} and {n_keys} (cross-attention with different lengths takes causal=False)"
        )
    if causal and layout == "zigzag" and n_queries % 2:
        raise ValueError(
            f"the zigzag layout gives each rank two equal chunks, so its shards need an even length, got "
            f"{n_queries}; shard a sequence whose length is a multiple of 2 x {ring.world_size} ranks, or "
            "use layout='contiguous'"
        )


@dataclass(frozen=True)
class _RingSpec:
    causal: bool
    sm_scale: float
    layout: str
    n_local: int  # the q shards' length

    def block(self, rank: int, source: int) -> Block | None:
        return ring_block(self.layout, self.causal, rank, source, self.n_local)


class _RingAttention(torch.autograd.Function):
    """(q shards..., k shards..., v shards...) -> (out of each played rank..., lse of each, kernels' base)."""

    @staticmethod
    def forward(ctx, ring, spec: _RingSpec, *shards):
        qs, ks, vs = _split(shards)
        outs, lses, lse_lows = zip(*_ring_forward(ring, spec, qs, ks, vs))
        ctx.ring, ctx.spec = ring, spec
        ctx.save_for_backward(*qs, *ks, *vs, *outs, *lses, *lse_lows)
        # An unused output's gradient stays None: a zero dLSE would still cost the LSE-gradient path.
        ctx.set_materialize_grads(False)
        return (*outs, *lses)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        played = len(grads) // 2
        qs, ks, vs, outs, lses, lse_lows = (list(saved[i * played : (i + 1) * played]) for i in range(6))
        douts, dlses = list(grads[:played]), list(grads[played:])
        dqs, dks, dvs = _ring_backward(ctx.ring, ctx.spec, qs, ks, vs, outs, lses, lse_lows, douts, dlses)
        return (None, None, *dqs, *dks, *dvs)


def _split(shards):
    played = len(shards) // 3
    return list(shards[:played]), list(shards[played : 2 * played]), list(shards[2 * played :])


def _travelling(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in the dense layout it will have on every rank after a shift (its own, if dense)."""
    wire, restore = comm.as_wire_buffer(tensor)
    return wire.permute(restore)


def _ring_forward(ring, spec: _RingSpec, qs, ks, vs):
    world_size = ring.world_size
    shards = [[_travelling(k), _travelling(v)] for k, v in zip(ks, vs)]
    merged: list[_MergedRows | None] = [None] * len(qs)
    for step in range(world_size):
        arriving = ring.shift(shards) if step + 1 < world_size else None
        for played, rank in enumerate(ring.ranks):
            block = spec.block(rank, (rank - step) % world_size)
            if block is None:
                continue
            q, (k, v) = qs[played][:, :, block.rows], shards[played]
            out, lse, lse_low = torch.ops.core.attention_forward(
                q, k[:, :, block.keys], v[:, :, block.keys], block.causal, spec.sm_scale
            )
            if merged[played] is None:
                merged[played] = _MergedRows(out, lse, lse_low)
            else:
                merged[played].add(block.rows, out, lse, lse_low)
        if arriving is not None:
            shards = arriving.wait()
    # Step 0 is each rank's own shard, whose block is never empty: every rank has a result.
    return [m.result() for m in merged]


class _MergedRows:
    """One rank's output and LSE over the blocks seen so far, merged by the LSE.

    The LSEs merge in float64, each block's taken exactly as the forward's parts sum (lse + its low parts,
    core.ops), so the weights exp(lse_block - lse_merged) lose nothing to the LSE's magnitude, and the
    merged LSE goes to the backward as a float32 value and its float32 remainder (a low part). The
    output accumulates in float32 for fp16/bf16 inputs, in float64 for float32 ones, whose kernels keep
    float32 precision throughout (compensated sums), which a float32 merge would give up.

    Every row has seen at least one key after step 0 (its own shard: the causal diagonal with equal q and
    k lengths, or everything), so the running LSE is finite and the weights need no guard against
    -inf - -inf.
    """

    def __init__(self, out: torch.Tensor, lse: torch.Tensor, lse_low: torch.Tensor):
        self.dtype = out.dtype
        self.out = out.to(torch.float64 if out.dtype == torch.float32 else torch.float32)
        self.lse = lse.double() + lse_low.double().sum(0)
        self.exp, self.logaddexp = (
            (torch.exp2, torch.logaddexp2) if uses_base_2(out.dtype) else (torch.exp, torch.logaddexp)
        )

    def add(self, rows: slice, out: torch.Tensor, lse: torch.Tensor, lse_low: torch.Tensor) -> None:
        total_out, total_lse = self.out[:, :, rows], self.lse[:, :, rows]
        lse = lse.double() + lse_low.double().sum(0)
        merged = self.logaddexp(total_lse, lse)
        total_out.mul_(self.exp(total_lse - merged).to(total_out.dtype).unsqueeze(-1))
        total_out.addcmul_(out, self.exp(lse - merged).to(total_out.dtype).unsqueeze(-1))
        total_lse.copy_(merged)

    def result(self):
        """(out in the inputs' dtype, lse in float32, its low parts as core.ops lays them out)."""
        lse = self.lse.float()
        low = [(self.lse - lse.double()).float()]
        if self.dtype == torch.float32:
            low.append(torch.zeros_like(lse))  # the row max's low part: already in the remainder
        return self.out.to(self.dtype), lse, torch.stack(low)


def _ring_backward(ring, spec: _RingSpec, qs, ks, vs, outs, lses, lse_lows, douts, dlses):
    world_size = ring.world_size
    shards = [[_travelling(k), _travelling(v)] for k, v in zip(ks, vs)]
    backwards = [
        _BlockBackward(spec, *rank_tensors) for rank_tensors in zip(qs, outs, lses, lse_lows, douts, dlses)
    ]
    dqs = [torch.zeros_like(q, dtype=torch.float32) for q in qs]
    pending_gradients = None  # the travelling (dK, dV) accumulators, from step 0 on
    for step in range(world_size):
        arriving = ring.shift(shards) if step + 1 < world_size else None
        block_grads = []
        for played, rank in enumerate(ring.ranks):
            block = spec.block(rank, (rank - step) % world_size)
            k, v = shards[played]
            grads = None if block is None else backwards[played](block, k, v)
            if grads is not None:
                dqs[played][:, :, block.rows].add_(grads[0])
            block_grads.append((block, grads))
        if pending_gradients is None:
            gradients = [[torch.zeros_like(t, dtype=torch.float32) for t in shard] for shard in shards]
        else:
            gradients = pending_gradients.wait()
        for (dk_total, dv_total), (block, grads) in zip(gradients, block_grads):
            if grads is not None:
                dk_total[:, :, block.keys].add_(grads[1])
                dv_total[:, :, block.keys].add_(grads[2])
        pending_gradients = ring.shift(gradients, tag=2)
        if arriving is not None:
            shards = arriving.wait()
    gradients = pending_gradients.wait()
    dks = [dk.to(k.dtype) for (dk, _), k in zip(gradients, ks)]
    dvs = [dv.to(v.dtype) for (_, dv), v in zip(gradients, vs)]
    return [dq.to(q.dtype) for dq, q in zip(dqs, qs)], dks, dvs


class _BlockBackward:
    """One rank's calls to core's backward op, one per ring step (`__call__(block, k, v)`).

    The query side of each call (q, dO, the merged out, the merged LSE and its gradient) depends only on
    the block's rows, of which a rank has at most two kinds (all, or the second half): they are sliced and
    laid out once per backward. The op reads `out` in the layout its forward gives q's rows and the LSE
    contiguous, so those two are copied where a slice is not already in that layout.
    """

    def __init__(self, spec: _RingSpec, q, out, lse, lse_low, dout, dlse):
        self.spec = spec
        self.q, self.out, self.lse, self.lse_low, self.dout, self.dlse = q, out, lse, lse_low, dout, dlse
        self.rows_inputs: dict[tuple, tuple] = {}

    def _inputs(self, rows: slice):
        key = (rows.start, rows.stop)
        if key not in self.rows_inputs:
            q = self.q[:, :, rows]
            out = _in_layout_of(q, self.out[:, :, rows])
            lse = self.lse[:, :, rows].contiguous()
            lse_low = self.lse_low[..., rows].contiguous()
            dout = None if self.dout is None else self.dout[:, :, rows]
            dlse = None if self.dlse is None else self.dlse[:, :, rows]
            self.rows_inputs[key] = (q, out, lse, lse_low, dout, dlse)
        return self.rows_inputs[key]

    def __call__(self, block: Block, k, v):
        """(dq, dk, dv) of this block, or None when this rank's outputs got no gradient."""
        if self.dout is None and self.dlse is None:
            return None
        q, out, lse, lse_low, dout, dlse = self._inputs(block.rows)
        k, v = k[:, :, block.keys], v[:, :, block.keys]
        causal, scale = block.causal, self.spec.sm_scale
        backward = torch.ops.core.attention_backward
        if delta_from_keys(q.dtype, has_dlse=False):
            # The kernel's Delta is the block's dO . O_block (its keys' P dP over their P), the row's is
            # dO . O. Adding their difference to dLSE, which the kernel subtracts from Delta, makes it
            # the row's.
            if dout is None:
                dout = torch.zeros_like(out)
            else:
                block_out = torch.ops.core.attention_forward(q, k, v, causal, scale)[0]
                difference = (dout.double() * (block_out.double() - out.double())).sum(-1)
                if uses_base_2(q.dtype):  # the kernel subtracts dLSE2 * log2(e) from Delta
                    difference = difference * LN2
                dlse = (difference if dlse is None else dlse.double() + difference).float()
            return backward(dout, q, k, v, out, lse, lse_low, dlse, causal, scale)
        # Without a dLSE the kernel takes Delta from dO and the merged out, the row's. The LSE's
        # gradient goes through a second call with dO = 0, whose Delta (0 from the keys, minus dLSE) is
        # the row's too; gradients are linear in (dO, dLSE).
        grads = None
        if dout is not None:
            grads = backward(dout, q, k, v, out, lse, lse_low, None, causal, scale)
        if dlse is not None:
            lse_grads = backward(torch.zeros_like(out), q, k, v, out, lse, lse_low, dlse, causal, scale)
            grads = lse_grads if grads is None else tuple(a.float() + b for a, b in zip(grads, lse_grads))
        return grads


def _in_layout_of(like: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in the layout torch.empty_like(like) has (copied only if it is not already)."""
    if torch.empty_like(like, device="meta").stride() == tensor.stride():
        return tensor
    return torch.empty_like(like).copy_(tensor)
