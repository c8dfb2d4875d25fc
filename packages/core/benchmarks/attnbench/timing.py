"""Timers: a call in, its median time in milliseconds out.

On the GPU this is `triton.testing.do_bench`: the L2 cache is flushed before every timed call, calls
are timed with CUDA events, and the median is kept (robust to the odd slow call). `grad_to_none`
resets `.grad` of the inputs before each call, so a backward pass always writes fresh gradients
instead of also accumulating into old ones. On a CPU (`--dry-run`) a plain wall-clock timer stands in:
its numbers mean nothing, it only lets the harness run end to end.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


class DeviceTimer:
    def __init__(self, warmup_ms: int, rep_ms: int):
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms

    def describe(self) -> dict:
        return {
            "kind": "triton.testing.do_bench, median, L2 flushed per call",
            "warmup_ms": self.warmup_ms,
            "rep_ms": self.rep_ms,
        }

    def __call__(self, fn: Callable[[], object], grad_to_none: Sequence = ()) -> float:
        from triton.testing import do_bench

        return do_bench(
            fn,
            warmup=self.warmup_ms,
            rep=self.rep_ms,
            grad_to_none=list(grad_to_none) or None,
            return_mode="median",
        )


class HostTimer:
    def __init__(self, repeats: int = 2):
        self.repeats = repeats

    def describe(self) -> dict:
        return {"kind": "host wall clock (dry run: meaningless numbers)", "repeats": self.repeats}

    def __call__(self, fn: Callable[[], object], grad_to_none: Sequence = ()) -> float:
        samples = []
        for _ in range(self.repeats):
            for tensor in grad_to_none:
                tensor.grad = None
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1e3)
        return statistics.median(samples)
