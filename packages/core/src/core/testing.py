"""What tests, the fuzzer, the numerics lab and the benchmarks may reach inside core, in one place.

Code outside the package imports `core`, `core.testing`, `core.ops`, `core.reference`,
`core.tolerance`, `core.distributed` and `core.integrations.*`, never a private module
(`packages/core/tests/test_imports.py` checks it). This module is that seam:

- switches: `poisoned_outputs()` (NaN-fill every kernel output), `host_cache(enabled)` (the plan cache
  and bound launches), `use_family(name)` (force a kernel family), `fused_backward(enabled)` (the
  portable family's fused backward, off by default), `precise_delta(enabled)` (its Delta pass for
  fp16/bf16 backwards, on by default), `hopper_persistent(enabled)` (the Hopper family's persistent
  forward forced on or off; by default a rule picks it), `launches_forbidden()` (any kernel output
  allocation or launch fails: invalid input must be refused before);
- `plan_like(plan)`: every call inside planned as `plan` was (its family; its decode splits, row tile);
- introspection: `plan_for(q, k, v, ...)`, `cached_plans()`, `clear_plans()`, `families()`, `family(name)`,
  `kernel_fingerprint()`;
- the kernels' raw passes and conventions: `forward`, `backward` (the LSE in the kernels' base with its
  low parts, as core.ops documents; with window_size and softcap too), `uses_base_2`, `score_scale`;
- the interpreter's GPU-faithful arithmetic: `patch_interpreter`, `float64_dot`;
- `portable`: the portable family's modules (tile table, plans, kernels, and the bound launches its
  plans hold), for tests that swap a tile config or a layout rule with monkeypatch and for tools that
  compile its kernels; `decode`: the decode family's (its split rule, plans and kernels).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from types import SimpleNamespace

import torch

from core import _plans, kernels
from core._runtime import float64_dot, is_interpreted, patch_interpreter
from core.kernels import launch as _launch
from core.kernels.decode import config as _decode_config
from core.kernels.decode import forward as _decode_forward
from core.kernels.decode import plans as _decode_plans
from core.kernels.host import Features, OutputPoison, score_scale, uses_base_2
from core.kernels.launch import HostCache
from core.kernels.portable import backward as _portable_backward
from core.kernels.portable import config as _portable_config
from core.kernels.portable import forward as _portable_forward
from core.kernels.portable import fused_backward as _portable_fused_backward
from core.kernels.portable import fused_plans as _portable_fused_plans
from core.kernels.portable import plans as _portable_plans

__all__ = [
    "FamilyUnsupported",
    "Pointer",
    "backward",
    "cached_plans",
    "clear_plans",
    "compile_signature",
    "decode",
    "families",
    "family",
    "float64_dot",
    "forward",
    "fused_backward",
    "hopper_persistent",
    "host_cache",
    "is_interpreted",
    "kernel_fingerprint",
    "launches_forbidden",
    "patch_interpreter",
    "plan_for",
    "plan_like",
    "poisoned_outputs",
    "portable",
    "precise_delta",
    "score_scale",
    "use_family",
    "uses_base_2",
]

portable = SimpleNamespace(
    config=_portable_config,
    plans=_portable_plans,
    forward=_portable_forward,
    backward=_portable_backward,
    fused_backward=_portable_fused_backward,
    fused_plans=_portable_fused_plans,
    launch=_launch,
)

decode = SimpleNamespace(config=_decode_config, plans=_decode_plans, forward=_decode_forward, launch=_launch)


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Every kernel output starts as NaN inside the block, so an element a kernel forgot to write shows."""
    previous, OutputPoison.enabled = OutputPoison.enabled, enabled
    try:
        yield
    finally:
        OutputPoison.enabled = previous


@contextlib.contextmanager
def launches_forbidden():
    """While active, every family's kernel output allocation (each plans module's `new_buffer`) and every
    bound launch raise AssertionError: for tests that bad input is refused before anything is allocated
    or launched. (The Gluon family allocates its outputs before its launch, so it is covered too.)"""

    def launched(*args, **kwargs):
        raise AssertionError("core allocated a kernel output or launched a kernel for an invalid input")

    allocating = [_portable_plans, _portable_fused_plans, _decode_plans, kernels.FAMILIES["hopper"]]
    saved = [(module, module.new_buffer) for module in allocating]
    saved_call = _launch.BoundLaunch.__call__
    try:
        for module, _ in saved:
            module.new_buffer = launched
        _launch.BoundLaunch.__call__ = launched
        yield
    finally:
        for module, new_buffer in saved:
            module.new_buffer = new_buffer
        _launch.BoundLaunch.__call__ = saved_call


