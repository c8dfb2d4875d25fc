"""The machine: what card and software ran, the card's ceilings, and core's host-side overhead.

The ceilings are measured in the same run as the attention numbers so that every ratio in the report
can be read against what this card actually delivered that day: a large bf16 matmul (the tensor-core
peak an attention kernel can approach) and a large device-to-device copy (the memory bandwidth that
decode-like shapes are bound by; read and write both counted).
"""

from __future__ import annotations

import platform
import re
import statistics
import time

import torch
import torch.nn.functional as F

from attnbench.providers import ProviderError, explained_failures

TINY_SHAPE = (1, 1, 16, 64)
HOST_TARGET_US = 20


def describe_machine(device: str) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info["card"] = properties.name
        info["sm_count"] = properties.multi_processor_count
        info["memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["card"] = f"cpu {platform.machine()}"
    info["card_slug"] = re.sub(r"[^a-z0-9]+", "-", info["card"].lower()).strip("-")
    return info


def guarded(measure) -> dict:
    """Run one measurement; a failure becomes {"error": reason} instead of ending the run."""
    try:
        with explained_failures():
            return measure()
    except ProviderError as failure:
        return {"error": str(failure)}


def measure_ceilings(timer, device: str, matmul_size: int, copy_bytes: int) -> dict:
    def matmul() -> dict:
        a, b = (torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16) for _ in range(2))
        product = torch.empty_like(a)
        milliseconds = timer(lambda: torch.matmul(a, b, out=product))
        return {"size": matmul_size, "tflops": 2 * matmul_size**3 / milliseconds / 1e9}

    def copy() -> dict:
        source = torch.empty(copy_bytes, device=device, dtype=torch.uint8)
        target = torch.empty_like(source)
        milliseconds = timer(lambda: target.copy_(source))
        return {"bytes": copy_bytes, "gbps": 2 * copy_bytes / milliseconds / 1e6}

    return {"matmul_bf16": guarded(matmul), "copy": guarded(copy)}


def host_us_per_call(call, synchronize, calls: int, repeats: int) -> float:
    """Median host time of one call, the GPU left to run behind (a first call compiles outside it).

    `calls` stays well under the launch queue's depth, so the host never waits for the GPU.
    """
    call()
    synchronize()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - started) / calls * 1e6)
        synchronize()
    return statistics.median(samples)


def measure_host_overhead(attention, device: str, calls: int, repeats: int) -> dict:
    """Host microseconds per call of core on a tiny problem, with SDPA's as the yardstick."""
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    q, k, v = (torch.randn(TINY_SHAPE, device=device, dtype=torch.float16) for _ in range(3))
    q_grad, k_grad, v_grad = (x.clone().requires_grad_() for x in (q, k, v))

    def per_call(call) -> dict:
        return {"us": host_us_per_call(call, synchronize, calls, repeats)}

    return {
        "shape": list(TINY_SHAPE),
        "dtype": "fp16",
        "target_us": HOST_TARGET_US,
        "core": guarded(lambda: per_call(lambda: attention(q, k, v, causal=True))),
        "core_requires_grad": guarded(
            lambda: per_call(lambda: attention(q_grad, k_grad, v_grad, causal=True))
        ),
        "sdpa": guarded(lambda: per_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))),
    }


def check_cuda_graph(attention, calls: int, repeats: int) -> dict:
    """Capture one core call in a CUDA graph, replay it on new input values, compare with eager."""

    def capture_and_replay() -> dict:
        q, k, v = (torch.randn(TINY_SHAPE, device="cuda", dtype=torch.float16) for _ in range(3))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiling and autotuning must happen before the capture
            for _ in range(3):
                attention(q, k, v, causal=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = attention(q, k, v, causal=True)
        for tensor in (q, k, v):
            tensor.copy_(torch.randn_like(tensor))
        graph.replay()
        torch.cuda.synchronize()
        difference = (captured.float() - attention(q, k, v, causal=True).float()).abs().max().item()
        replay_us = host_us_per_call(graph.replay, torch.cuda.synchronize, calls, repeats)
        return {"captured": True, "replay_max_abs_diff": difference, "replay_us": replay_us}

    result = guarded(capture_and_replay)
    result.setdefault("captured", False)
    return result
