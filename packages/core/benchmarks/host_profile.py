"""Where the time of a small `core.attention` call goes: host microseconds per call for every route a
call can take, side by side with SDPA in one loop, a cProfile of the eager call, and the kernels' own
device time from the profiler (not from events around the call, which also count the GPU waiting for
the host), for descriptor and pointer loads.

    python packages/core/benchmarks/run.py host [--baseline DIR]      # or: nox -s bench -- host

--baseline DIR (a copy of packages/core/src/core from another commit, as ab.py takes) adds that
version's eager routes to the same loop, for a before/after from one host.

Routes: eager without autograd (the cached plan straight to the kernels), eager with inputs that
require grad (core.ops.EagerAttention, the plan under an autograd.Function), the op called directly, a
torch.compile'd function, the host cache switched off (core.testing.host_cache), and a CUDA graph
replay. Then single-token decode steps (core.attention_with_kvcache against SDPA): where a step's host
time exceeds its kernels' device time, an eager decode loop runs at the host's pace.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from attnbench.machine import host_us_per_call
from torch.profiler import ProfilerActivity, profile

import core
import core.testing

SHAPES = {"tiny (1, 1, 16, 64)": (1, 1, 16, 16, 64), "decode (8, 16, 1 x 4096, 128)": (8, 16, 1, 4096, 128)}
TINY = SHAPES["tiny (1, 1, 16, 64)"]


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


def graph_replay(call):
    """A CUDA graph of one call, and its replay."""
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def routes_table(baseline=None) -> list[tuple[str, float]]:
    """Host us per call of each route on the tiny problem, every route in one loop (so one host's noise)."""
    q, k, v = inputs(*TINY)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    scale = 1.0 / 8.0
    compiled = torch.compile(functools.partial(core.attention, causal=True), fullgraph=True)
    compiled_sdpa = torch.compile(
        functools.partial(F.scaled_dot_product_attention, is_causal=True), fullgraph=True
    )

    def uncached():
        with core.testing.host_cache(False):
            core.attention(q, k, v)

    routes = {
        "core eager, no grad (plan -> kernels)": functools.partial(core.attention, q, k, v),
        "core eager, inputs require grad (autograd.Function)": functools.partial(core.attention, qg, kg, vg),
        "torch.ops.core.attention_forward (dispatcher)": functools.partial(
            torch.ops.core.attention_forward, q, k, v, True, scale
        ),
        "core under torch.compile (fullgraph)": functools.partial(compiled, q, k, v),
        "core, host cache off": uncached,
        "core eager, CUDA graph replay": graph_replay(functools.partial(core.attention, q, k, v)),
        "SDPA eager, no grad": functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True),
        "SDPA eager, inputs require grad": functools.partial(
            F.scaled_dot_product_attention, qg, kg, vg, is_causal=True
        ),
        "SDPA under torch.compile (fullgraph)": functools.partial(compiled_sdpa, q, k, v),
    }
    if baseline is not None:
        routes["baseline eager, no grad"] = functools.partial(baseline.attention, q, k, v)
        routes["baseline eager, inputs require grad"] = functools.partial(baseline.attention, qg, kg, vg)
    samples = {label: [] for label in routes}
    for _ in range(3):  # interleaved rounds: a slow stretch of the host hits every route alike
        for label, call in routes.items():
            samples[label].append(host_us(call))
    return [(label, min(values)) for label, values in samples.items()]


def loads_table() -> None:
    """Host and device time per call with core's choice of loads, then with each one forced."""
    plans = core.testing.portable.plans
    fits, pays_off = plans.descriptors_fit, plans.descriptors_pay_off
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
            plans.descriptors_fit, plans.descriptors_pay_off = fit_rule, size_rule
            core.testing.clear_plans()  # the plans hold the load path they were built with
            call = functools.partial(core.attention, q, k, v)
            print(f"{label:<32} {name:<14} {host_us(call):8.1f} {kernel_us(call):10.1f} {sdpa:13.1f}")
        plans.descriptors_fit, plans.descriptors_pay_off = fits, pays_off
        core.testing.clear_plans()


# (B, Hq, Hkv, cached keys, D): the decode benchmark's rows furthest below and at the copy ceiling
DECODE_STEPS = {
    "B1 GQA 32/8, 8k keys, D 128": (1, 32, 8, 8192, 128),
    "B8 MHA 16, 4k keys, D 128": (8, 16, 16, 4096, 128),
}


def decode_table() -> None:
    """Host and device microseconds of one new token's attention against a dense fp16 cache."""
    columns = ("host us", "kernel us", "SDPA host us", "SDPA kernel us")
    print(f"\n{'decode step':<32} " + " ".join(f"{name:>14}" for name in columns))
    for label, (batch, q_heads, kv_heads, n_keys, head_dim) in DECODE_STEPS.items():
        q = torch.randn(batch, q_heads, 1, head_dim, device="cuda", dtype=torch.float16)
        k_cache, v_cache = (
            torch.randn(batch, kv_heads, n_keys, head_dim, device="cuda", dtype=torch.float16)
            for _ in range(2)
        )
        step = functools.partial(core.attention_with_kvcache, q, k_cache, v_cache, cache_seqlens=n_keys)
        sdpa = functools.partial(F.scaled_dot_product_attention, q, k_cache, v_cache, enable_gqa=True)
        times = (host_us(step), kernel_us(step), host_us(sdpa), kernel_us(sdpa))
        print(f"{label:<32} " + " ".join(f"{value:14.1f}" for value in times))


def call_profile() -> None:
    q, k, v = inputs(*TINY)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, help="a copy of packages/core/src/core to time beside core")
    args = parser.parse_args(argv)
    baseline = None
    if args.baseline is not None:
        from ab import load_baseline

        baseline = load_baseline(args.baseline)
    # First: the profiler (kernel_us) leaves the launch path slower for the rest of a process.
    rows = routes_table(baseline)
    call_profile()
    loads_table()
    decode_table()
    print("\nhost us per call (best of 3 interleaved rounds, each the median of 9 x 300 calls),")
    print(f"tiny fp16 (1, 1, 16, 64) causal forward, {torch.cuda.get_device_name()}:")
    for label, us in rows:
        print(f"  {label:<50} {us:7.1f} us")


if __name__ == "__main__":
    main(sys.argv[1:])