@contextlib.contextmanager
def host_cache(enabled: bool):
    """Switch core's host cache (call plans and bound launches) on or off inside the block. Off, every
    call is validated, planned and launched through `kernel[grid]` afresh."""
    previous, HostCache.enabled = HostCache.enabled, enabled
    _plans.clear()
    try:
        yield
    finally:
        HostCache.enabled = previous
        _plans.clear()


@contextlib.contextmanager
def fused_backward(enabled: bool):
    """Switch the portable family's fused backward (one kernel, dQ accumulated in key block order) on or
    off inside the block, for the calls it supports."""
    with _switched(_portable_fused_plans.FusedBackward, enabled):
        yield


@contextlib.contextmanager
def precise_delta(enabled: bool):
    """Switch the portable family's Delta pass for fp16/bf16 backwards (on by default: Delta summed from
    P and dP in the dQ kernel, not dO . O from the rounded output) on or off inside the block."""
    with _switched(_portable_plans.PreciseDelta, enabled):
        yield


@contextlib.contextmanager
def portable_persistent(enabled: bool):
    """Switch the portable family's persistent forward (a few programs per SM walking the tiles; dense
    calls) on or off inside the block, for the plans made in it; off by default. Its results are
    bitwise the one-tile kernel's."""
    with _switched(_portable_plans.PersistentForward, enabled):
        yield


@contextlib.contextmanager
def hopper_persistent(enabled: bool | None):
    """Force the Hopper family's persistent forward (one program per SM walking a list of tiles) on or
    off inside the block, for the plans made in it; None leaves the choice to its rule
    (hopper.persistent_pays), as by default. Its results are bitwise the one-tile kernel's."""
    with _switched(kernels.hopper, enabled, "PERSISTENT"):
        yield


@contextlib.contextmanager
def hopper_backward(enabled: bool):
    """Switch the Hopper family's Gluon backward (dK, dV and dQ in one kernel) on or off inside the block,
    for the calls whose forward that family runs and whose backward it takes (hopper.backward_supports);
    off by default."""
    with _switched(kernels.hopper, enabled, "BACKWARD"):
        yield


@contextlib.contextmanager
def _switched(switch, enabled: bool, attribute: str = "enabled"):
    """A switch's `attribute` (a switch class's `enabled`, a module's flag) set inside the block; call
    plans made before or inside it dropped (unless the setting is unchanged: those plans hold)."""
    previous = getattr(switch, attribute)
    if previous == enabled:
        yield
        return
    setattr(switch, attribute, enabled)
    _plans.clear()
    try:
        yield
    finally:
        setattr(switch, attribute, previous)
        _plans.clear()


@contextlib.contextmanager
def plan_like(plan):
    """Plan every call inside the block as `plan` (a plan_for result) was planned: on its kernel family
    (strict) and, in the decode family, with its split count and row tile. For properties that compare
    two calls bit for bit: core picks the family, the splits and the tiles from shapes and layouts, so
    inputs that differ only in how k/v are stored or grouped can otherwise run different kernels or
    instructions, whose roundings differ."""
    module = type(plan).__module__
    name = next(
        name for name, family in kernels.FAMILIES.items()
        if module == family.__name__ or module.startswith(family.__name__ + ".")
    )  # fmt: skip
    forced = _decode_plans.ForcedPlan
    previous = forced.splits, forced.row_tile
    if name == kernels.decode.NAME:
        forced.splits, forced.row_tile = plan.attend.splits, plan.attend.row_tile
    else:
        forced.splits = forced.row_tile = None
    _plans.clear()
    try:
        with use_family(name):
            yield
    finally:
        forced.splits, forced.row_tile = previous
        _plans.clear()


@contextlib.contextmanager
def use_family(name: str, strict: bool = True):
    """Run every call inside the block on this kernel family. A call it does not support raises, or
    with strict=False takes core's usual choice (how the suite runs every test on every family)."""
    if name not in kernels.FAMILIES:
        raise ValueError(f"unknown kernel family {name!r}; core has {sorted(kernels.FAMILIES)}")
    previous = kernels.Forced.name, kernels.Forced.strict
    kernels.Forced.name, kernels.Forced.strict = name, strict
    try:
        yield
    finally:
        kernels.Forced.name, kernels.Forced.strict = previous


