"""Where the time of a small `core.attention` call goes: host microseconds per call and per stage, a
cProfile of the call, and the kernels' own device time from the profiler (not from events around the
call, which also count the GPU waiting for the host), for descriptor and pointer loads side by side.

    PYTHONPATH=packages/core/src python packages/core/benchmarks/host_profile.py

A repeated call finds its plan (core._plans) and then only allocates and launches; the stages that a
hit skips (validation, building the plan) are timed too, to show what the cache saves.
"""

from __future__ import annotations

import cProfile
import functools
import io
import pstats

import torch
import torch.nn.functional as F
from attnbench.machine import host_us_per_call
from torch.profiler import ProfilerActivity, profile

import core
from core import _launch, _launch_cache, _plans, _runtime, _validation

SHAPES = {"tiny (1, 1, 16, 64)": (1, 1, 16, 16, 64), "decode (8, 16, 1 x 4096, 128)": (8, 16, 1, 4096, 128)}


def host_us(call) -> float:
    """Median host microseconds per call, 9 x 300 calls (the bench's measurement, attnbench.machine)."""
    return host_us_per_call(call, torch.cuda.synchronize, calls=300, repeats=9)


def kernel_us(call, calls: int = 50) -> float:
    """Mean device time of the kernels one call launches, from the profiler's CUDA activity."""
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return sum(event.device_time_total for event in trace.key_averages()) / calls


def inputs(batch, heads, n_queries, n_keys, head_dim, requires_grad=False):
    q = torch.randn(batch, heads, n_queries, head_dim, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(batch, heads, n_keys, head_dim, device="cuda", dtype=torch.float16) for _ in range(2))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def calls_table() -> None:
    """Host and device time per call: with core's choice of loads, then with each one forced."""
    fits, pays_off = _launch.descriptors_fit, _launch.descriptors_pay_off
    variants = {
        "core's choice": (fits, pays_off),
        "descriptors": (lambda *t: True, lambda *sizes: True),
        "pointers": (lambda *t: False, pays_off),
    }
    print(f"{'shape':<32} {'loads':<14} {'host us':>8} {'kernel us':>10} {'SDPA host us':>13}")
    for label, shape in SHAPES.items():
        q, k, v = inputs(*shape)
        sdpa = host_us(functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True))
        for name, (fit_rule, size_rule) in variants.items():
            _launch.descriptors_fit, _launch.descriptors_pay_off = fit_rule, size_rule
            _plans.clear()  # the plans hold the load path they were built with
            call = functools.partial(core.attention, q, k, v)
            print(f"{label:<32} {name:<14} {host_us(call):8.1f} {kernel_us(call):10.1f} {sdpa:13.1f}")
        _launch.descriptors_fit, _launch.descriptors_pay_off = fits, pays_off
        _plans.clear()
    q, k, v = inputs(*SHAPES["tiny (1, 1, 16, 64)"], requires_grad=True)
    grad_call = functools.partial(core.attention, q, k, v)
    sdpa_grad = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    print(f"tiny, inputs requiring grad: core {host_us(grad_call):.1f} us, SDPA {host_us(sdpa_grad):.1f} us")


def stages_table() -> None:
    """Each stage of the tiny call on its own, in the order the call runs them."""
    q, k, v = inputs(*SHAPES["tiny (1, 1, 16, 64)"])
    plan = _plans.forward_plan(q, k, v, True, None, False)
    out, lse, lse_low = plan(q, k, v)
    tensors = (q, k, v, out, lse, lse_low)
    plan(q, k, v)  # the bound launch now holds its compiled kernel
    device = torch.cuda.current_device()
    big = inputs(4, 8, 1024, 1024, 64)  # a call that takes descriptors, for the scratch stages
    big_plan = _plans.forward_plan(*big, True, None, False)
    grid, tail = plan.launch.arguments[0], plan.launch.tail
    addresses = [t.data_ptr() for t in tensors]
    stream = torch.cuda.current_stream().cuda_stream
    stages = {
        "hit: _plans._signature (the key)": functools.partial(_plans._signature, q, k, v, True, None, False),
        "hit: _plans.forward_plan (key + lookup)": functools.partial(
            _plans.forward_plan, q, k, v, True, None, False
        ),
        "hit: plan(q, k, v, keep_statistics=False)": functools.partial(plan, q, k, v, False),
        "hit: plan(q, k, v) (out, LSE, low parts)": functools.partial(plan, q, k, v),
        "  new_buffer(q) (torch.empty_like)": functools.partial(_launch.new_buffer, q),
        "  new_buffer(q, lse shape) (torch.empty)": functools.partial(_launch.new_buffer, q, plan.lse_shape),
        "  install_scratch_allocator (descriptors only)": _runtime.install_scratch_allocator,
        "  _reused_scratch (the allocator)": functools.partial(_runtime._reused_scratch, 256, 128, stream),
        "  of which is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
        "  bound launch (addresses as integers)": functools.partial(plan.launch, device, *tensors),
        "  launcher, tensors as pointers": functools.partial(
            _launch_cache.run, plan.launch.entry, device, grid, tensors, tail
        ),
        "  launcher, addresses as pointers": functools.partial(
            _launch_cache.run, plan.launch.entry, device, grid, addresses, tail
        ),
        "miss: validate_attention_inputs": functools.partial(
            _validation.validate_attention_inputs, q, k, v, True, None, False, False
        ),
        "miss: ForwardPlan(...)": functools.partial(_launch.ForwardPlan, q, k, v, True, 0.125),
        "miss: descriptors_fit(k, v)": functools.partial(_launch.descriptors_fit, k, v),
        "(1024 queries, descriptors) plan(q, k, v, False)": functools.partial(big_plan, *big, False),
    }
    for label, call in stages.items():
        print(f"stage {label:<45} {host_us(call):6.2f} us")


def call_profile() -> None:
    q, k, v = inputs(*SHAPES["tiny (1, 1, 16, 64)"])
    core.attention(q, k, v)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2000):
        core.attention(q, k, v)
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    print(text.getvalue()[-4000:])


if __name__ == "__main__":
    stages_table()  # first: the profiler (kernel_us) leaves the launch path slower for the rest of a process
    call_profile()
    calls_table()
