"""Validated call signatures and their forward plans, so that a repeated call skips the host work.

Everything `core.attention` does on the host before allocating its outputs, its checks
(core._validation) and its plan (core._launch.ForwardPlan: tiles, grid, integer arguments, descriptor
choice), depends only on the inputs' metadata and the options. A model calls attention with the same
shapes and strides step after step, so both are kept under a key of exactly what they read:

- for each of q, k, v: dtype, device, shape, strides and the address mod 16 (the descriptor layout
  check and Triton's specialisation read the alignment). The layout needs no entry: a tensor that is
  not strided has no sizes (nested) or no storage (sparse, mkldnn), so reading the key raises and the
  call goes to validation, which refuses it;
- causal and sm_scale, whose types are checked first: only a bool causal, a bool return_lse and a float
  or None sm_scale are keyed (True == 1 == 1.0 as dict keys), anything else is validated afresh, as
  are tensor subclasses and tensors whose metadata cannot be read (nested, sparse).

A call signature enters the cache only after passing validation, so a hit is a call that would pass it
again, and invalid input is still refused before anything is allocated or launched.
"""

from __future__ import annotations

import math

import torch

from core._launch import ForwardPlan
from core._runtime import is_interpreted
from core._validation import validate_attention_inputs

MAX_PLANS = 512  # distinct call signatures kept; a model has a handful

_PLANS: dict[tuple, ForwardPlan] = {}


def _signature(q, k, v, causal, sm_scale, return_lse) -> tuple | None:
    """The cache key of a call, or None for calls that are validated and planned every time."""
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor):
        return None
    if type(causal) is not bool or type(return_lse) is not bool:
        return None
    if not (sm_scale is None or type(sm_scale) is float):
        return None
    try:
        return (
            causal, sm_scale,
            q.dtype, q.device, q.shape, q.stride(), q.data_ptr() & 15,
            k.dtype, k.device, k.shape, k.stride(), k.data_ptr() & 15,
            v.dtype, v.device, v.shape, v.stride(), v.data_ptr() & 15,
        )  # fmt: skip
    except RuntimeError:  # no sizes, strides or storage: let validation say what is wrong
        return None


def forward_plan(q, k, v, causal, sm_scale, return_lse) -> ForwardPlan:
    """The plan for this call, validating the inputs first unless this signature passed before.
    Raises validation's TypeError/ValueError for invalid input."""
    key = _signature(q, k, v, causal, sm_scale, return_lse)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    validate_attention_inputs(q, k, v, causal, sm_scale, return_lse, is_interpreted())
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    plan = ForwardPlan(q, k, v, causal, scale)
    if key is not None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def clear() -> None:
    """Forget every plan (tests that swap core's config or layout rules call this)."""
    _PLANS.clear()
