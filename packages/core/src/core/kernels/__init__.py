"""Kernel families, and the one function that chooses among them.

A family is a package here with one small contract:

- `NAME`: how tests and users refer to it (core.testing.use_family);
- `available() -> bool`: whether this machine can run it at all;
- `supports(q, k, v, causal, features) -> bool`: whether it takes this (validated) call; `features`
  (core.kernels.host.Features) says what the call asks beyond causal or full attention: a sliding
  window, a logit softcap, packed sequences (varlen);
- `ForwardPlan(q, k, v, causal, sm_scale, features=features)`: the forward of one call signature;
  calling it with tensors of that signature (and, for varlen, `packed=` the call's
  core.kernels.host.Packed) returns (out, lse, lse_low) with the conventions of core.kernels.host (out
  laid out by new_buffer, lse (B, Hq, Nq) float32 in the base uses_base_2 names, or (Hq, total_q) for
  varlen, lse_low its low parts), and its `backward_plan(dout, dlse, q, k, v, deterministic=True)`
  returns a callable giving (dq, dk, dv) (taking `packed=` too); deterministic=False permits, and
  never requires, an unordered sum.

Every family's forward output is consumable by every family's backward: that is what the LSE
conventions are for. `choose` takes the first family in `PRIORITY` that supports a call, unless a test
prefers or forces one (core.testing.use_family).
"""

from __future__ import annotations

from types import ModuleType

from core.kernels import decode, hopper, portable
from core.kernels.host import PLAIN, Features

FAMILIES: dict[str, ModuleType] = {decode.NAME: decode, hopper.NAME: hopper, portable.NAME: portable}
# decode takes only the decode-shaped calls it supports, hopper the fp16/bf16 ones it wins on sm_90 (D 128;
# D 64 non-causal with short keys: hopper.faster_than_portable); portable takes every other.
PRIORITY: tuple[str, ...] = (decode.NAME, hopper.NAME, portable.NAME)


class FamilyUnsupported(ValueError):
    """A call that the family a test forces does not take (core.testing.use_family, strict)."""


class Forced:
    """The family a test puts first (core.testing.use_family), else None. Strict: calls it does not
    support raise instead of taking the usual choice."""

    name: str | None = None
    strict: bool = True


def choose(q, k, v, causal: bool, features: Features = PLAIN) -> ModuleType:
    """The family that runs this validated call."""
    if Forced.name is not None:
        family = FAMILIES[Forced.name]
        if family.supports(q, k, v, causal, features):
            return family
        if Forced.strict:
            raise FamilyUnsupported(f"the forced kernel family {Forced.name!r} does not support this call")
    for name in PRIORITY:
        family = FAMILIES[name]
        if family.supports(q, k, v, causal, features):
            return family
    raise AssertionError("the portable family supports every validated call")
