"""Bound launches: a compiled Triton kernel relaunched without Triton's per-call argument binding.

`kernel[grid](*args)` works out the kernel's specialisation on every call: it binds every argument,
classifies each one (a pointer's dtype and 16-byte alignment, an integer's value being 1 or a multiple
of 16, its width) and hashes the result to find the compiled kernel. That costs more host time than the
launch itself (docs/perf-notes.md, "Host overhead"). A model calls attention with the same shapes and
strides step after step, and core keeps a plan per call signature (core._plans); each plan holds one
`BoundLaunch` per kernel, with every argument but the tensors fixed. While the tensors' alignment, the
device and Triton's debug switch are the ones it compiled for, a bound launch hands the compiled
kernel's launcher the tensors' addresses as integers: no key to build, and no driver query per pointer.

That is Triton's `CompiledKernel.run` calling convention, which is internal: it is used only with the
Triton releases it was verified on (`VERIFIED_TRITON`), never when launch hooks (profilers) are
installed, never under the interpreter, and never while the host cache is switched off
(`core.testing.host_cache(False)` or CORE_HOST_CACHE=0 in the environment). Anything else takes
`kernel[grid]`, Triton's ordinary path.
"""

from __future__ import annotations

import os

import triton
from triton import knobs
from triton.runtime.driver import driver

from core._runtime import is_interpreted

VERIFIED_TRITON = ("3.6",)


class HostCache:
    """The one switch for core's host cache: call plans (core._plans) and bound launches."""

    enabled: bool = os.environ.get("CORE_HOST_CACHE", "1") != "0"


def _fast_path_possible() -> bool:
    return triton.__version__.rsplit(".", 1)[0] in VERIFIED_TRITON and not is_interpreted()


def _hooked(runtime) -> bool:
    # Triton 3.6's hooks are HookChains, never None: empty unless a profiler added a hook.
    return bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)


def _run(entry: tuple, device: int, grid, arguments) -> None:
    """Call a compiled kernel's launcher (Triton 3.6's `CompiledKernel.run` convention) on the current
    stream, with every argument in signature order (pointers as addresses). The entry holds the compiled
    kernel's launcher, function handle and packed metadata, and the stream lookup of the driver that
    compiled it."""
    launcher, function, packed_metadata, current_stream = entry
    launcher(
        grid[0], grid[1], grid[2], current_stream(device), function, packed_metadata, None, None, None,
        *arguments,
    )  # fmt: skip


class BoundLaunch:
    """`kernel[grid](*tensors, *integers, *floats, **constexprs, **options)` with everything but the
    tensors fixed at construction. `kernel` takes its pointers first, then integers, then floats (then
    the trailing arguments below), then constexprs; `constexprs` and `options` are tuples of (name, value)
    pairs, the constexprs in signature order (a fast relaunch passes them by position). Call it with the
    current device's index (which the caller knows, None off CUDA) and the tensors, in the kernel's
    pointer order.

    A plan is built per dtype, so the tensors' dtypes are fixed; their alignment is checked on every
    call, since it is a property of each call's allocations, not of the plan.

    `trailing_tensors` and `extra` are arguments that follow the floats: that many pointers (the call's
    last tensors), then the `extra` values. core's kernels take their feature arguments (sliding window,
    softcap, packed sequences: core.kernels.host.Features) there, after the plain kernels' own, so that
    adding them moved no parameter of the plain kernels: inserted among the pointers and integers, they
    changed ptxas's register allocation of the plain dK/dV kernel (benchmarks/kernel_report.py).
    """

    def __init__(self, kernel, grid, integers, floats, constexprs, options, trailing_tensors=0, extra=()):
        names = tuple(kernel.arg_names[len(kernel.arg_names) - len(constexprs) :])
        if tuple(name for name, _ in constexprs) != names:
            raise TypeError(f"{kernel.fn.__name__}: constexprs must be {names} in this order")
        self.kernel = kernel
        self.grid = grid
        self.arguments = (*integers, *floats)
        self.trailing_tensors = trailing_tensors
        self.extra = tuple(extra)
        self.keywords = {**dict(constexprs), **dict(options)}
        self.tail = (*self.extra, *[value for _, value in constexprs])
        self.entry = None
        self.compiled_for = None  # (device, debug switch, each address mod 16) of self.entry

    def _in_signature_order(self, tensors):
        """The positional arguments of a call: leading tensors, integers and floats, trailing tensors,
        extra values (tensors or their addresses alike)."""
        split = len(tensors) - self.trailing_tensors
        return (*tensors[:split], *self.arguments, *tensors[split:], *self.extra)

    def __call__(self, device: int | None, *tensors, grid: tuple[int, int, int] | None = None) -> None:
        """Launch on `grid`, or on the grid fixed at construction (a varlen plan's grid follows each
        call's longest sequence; the compiled kernel does not depend on it)."""
        grid = self.grid if grid is None else grid
        runtime = knobs.runtime
        if not (HostCache.enabled and _fast_path_possible()) or _hooked(runtime):
            self.kernel[grid](*self._in_signature_order(tensors), **self.keywords)
            return
        addresses = [tensor.data_ptr() for tensor in tensors]
        now = (device, runtime.debug, [address & 15 for address in addresses])
        if self.entry is not None and now == self.compiled_for:
            split = len(addresses) - self.trailing_tensors
            _run(
                self.entry,
                device,
                grid,
                (*addresses[:split], *self.arguments, *addresses[split:], *self.tail),
            )
            return
        compiled = self.kernel[grid](*self._in_signature_order(tensors), **self.keywords)
        self.entry = (
            compiled.run,
            compiled.function,
            compiled.packed_metadata,
            driver.active.get_current_stream,
        )
        self.compiled_for = now