FamilyUnsupported = kernels.FamilyUnsupported


def families() -> tuple[str, ...]:
    """The kernel families this machine can run, in the order core.kernels.choose tries them."""
    return tuple(name for name in kernels.PRIORITY if kernels.FAMILIES[name].available())


def family(name: str):
    """The kernel family `name` (its module, which keeps core.kernels' contract)."""
    return kernels.FAMILIES[name]


def cached_plans() -> list:
    """The forward plans core keeps now, oldest first."""
    return _plans.cached()


def plan_for(q, k, v, *, causal: bool, sm_scale: float | None = None, window_size=(-1, -1), softcap=0.0):
    """The forward plan core uses for this core.attention call (validating it first, as a call would;
    nothing is launched): its family, tiles and bound launches, for tools that record which kernels ran.
    Its `backward_plan(dout, dlse, q, k, v)` is the backward's."""
    return _plans.forward_plan(q, k, v, causal, sm_scale, False, window_size, softcap)


def clear_plans() -> None:
    """Forget every cached plan (after swapping a tile config or a layout rule)."""
    _plans.clear()


def forward(q, k, v, *, causal: bool, sm_scale: float | None = None, config=None, window_size=(-1, -1),
            softcap=0.0):  # fmt: skip
    """(out, lse, lse_low) from a fresh plan of the chosen family (no autograd): lse in the kernels' base,
    lse_low its low parts (core.ops). `config` (a portable KernelConfig) overrides the portable tiles;
    window_size and softcap as core.attention's (validated inputs only: no checks here)."""
    scale = _plans.default_scale(q, sm_scale)
    features = Features.of(causal, window_size, softcap)
    with torch.no_grad():
        if config is not None:
            return _portable_plans.ForwardPlan(q, k, v, causal, scale, config, features)(q, k, v)
        return kernels.choose(q, k, v, causal, features).ForwardPlan(
            q, k, v, causal, scale, features=features
        )(q, k, v)


def backward(dout, dlse, q, k, v, out, lse, lse_low, *, causal: bool, sm_scale: float | None = None,
             window_size=(-1, -1), softcap=0.0):  # fmt: skip
    """(dq, dk, dv) from a fresh plan of the chosen family, for `forward`'s outputs."""
    scale = _plans.default_scale(q, sm_scale)
    features = Features.of(causal, window_size, softcap)
    with torch.no_grad():
        plan = kernels.choose(q, k, v, causal, features).ForwardPlan(
            q, k, v, causal, scale, features=features
        )
        return plan.backward_plan(dout, dlse, q, k, v)(dout, dlse, q, k, v, out, lse, lse_low)


class Pointer:
    """A pointer argument of compile_signature: its Triton element type ("fp16", "i32", ...), 16-byte
    aligned (as torch allocates)."""

    def __init__(self, element: str):
        self.element = element


def compile_signature(kernel, arguments: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) for triton.compile(ASTSource(kernel, ...)) without a GPU,
    specialised as Triton's launcher would for these arguments (by name; pointers as Pointer, Gluon's
    copy-engine descriptors as themselves): integers equal to 1 become constants, multiples of 16 and
    pointers are marked 16-divisible, except the kernel's do_not_specialize arguments. For tools that
    compile core's kernels for a target on the CPU (benchmarks/kernel_report.py, tests/compile_probe.py)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    from triton.runtime.jit import mangle_type

    unspecialised = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    types, constants, attributes = {}, {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params, strict=True)):
        value = arguments[name]
        if param.is_constexpr:
            types[name], constants[(index,)] = "constexpr", value
        elif isinstance(value, Pointer):
            types[name], attributes[(index,)] = "*" + value.element, [["tt.divisibility", 16]]
        elif isinstance(value, GluonDescriptor):
            types[name] = mangle_type(value)  # its element type, block shape and shared layout
        elif isinstance(value, float):
            types[name] = "fp32"
        elif name not in unspecialised and value == 1:
            types[name], constants[(index,)] = "constexpr", 1
        else:
            types[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if name not in unspecialised and value % 16 == 0:
                attributes[(index,)] = [["tt.divisibility", 16]]
    return types, constants, attributes


def kernel_fingerprint() -> str:
    """A short hash of every kernel source of every family: results saved with it tell runs of different
    kernels apart."""
    digest = hashlib.sha256()
    root = Path(kernels.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
