"""Core's host cache: validated call signatures and their forward plans, so that a repeated call skips
the host work. It is the one cache layer (with the bound launches its plans hold, core.kernels.launch),
and `core.testing.host_cache(False)` or CORE_HOST_CACHE=0 switches it off: then every call is validated,
planned and launched afresh.

Everything `core.attention` does on the host before allocating its outputs, its checks
(core._validation), the choice of kernel family (core.kernels.choose) and the family's plan (tiles,
grid, integer arguments, descriptor choice), depends only on the inputs' metadata and the options. A
model calls attention with the same shapes and strides step after step, so both are kept under a key
of exactly what they read, and of the forced family (core.testing.use_family):

- for each of q, k, v: dtype, device, shape, strides and the address mod 16 (the descriptor layout
  check and Triton's specialisation read the alignment). The layout needs no entry: a tensor that is
  not strided has no sizes (nested) or no storage (sparse, mkldnn), so reading the key raises and the
  call goes to validation, which refuses it;
- causal and sm_scale, whose types are checked first: only a bool causal, a bool return_lse and a float
  or None sm_scale are keyed (True == 1 == 1.0 as dict keys; None as the scale it stands for, so that the
  public function and the registered op share one plan), anything else is validated afresh, as are
  tensor subclasses and tensors whose metadata cannot be read (nested, sparse);
- window_size, keyed only as a tuple of two ints (not bools), and softcap, only as a float or int;
- for varlen calls (varlen_forward_plan) also each cu_seqlens tensor's dtype, device, shape and strides.
  max_seqlen_q/k are not keyed: they size each call's grid, not the plan, and are checked on every
  call.

A call signature enters the cache only after passing validation, so a hit is a call that would pass it
again, and invalid input is still refused before anything is allocated or launched.

core.attention_with_kvcache's calls are kept the same way (`kvcache_plan`), keyed by every tensor's
metadata, an int cache_seqlens' value and the options with their types; its two ops keep the plans of
their halves (`attend_plan`, `append_plan`), as their caller has validated the call.
"""

from __future__ import annotations

import math

import torch

from core import kernels
from core._runtime import is_interpreted
from core._validation import (
    validate_attention_inputs,
    validate_kvcache_inputs,
    validate_max_seqlen,
    validate_varlen_inputs,
)
from core.kernels import decode
from core.kernels.host import Features
from core.kernels.launch import HostCache

MAX_PLANS = 512  # distinct call signatures kept; a model has a handful

_PLANS: dict[tuple, object] = {}


def _options_key(causal, sm_scale, return_lse, window_size, softcap) -> tuple | None:
    """The options' part of a cache key, or None for option types that are validated every time."""
    if type(causal) is not bool or type(return_lse) is not bool:
        return None
    if not (sm_scale is None or type(sm_scale) is float):
        return None
    if not (type(window_size) is tuple and len(window_size) == 2):
        return None
    if not (type(window_size[0]) is int and type(window_size[1]) is int):
        return None
    if not (type(softcap) is float or type(softcap) is int):
        return None
    return (causal, window_size, softcap)


def _signature(q, k, v, causal, sm_scale, return_lse, window_size=(-1, -1), softcap=0.0) -> tuple | None:
    """The cache key of a call, or None for calls that are validated and planned every time."""
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor):
        return None
    options = _options_key(causal, sm_scale, return_lse, window_size, softcap)
    if options is None:
        return None
    try:
        return (
            kernels.Forced.name, kernels.Forced.strict, *options, default_scale(q, sm_scale),
            q.dtype, q.device, q.shape, q.stride(), q.data_ptr() & 15,
            k.dtype, k.device, k.shape, k.stride(), k.data_ptr() & 15,
            v.dtype, v.device, v.shape, v.stride(), v.data_ptr() & 15,
        )  # fmt: skip
    except (RuntimeError, IndexError, ZeroDivisionError):
        # No sizes, strides or storage, no dims, or D = 0: let validation say what is wrong.
        return None


def _remember(key, plan) -> None:
    if key is not None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan


def forward_plan(q, k, v, causal, sm_scale, return_lse, window_size=(-1, -1), softcap=0.0):
    """The forward plan (of the family core.kernels.choose picks) for this call, validating the inputs
    first unless this signature passed before. Raises validation's TypeError/ValueError for invalid input."""
    key = (
        _signature(q, k, v, causal, sm_scale, return_lse, window_size, softcap) if HostCache.enabled else None
    )
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    validate_attention_inputs(q, k, v, causal, sm_scale, return_lse, is_interpreted(), window_size, softcap)
    features = Features.of(causal, window_size, softcap)
    plan = kernels.choose(q, k, v, causal, features).ForwardPlan(
        q, k, v, causal, default_scale(q, sm_scale), features=features
    )
    _remember(key, plan)
    return plan


def _varlen_signature(
    q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale, return_lse, window_size, softcap
):
    if not (type(cu_seqlens_q) is torch.Tensor and type(cu_seqlens_k) is torch.Tensor):
        return None
    signature = _signature(q, k, v, causal, sm_scale, return_lse, window_size, softcap)
    if signature is None:
        return None
    try:
        return (
            "varlen", *signature,
            cu_seqlens_q.dtype, cu_seqlens_q.device, cu_seqlens_q.shape, cu_seqlens_q.stride(),
            cu_seqlens_k.dtype, cu_seqlens_k.device, cu_seqlens_k.shape, cu_seqlens_k.stride(),
        )  # fmt: skip
    except RuntimeError:
        return None


