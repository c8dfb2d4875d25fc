"""core's attention as PyTorch operators: the ops, their fake kernels and their autograd, side by side.

    torch.ops.core.attention_forward(q, k, v, causal, sm_scale, window_left=-1, window_right=-1,
        softcap=0.0) -> (out, lse, lse_low)
    torch.ops.core.attention_backward(dout, q, k, v, out, lse, lse_low, dlse, causal, sm_scale,
        window_left=-1, window_right=-1, softcap=0.0) -> (dq, dk, dv)
    torch.ops.core.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, causal, sm_scale, window_left=-1, window_right=-1, softcap=0.0) -> (out, lse, lse_low)
    torch.ops.core.attention_varlen_backward(dout, q, k, v, out, lse, lse_low, dlse, cu_seqlens_q,
        cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, window_left=-1, window_right=-1,
        softcap=0.0) -> (dq, dk, dv)
    torch.ops.core.kvcache_append(k_cache, v_cache, k, v, cache_seqlens, fixed_seqlen, block_table,
        cache_batch_idx) -> None                           (writes k, v into the caches in place)
    torch.ops.core.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, fixed_seqlen, n_new,
        block_table, cache_batch_idx, causal, sm_scale, window_left, window_right, softcap, num_splits)
        -> (out, lse)                                      (forward only)

They are opaque `torch.library.custom_op`s: torch.compile (Dynamo, AOTAutograd, Inductor) sees their
fake kernels, never the host code, so the call plans and bound launches (core._plans) stay out of its
sight and a compiled graph calls the same kernels as eager code. The public functions (core.api)
validate their inputs before calling these, eagerly and while tracing alike.

window_left/window_right are FlashAttention's window_size (-1: unbounded; causal makes the right side 0)
and softcap its logit softcap (0: off), as core.attention documents them. The varlen ops take packed
(total, H, D) tensors and int32 cumulative sequence lengths on the device, which no host code reads.

Conventions of the attention ops (core.kernels.host): `lse` is the log-sum-exp of each row's scaled (and
capped) scores, (B, Hq, Nq) float32, or (Hq, total_q) for varlen, in the kernels' base for q's dtype
(`uses_base_2(dtype)`: base 2 for fp16/bf16, natural = lse * ln 2; natural for float32), -inf for rows
that see no key. `lse_low` holds its low parts ((1, *lse.shape) for fp16/bf16, (2, *lse.shape) for
float32), which let the backward rebuild the forward's exponent exactly. `dlse` is the gradient of
`lse` (same base, any layout) or None.

The backward takes `out` and `lse` as arguments, so a caller that split the keys (context parallelism)
can pass the merged ones, with zeros for `lse_low`, and get each key block's share of dK and dV and of
dQ: Delta = rowsum(dO * out) - dLSE is computed from the `out` given. That holds for fp16/bf16 without
a dLSE. For float32, and for any dtype with a dLSE, the dQ kernel completes Delta from the call's own
keys (sum P dP, which is more accurate when the call sees every key), so a partial call needs the
caller's correction: core.distributed.ring shows both (docs/distributed.md).

The KV-cache ops are core.attention_with_kvcache's two halves (core.kernels.decode): the append mutates
the caches and nothing else, the attention mutates nothing, so a compiled decode step that appends
nothing never has its cache functionalized. `cache_seqlens` is an int32 (B,) tensor or None, in which
case every sequence holds `fixed_seqlen` cached keys; the attention also sees the `n_new` keys appended
after them. `num_splits` 0 lets the split rule choose (core.kernels.decode.config).
"""

from __future__ import annotations

import torch

from core import _plans
from core.kernels.host import Packed, uses_base_2

__all__ = [
    "EagerAttention",
    "attention_backward",
    "attention_forward",
    "attention_varlen_backward",
    "attention_varlen_forward",
    "attention_with_kvcache",
    "kvcache_append",
    "uses_base_2",
]


def _statistics_like(q, lse_shape):
    low_planes = 2 if q.dtype == torch.float32 else 1
    return (
        q.new_empty(lse_shape, dtype=torch.float32),
        q.new_empty((low_planes, *lse_shape), dtype=torch.float32),
    )


