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
"""

from __future__ import annotations

import math

import torch

from core import kernels
from core._runtime import is_interpreted
from core._validation import validate_attention_inputs, validate_max_seqlen, validate_varlen_inputs
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


def default_scale(q, sm_scale) -> float:
    """The softmax scale of a call: sm_scale, or 1 / sqrt(D) when it is None."""
    return 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)


def cached() -> list:
    """The plans kept now, oldest first (core.testing.cached_plans)."""
    return list(_PLANS.values())


def clear() -> None:
    """Forget every plan (tests that swap core's config or layout rules call this)."""
    _PLANS.clear()
