"""Relaunch a compiled kernel without Triton's per-call argument binding.

`kernel[grid](*args)` works out the kernel's specialisation on every call: it binds ~30 arguments,
classifies each one (a pointer's dtype and 16-byte alignment, an integer's value being 1 or a multiple
of 16, its width) and hashes the result to find the compiled kernel. On the H100 machine's host that
costs ~30 us per launch, more than the launch itself (docs/perf-notes.md, "Host overhead"). A model calls
attention with the same shapes and strides step after step, so two levels of caching skip it:

- `CachedKernel.launch` remembers the compiled kernel under a key that pins everything the
  specialisation reads: every integer argument's exact value (strides, head counts, lengths, so "== 1",
  "% 16" and the integer width are the same as on the call that compiled it); every pointer's dtype and
  its address mod 16; the constexprs and launch options, the current device and Triton's debug switch.
  Floating-point arguments are never specialised, so they are not in the key. A miss goes through
  `kernel[grid]` and stores what it returns.
- `BoundLaunch` is one launch with everything but the tensors fixed (core._launch's plans build one per
  kernel and call signature). It keeps its compiled kernel and, while the tensors' alignment, the device
  and the debug switch are the ones it was compiled for, hands the launcher the tensors' addresses as
  integers: no key to build, and no driver query per pointer (Triton's launcher asks the driver about
  every tensor argument, `cuPointerGetAttribute`, but takes an integer as the address it is).

A hit calls the compiled kernel's launcher directly, on the current stream (so CUDA graph capture works
as before). That is Triton's `CompiledKernel.run` calling convention, which is internal: it is used only
with the Triton release it was verified on (`VERIFIED_TRITON`), and never when launch hooks (profilers)
are installed, or under the interpreter. Anything else takes the ordinary path.
"""

from __future__ import annotations

import triton
from triton import knobs
from triton.runtime.driver import driver

from core._runtime import is_interpreted

VERIFIED_TRITON = ("3.6",)
MAX_ENTRIES = 512  # distinct (shape, stride, alignment) combinations kept per kernel


def _usable() -> bool:
    return triton.__version__.rsplit(".", 1)[0] in VERIFIED_TRITON and not is_interpreted()


def _hooked(runtime) -> bool:
    # Triton 3.6's hooks are HookChains, never None: empty unless a profiler added a hook.
    return bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)


class CachedKernel:
    """A @triton.jit kernel whose signature is pointers, then integers, then floats, then constexprs.

    `launch(grid, pointers, integers, floats, constexprs, options)` is `kernel[grid](*pointers, *integers,
    *floats, **constexprs, **options)`, with the binding skipped when an earlier call had the same key.
    `constexprs` and `options` are tuples of (name, value) pairs in signature order (hashable).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict[tuple, tuple] = {}
        self.enabled = _usable()

    def launch(self, grid, pointers, integers, floats, constexprs, options) -> tuple | None:
        """Launches; returns the compiled kernel's entry for `run`, or None when the cache is off (then
        Triton's own path ran)."""
        runtime = knobs.runtime
        if not self.enabled or _hooked(runtime):
            self._bind_and_launch(grid, pointers, integers, floats, constexprs, options)
            return None
        device = driver.active.get_current_device()
        key = (
            device,
            runtime.debug,
            constexprs,
            options,
            integers,
            tuple([(pointer.dtype, pointer.data_ptr() & 15) for pointer in pointers]),
        )
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self._bind_and_launch(grid, pointers, integers, floats, constexprs, options)
            if len(self.compiled) >= MAX_ENTRIES:
                self.compiled.clear()
            entry = self.compiled[key] = (
                compiled.run,
                compiled.function,
                compiled.packed_metadata,
                driver.active.get_current_stream,
            )
            return entry
        run(entry, device, grid, pointers, _tail(integers, floats, constexprs))
        return entry

    def _check_order(self, n_positional: int, constexprs) -> None:
        """A hit passes the constexprs by position: their names must be the signature's tail, in order."""
        expected = tuple(self.kernel.arg_names[n_positional:])
        if tuple(name for name, _ in constexprs) != expected:
            raise TypeError(f"{self.kernel.fn.__name__}: constexprs must be {expected} in this order")

    def _bind_and_launch(self, grid, pointers, integers, floats, constexprs, options):
        self._check_order(len(pointers) + len(integers) + len(floats), constexprs)
        return self.kernel[grid](*pointers, *integers, *floats, **dict(constexprs), **dict(options))


def _tail(integers, floats, constexprs) -> tuple:
    """The launcher's arguments after the pointers."""
    return (*integers, *floats, *[value for _, value in constexprs])


def run(entry: tuple, device: int, grid, pointers, tail: tuple) -> None:
    """Call a compiled kernel's launcher (Triton 3.6's `CompiledKernel.run` convention) on the current
    stream. `pointers` may be tensors or their addresses as integers; `tail` is `_tail(...)`. The entry
    holds the compiled kernel's launcher, function handle and packed metadata, and the stream lookup of
    the driver that compiled it."""
    launcher, function, packed_metadata, current_stream = entry
    launcher(
        grid[0], grid[1], grid[2], current_stream(device), function, packed_metadata, None, None, None,
        *pointers, *tail,
    )  # fmt: skip


class BoundLaunch:
    """`kernel.launch(grid, tensors, integers, floats, constexprs, options)` with everything but the
    tensors fixed at construction; call it with the current device's index (which the caller knows,
    None off CUDA) and the tensors, in the kernel's pointer order.

    The binder guarantees the tensors' dtypes (a plan is built per dtype); their alignment is checked
    on every call, since it is a property of each call's allocations, not of the plan.
    """

    def __init__(self, kernel: CachedKernel, grid, integers, floats, constexprs, options):
        self.kernel = kernel
        self.arguments = (grid, integers, floats, constexprs, options)
        self.tail = _tail(integers, floats, constexprs)
        self.entry = None
        self.compiled_for = None  # (device, debug switch, each address mod 16) of self.entry

    def __call__(self, device: int | None, *tensors) -> None:
        grid, integers, floats, constexprs, options = self.arguments
        if not self.kernel.enabled:
            self.kernel.launch(grid, tensors, integers, floats, constexprs, options)
            return
        runtime = knobs.runtime
        addresses = [tensor.data_ptr() for tensor in tensors]
        now = (device, runtime.debug, [address & 15 for address in addresses])
        if self.entry is not None and now == self.compiled_for and not _hooked(runtime):
            run(self.entry, device, grid, addresses, self.tail)
            return
        self.entry = self.kernel.launch(grid, tensors, integers, floats, constexprs, options)
        self.compiled_for = now if self.entry is not None else None