@torch.library.custom_op("core::attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    sm_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, lse_low) of softmax(cap(q k^T * sm_scale) + mask) v; inputs validated by the caller.
    `deterministic` is the backward's (its autograd passes it on to attention_backward)."""
    window = (window_left, window_right)
    return _plans.forward_plan(q, k, v, causal, sm_scale, True, window, softcap)(q, k, v)


@attention_forward.register_fake
def _(q, k, v, causal, sm_scale, window_left=-1, window_right=-1, softcap=0.0, deterministic=True):
    batch, q_heads, n_queries, _ = q.shape
    # core.kernels.host.new_buffer's layout rule for out
    return (torch.empty_like(q), *_statistics_like(q, (batch, q_heads, n_queries)))


@torch.library.custom_op("core::attention_backward", mutates_args=())
def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lse_low: torch.Tensor,
    dlse: torch.Tensor | None,
    causal: bool,
    sm_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each laid out like its input when that input is dense, else contiguous.
    Deterministic (every gradient element summed in one fixed order) unless `deterministic` is False
    and the backward that runs has an unordered sum (core.attention's argument)."""
    window = (window_left, window_right)
    forward = _plans.forward_plan(q, k, v, causal, sm_scale, True, window, softcap)
    return _gradients(forward, dout, dlse, q, k, v, out, lse, lse_low, deterministic)


def _gradients(forward, dout, dlse, q, k, v, out, lse, lse_low, deterministic: bool, **on_packed):
    """The backward of a call whose forward plan is `forward` (every route's: the ops and EagerAttention).
    The kernels read dLSE as a contiguous float32 vector ((B, Hq, Nq), or (Hq, total_q) packed); autograd
    may hand it over in any layout (e.g. from lse.transpose(1, 2)). It is one float per row: copied."""
    if dlse is not None:
        dlse = dlse.contiguous()
    plan = forward.backward_plan(dout, dlse, q, k, v, deterministic=deterministic)
    return plan(dout, dlse, q, k, v, out, lse, lse_low, **on_packed)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, lse_low, dlse, causal, sm_scale, window_left=-1, window_right=-1, softcap=0.0,
      deterministic=True):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("core::attention_varlen_forward", mutates_args=())
def attention_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    sm_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, lse_low) of packed sequences: out (total_q, Hq, D), lse (Hq, total_q); `deterministic`
    as attention_forward's."""
    plan = _plans.varlen_forward_plan(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, True,
        (window_left, window_right), softcap,
    )  # fmt: skip
    return plan(q, k, v, packed=Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


@attention_varlen_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, window_left=-1,
      window_right=-1, softcap=0.0, deterministic=True):  # fmt: skip
    n_queries, q_heads, _ = q.shape
    return (torch.empty_like(q), *_statistics_like(q, (q_heads, n_queries)))