def varlen_forward_plan(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, return_lse,
    window_size=(-1, -1), softcap=0.0,
):  # fmt: skip
    """forward_plan for core.attention_varlen: a plan of packed (total, H, D) inputs, which each call hands
    its Packed sequences (core.kernels.host). max_seqlen_q/k are checked here on every call."""
    key = None
    if HostCache.enabled:
        key = _varlen_signature(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale, return_lse, window_size, softcap
        )
    plan = _PLANS.get(key)
    if plan is not None:
        validate_max_seqlen("max_seqlen_q", max_seqlen_q)
        validate_max_seqlen("max_seqlen_k", max_seqlen_k)
        return plan
    validate_varlen_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, return_lse,
        is_interpreted(), window_size, softcap,
    )  # fmt: skip
    features = Features.of(causal, window_size, softcap, varlen=True)
    plan = kernels.choose(q, k, v, causal, features).ForwardPlan(
        q, k, v, causal, default_scale(q, sm_scale), features=features
    )
    _remember(key, plan)
    return plan


def kvcache_plan(q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, causal, sm_scale,
                 window_size, softcap, num_splits, return_lse):  # fmt: skip
    """core.attention_with_kvcache's plan for this call (append, then attention), validating the inputs
    first unless this signature passed before."""
    options = (causal, sm_scale, window_size, softcap, num_splits, return_lse)
    tensors = (q, k_cache, v_cache, k, v, block_table, cache_batch_idx)
    key = _kvcache_signature("kvcache", tensors, cache_seqlens, options)
    plan = _PLANS.get(key)
    if plan is None:
        validate_kvcache_inputs(
            q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, causal, sm_scale,
            window_size, softcap, num_splits, return_lse, is_interpreted(),
        )  # fmt: skip
        plan = _keep(key, decode.KvCachePlan(
            q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, causal=causal,
            sm_scale=default_scale(q, sm_scale), window_size=tuple(window_size), softcap=float(softcap),
            num_splits=num_splits,
        ))  # fmt: skip
    return plan


def attend_plan(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, n_new, causal, sm_scale,
                window_left, window_right, softcap, num_splits):  # fmt: skip
    """The attention half of core.attention_with_kvcache, as its op (core.ops) runs it; inputs validated
    by the caller."""
    options = (n_new, causal, sm_scale, window_left, window_right, softcap, num_splits)
    tensors = (q, k_cache, v_cache, block_table, cache_batch_idx)
    key = _kvcache_signature("attend", tensors, cache_seqlens, options)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _keep(key, decode.AttendPlan(
            q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, n_new=n_new, causal=causal,
            sm_scale=sm_scale, window_size=(window_left, window_right), softcap=softcap,
            num_splits=num_splits,
        ))  # fmt: skip
    return plan


def append_plan(k, v, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx):
    """The in-place append of core.attention_with_kvcache, as its op (core.ops) runs it; inputs
    validated by the caller."""
    key = _kvcache_signature(
        "append", (k, v, k_cache, v_cache, block_table, cache_batch_idx), cache_seqlens, ()
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = _keep(
            key, decode.AppendPlan(k, v, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx)
        )
    return plan


def _kvcache_signature(kind: str, tensors: tuple, cache_seqlens, options: tuple) -> tuple | None:
    """The cache key of a KV-cache call, or None for calls that are validated and planned every time.

    Tensors (or None) are keyed by their metadata, as q, k, v are; an int cache_seqlens by its value (the
    kernels take it as a constant). Each option is keyed with its type, since True == 1 == 1.0 as dict
    keys: causal=1 never finds causal=True's plan, and goes to validation, which refuses it. Options of
    other types than bool, int, float, None and tuples of ints are never keyed."""
    if not HostCache.enabled:
        return None
    if not all(t is None or type(t) is torch.Tensor for t in tensors):
        return None
    if not all(_keyable(option) for option in options):
        return None
    try:
        if type(cache_seqlens) is torch.Tensor:
            seqlens = (torch.Tensor, _tensor_key(cache_seqlens))
        elif type(cache_seqlens) is int:
            seqlens = (int, cache_seqlens)
        else:
            return None
        tensor_keys = tuple(None if t is None else _tensor_key(t) for t in tensors)
    except (RuntimeError, IndexError):  # no sizes, strides or storage: let validation say what is wrong
        return None
    typed_options = tuple((type(option), option) for option in options)
    return (kind, tensor_keys, seqlens, typed_options)


def _keyable(option) -> bool:
    if type(option) is tuple:
        return all(type(part) is int for part in option)
    return option is None or type(option) in (bool, int, float)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.dtype, t.device, t.shape, t.stride(), t.data_ptr() & 15)


def _keep(key, plan):
    if key is not None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def default_scale(q, sm_scale) -> float:
    """The softmax scale of a call: sm_scale, or 1 / sqrt(D) when it is None."""
    return 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)


def cached() -> list:
    """The plans kept now, oldest first (core.testing.cached_plans)."""
    return list(_PLANS.values())


def clear() -> None:
    """Forget every plan (tests that swap core's config or layout rules call this)."""
    _PLANS.clear()
