"""Relaunch a compiled kernel without Triton's per-call argument binding.

`kernel[grid](*args)` works out the kernel's specialisation on every call: it binds ~30 arguments,
classifies each one (a pointer's dtype and 16-byte alignment, an integer's value being 1 or a multiple
of 16, its width) and hashes the result to find the compiled kernel. On the H100 machine's host that
costs ~30 us per launch, more than the launch itself (docs/perf-notes.md, "Host overhead"). A model calls
attention with the same shapes and strides step after step, so `CachedKernel` remembers the compiled
kernel under a key that pins everything the specialisation reads:

- every integer argument's exact value (strides, head counts, lengths), so "== 1", "% 16" and the
  integer width are the same as on the call that compiled it;
- every pointer's dtype and its address mod 16;
- the constexprs and launch options, the current device and Triton's debug switch.

Floating-point arguments are never specialised, so they are not in the key. A hit calls the compiled
kernel's launcher directly, on the current stream (so CUDA graph capture works as before); a miss goes
through `kernel[grid]` and stores what it returns.

The direct call uses Triton's `CompiledKernel.run` calling convention, which is internal: it is used only
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

    def launch(self, grid, pointers, integers, floats, constexprs, options) -> None:
        runtime = knobs.runtime
        # Triton 3.6's hooks are HookChains, never None: empty unless a profiler added a hook.
        if not self.enabled or runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls:
            self._bind_and_launch(grid, pointers, integers, floats, constexprs, options)
            return
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
            self.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata)
            return
        run, function, packed_metadata = entry
        stream = driver.active.get_current_stream(device)
        constexpr_values = [value for _, value in constexprs]
        run(
            grid[0], grid[1], grid[2], stream, function, packed_metadata, None, None, None,
            *pointers, *integers, *floats, *constexpr_values,
        )  # fmt: skip

    def _check_order(self, n_positional: int, constexprs) -> None:
        """A hit passes the constexprs by position: their names must be the signature's tail, in order."""
        expected = tuple(self.kernel.arg_names[n_positional:])
        if tuple(name for name, _ in constexprs) != expected:
            raise TypeError(f"{self.kernel.fn.__name__}: constexprs must be {expected} in this order")

    def _bind_and_launch(self, grid, pointers, integers, floats, constexprs, options):
        self._check_order(len(pointers) + len(integers) + len(floats), constexprs)
        return self.kernel[grid](*pointers, *integers, *floats, **dict(constexprs), **dict(options))