@torch.library.custom_op("core::attention_varlen_backward", mutates_args=())
def attention_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lse_low: torch.Tensor,
    dlse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    sm_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of packed sequences, each laid out like its input when dense, else contiguous."""
    forward = _plans.varlen_forward_plan(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, True,
        (window_left, window_right), softcap,
    )  # fmt: skip
    packed = Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _gradients(forward, dout, dlse, q, k, v, out, lse, lse_low, deterministic, packed=packed)


@attention_varlen_backward.register_fake
def _(dout, q, k, v, out, lse, lse_low, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      sm_scale, window_left=-1, window_right=-1, softcap=0.0, deterministic=True):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale, *features = inputs
    out, lse, lse_low = output
    ctx.save_for_backward(q, k, v, out, lse, lse_low)
    ctx.options = (causal, sm_scale, *features)
    ctx.mark_non_differentiable(lse_low)
    # An unused output's gradient arrives as None rather than as a materialised zero tensor: a zero dLSE
    # would still take the backward's LSE-gradient path.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, _dlse_low):
    q, k, v, out, lse, lse_low = ctx.saved_tensors
    if dout is None:  # only the LSE was used: dO = 0 leaves just the LSE term
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, lse_low, dlse, *ctx.options)
    return dq, dk, dv, *(None,) * len(ctx.options)


def _setup_varlen_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *options = inputs
    out, lse, lse_low = output
    ctx.save_for_backward(q, k, v, out, lse, lse_low, cu_seqlens_q, cu_seqlens_k)
    ctx.options = tuple(options)
    ctx.mark_non_differentiable(lse_low)
    ctx.set_materialize_grads(False)


def _varlen_backward(ctx, dout, dlse, _dlse_low):
    q, k, v, out, lse, lse_low, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_varlen_backward(
        dout, q, k, v, out, lse, lse_low, dlse, cu_seqlens_q, cu_seqlens_k, *ctx.options
    )
    return dq, dk, dv, None, None, *(None,) * len(ctx.options)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "core.attention does not support double backward (a gradient of its gradients); "
        "use core.attention_reference where second derivatives are needed"
    )


torch.library.register_autograd("core::attention_forward", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "core::attention_varlen_forward", _varlen_backward, setup_context=_setup_varlen_context
)
for _name in ("core::attention_backward", "core::attention_varlen_backward"):
    torch.library.register_autograd(
        _name, _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )


class EagerAttention(torch.autograd.Function):
    """The eager route of a call that needs gradients (core.api): attention_forward's and
    attention_backward's kernels (or the varlen ops', given the packed bounds) under a plain
    autograd.Function that holds the call's plan (core._plans). It launches what the ops launch, with
    the same arguments, so the two routes give the same bits; it skips the dispatcher and the ops'
    autograd bookkeeping, which cost a small call more host time than its launches. torch.compile traces
    the ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, plan, packed: Packed | None, deterministic: bool):
        on_packed = {} if packed is None else {"packed": packed}  # only the portable family packs
        out, lse, lse_low = plan(q, k, v, **on_packed)
        ctx.save_for_backward(q, k, v, out, lse, lse_low)
        ctx.plan, ctx.on_packed, ctx.deterministic = plan, on_packed, deterministic
        ctx.mark_non_differentiable(lse_low)
        ctx.set_materialize_grads(False)  # as _setup_context
        return out, lse, lse_low

    @staticmethod
    def backward(ctx, dout, dlse, _dlse_low):
        q, k, v, out, lse, lse_low = ctx.saved_tensors
        if dout is None:  # as _backward
            dout = torch.zeros_like(out)
        gradients = _gradients(
            ctx.plan, dout, dlse, q, k, v, out, lse, lse_low, ctx.deterministic, **ctx.on_packed
        )
        if torch.is_grad_enabled():  # create_graph=True: a later backward through these must fail clearly
            gradients = _RefuseDoubleBackward.apply(q, k, v, dout, *gradients)
        return (*gradients, None, None, None)


class _RefuseDoubleBackward(torch.autograd.Function):
    """The gradients, as views that depend on what they were computed from (so they require grad)
    and whose own backward raises _no_double_backward's error."""

    @staticmethod
    def forward(ctx, q, k, v, dout, dq, dk, dv):
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx, *grads)


@torch.library.custom_op("core::kvcache_append", mutates_args=("k_cache", "v_cache"))
def kvcache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor | None,
    fixed_seqlen: int,
    block_table: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
) -> None:
    """Write k, v (B, Hkv, Nnew, D) into the caches at each sequence's cached length; inputs validated
    by the caller."""
    seqlens = fixed_seqlen if cache_seqlens is None else cache_seqlens
    plan = _plans.append_plan(k, v, k_cache, v_cache, seqlens, block_table, cache_batch_idx)
    plan(k, v, k_cache, v_cache, seqlens, block_table, cache_batch_idx)


@kvcache_append.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, fixed_seqlen, block_table, cache_batch_idx):
    return None


@torch.library.custom_op("core::attention_with_kvcache", mutates_args=())
def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None,
    fixed_seqlen: int,
    n_new: int,
    block_table: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    causal: bool,
    sm_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of q against the cache (lse in the kernels' base); inputs validated by the caller."""
    seqlens = fixed_seqlen if cache_seqlens is None else cache_seqlens
    plan = _plans.attend_plan(
        q, k_cache, v_cache, seqlens, block_table, cache_batch_idx, n_new, causal, sm_scale, window_left,
        window_right, softcap, num_splits or None,
    )  # fmt: skip
    out, lse, _ = plan(q, k_cache, v_cache, seqlens, block_table, cache_batch_idx)
    return out, lse


@attention_with_kvcache.register_fake
def _(q, k_cache, v_cache, cache_seqlens, fixed_seqlen, n_new, block_table, cache_batch_idx, causal, sm_scale,
      window_left, window_right, softcap, num_splits):  # fmt: skip
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _forward_only(ctx, *grads):
    raise RuntimeError(
        "core.attention_with_kvcache is forward-only (inference): it has no backward. Use core.attention "
        "where gradients are needed"
    )


torch.library.register_autograd(
    "core::attention_with_kvcache", _forward_only, setup_context=lambda ctx, inputs, output: None
)
