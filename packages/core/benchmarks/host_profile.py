"""Where the time of a small `core.attention` call goes: host microseconds per stage, a cProfile of the
call, and the kernels' own device time from the profiler (not from events around the call, which also
count the GPU waiting for the host), for descriptor and pointer loads side by side.

    PYTHONPATH=packages/core/src python packages/core/benchmarks/host_profile.py
"""

from __future__ import annotations

import cProfile
import dataclasses
import functools
import io
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import core
from core import _config, _launch, _runtime

SHAPES = {"tiny (1, 1, 16, 64)": (1, 1, 16, 16, 64), "decode (8, 16, 1 x 4096, 128)": (8, 16, 1, 4096, 128)}


def host_us(call, calls: int = 300, repeats: int = 7) -> float:
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - started) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def kernel_us(call, calls: int = 50) -> float:
    """Mean device time of the kernels one call launches, from the profiler's CUDA activity."""
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return sum(event.device_time_total for event in trace.key_averages()) / calls


def inputs(batch, heads, n_queries, n_keys, head_dim):
    q = torch.randn(batch, heads, n_queries, head_dim, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(batch, heads, n_keys, head_dim, device="cuda", dtype=torch.float16) for _ in range(2))
    return q, k, v


def main() -> None:
    table = _config.forward_config
    rows = []
    for label, shape in SHAPES.items():
        q, k, v = inputs(*shape)
        config = table(_config.padded_head_dim(shape[-1]), torch.float16, False)
        for variant in (config, dataclasses.replace(config, descriptors=False)):
            _config.forward_config = lambda *_, c=variant: c
            call = functools.partial(core.attention, q, k, v)
            name = "descriptors" if variant.descriptors else "pointers"
            rows.append((label, name, host_us(call), kernel_us(call)))
        _config.forward_config = table
    print(f"{'shape':<32} {'loads':<12} {'host us':>8} {'kernel us':>10}")
    for label, name, host, kernel in rows:
        print(f"{label:<32} {name:<12} {host:8.1f} {kernel:10.1f}")

    q, k, v = inputs(*SHAPES["tiny (1, 1, 16, 64)"])
    stream = torch.cuda.current_stream().cuda_stream
    for label, call in {
        "descriptors_fit(k, v)": functools.partial(_launch.descriptors_fit, k, v),
        "is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
        "_reused_scratch(256)": functools.partial(_runtime._reused_scratch, 256, 128, stream),
        "install_scratch_allocator": _runtime.install_scratch_allocator,
    }.items():
        print(f"stage {label:<30} {host_us(call):6.2f} us")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2000):
        core.attention(q, k, v)
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    print(text.getvalue()[-5000:])


if __name__ == "__main__":
    main()
