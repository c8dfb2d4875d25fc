"""Kernel-variant sweep: tile shapes and pointer vs tensor-descriptor loads, timed side by side with
SDPA's FLASH and CUDNN backends in one GPU run (host time per call: host_profile.py).

    PYTHONPATH=packages/core/src python packages/core/benchmarks/sweep.py --out DIR [--budget S]

It is the tool behind the portable family's tile table (docs/perf-notes.md says what each run found).
Every variant's output is checked against FLASH's before it is timed (the bench's 16-ulp rule), so a
variant that computes something else shows as SUSPECT rather than as fast. Results go to
DIR/sweep.json after every row, so a run cut short keeps what it measured; a short table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from attnbench.flops import PASS_FLOP_FACTOR, forward_flops
from attnbench.runner import DTYPES, compare
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import core.testing
from core.testing import portable

KernelConfig = portable.config.KernelConfig

TOKENS, WIDTH = 16384, 2048
SEQ_LENS = (16384, 4096, 1024)

# Forward variants per head dim: (name, config). The first is the table's current choice; "ptr" reads
# K and V with pointer loads, "tma" through tensor descriptors.
FORWARD_VARIANTS = {
    64: [
        ("64x64/4w/4s tma", KernelConfig(64, 64, 4, 4, True)),
        ("64x64/4w/4s ptr", KernelConfig(64, 64, 4, 4, False)),
        ("64x64/4w/3s tma", KernelConfig(64, 64, 4, 3, True)),
        ("64x128/4w/3s tma", KernelConfig(64, 128, 4, 3, True)),
        ("64x32/4w/4s tma", KernelConfig(64, 32, 4, 4, True)),
        ("128x64/4w/4s ptr (old)", KernelConfig(128, 64, 4, 4, False)),
    ],
    128: [
        ("64x64/4w/3s tma", KernelConfig(64, 64, 4, 3, True)),
        ("64x64/4w/3s ptr", KernelConfig(64, 64, 4, 3, False)),
        ("64x64/4w/4s tma", KernelConfig(64, 64, 4, 4, True)),
        ("64x64/4w/2s tma", KernelConfig(64, 64, 4, 2, True)),
        ("64x128/4w/2s tma", KernelConfig(64, 128, 4, 2, True)),
        ("128x64/8w/3s ptr (old)", KernelConfig(128, 64, 8, 3, False)),
    ],
}

# Backward variants per head dim: (name, dK/dV config, dQ config).
BACKWARD_VARIANTS = {
    64: [
        (
            "kv32x128/4w/3s prefetch q64x64/4w/3s tma",
            KernelConfig(32, 128, 4, 3, True, prefetch_row_stats=True),
            KernelConfig(64, 64, 4, 3, True),
        ),
        (
            "kv32x128/4w/2s q64x64/4w/3s tma (old)",
            KernelConfig(32, 128, 4, 2, True),
            KernelConfig(64, 64, 4, 3, True),
        ),
        ("kv64x64/4w/3s tma", KernelConfig(64, 64, 4, 3, True), KernelConfig(64, 64, 4, 3, True)),
        ("kv32x64/4w/3s tma", KernelConfig(32, 64, 4, 3, True), KernelConfig(64, 64, 4, 3, True)),
        ("q64x128/4w/2s tma", KernelConfig(32, 128, 4, 2, True), KernelConfig(64, 128, 4, 2, True)),
        ("q64x32/4w/3s tma", KernelConfig(32, 128, 4, 2, True), KernelConfig(64, 32, 4, 3, True)),
    ],
    128: [
        (
            "kv64x128/8w/3s q128x64/8w/3s tma",
            KernelConfig(64, 128, 8, 3, True),
            KernelConfig(128, 64, 8, 3, True),
        ),
        ("kv64x64/4w/3s tma", KernelConfig(64, 64, 4, 3, True), KernelConfig(128, 64, 8, 3, True)),
        ("kv128x128/8w/2s tma", KernelConfig(128, 128, 8, 2, True), KernelConfig(128, 64, 8, 3, True)),
        ("q64x64/4w/3s tma", KernelConfig(64, 128, 8, 3, True), KernelConfig(64, 64, 4, 3, True)),
        ("q128x128/8w/2s tma", KernelConfig(64, 128, 8, 3, True), KernelConfig(128, 128, 8, 2, True)),
    ],
}


# D = 256, causal (the table's entries first), and the non-causal D = 64 backward.
FORWARD_VARIANTS_256 = [
    ("128x64/8w/2s tma", KernelConfig(128, 64, 8, 2, True)),
    ("128x64/8w/2s ptr", KernelConfig(128, 64, 8, 2, False)),
    ("64x64/4w/2s tma", KernelConfig(64, 64, 4, 2, True)),
    ("64x64/8w/2s tma", KernelConfig(64, 64, 8, 2, True)),
    ("64x32/4w/3s tma", KernelConfig(64, 32, 4, 3, True)),
    ("128x32/8w/3s tma", KernelConfig(128, 32, 8, 3, True)),
]
BACKWARD_VARIANTS_256 = [
    ("kv64x64/8w/2s q128x32/8w/3s tma", KernelConfig(64, 64, 8, 2, True), KernelConfig(128, 32, 8, 3, True)),
    ("same ptr", KernelConfig(64, 64, 8, 2, False), KernelConfig(128, 32, 8, 3, False)),
    ("kv32x64/4w/2s tma", KernelConfig(32, 64, 4, 2, True), KernelConfig(128, 32, 8, 3, True)),
    ("kv64x32/4w/2s tma", KernelConfig(64, 32, 4, 2, True), KernelConfig(128, 32, 8, 3, True)),
    ("kv32x128/8w/1s tma", KernelConfig(32, 128, 8, 1, True), KernelConfig(128, 32, 8, 3, True)),
    ("q64x32/4w/3s tma", KernelConfig(64, 64, 8, 2, True), KernelConfig(64, 32, 4, 3, True)),
    ("q64x64/8w/2s tma", KernelConfig(64, 64, 8, 2, True), KernelConfig(64, 64, 8, 2, True)),
]
# The dK/dV kernel's tiles once whole query blocks load their row statistics unmasked (the table's first).
DKDV_VARIANTS = {
    64: [
        ("kv32x128/4w/3s prefetch", KernelConfig(32, 128, 4, 3, True, prefetch_row_stats=True)),
        ("kv32x128/4w/3s", KernelConfig(32, 128, 4, 3, True)),
        ("kv64x64/4w/3s", KernelConfig(64, 64, 4, 3, True)),
        ("kv64x64/4w/4s", KernelConfig(64, 64, 4, 4, True)),
        ("kv64x128/8w/3s", KernelConfig(64, 128, 8, 3, True)),
        ("kv64x128/8w/3s prefetch", KernelConfig(64, 128, 8, 3, True, prefetch_row_stats=True)),
    ],
    128: [
        ("kv64x128/8w/3s", KernelConfig(64, 128, 8, 3, True)),
        ("kv64x128/8w/4s", KernelConfig(64, 128, 8, 4, True)),
        ("kv64x128/8w/2s", KernelConfig(64, 128, 8, 2, True)),
        ("kv32x128/8w/3s", KernelConfig(32, 128, 8, 3, True)),
    ],
}
DQ_OF_TABLE = {64: KernelConfig(64, 64, 4, 3, True), 128: KernelConfig(128, 64, 8, 3, True)}
BACKWARD_VARIANTS_FULL_64 = [
    ("kv32x128/4w/2s q64x64/4w/3s tma", KernelConfig(32, 128, 4, 2, True), KernelConfig(64, 64, 4, 3, True)),
    ("kv64x128/8w/2s tma", KernelConfig(64, 128, 8, 2, True), KernelConfig(64, 64, 4, 3, True)),
    ("kv32x128/4w/3s tma", KernelConfig(32, 128, 4, 3, True), KernelConfig(64, 64, 4, 3, True)),
    ("kv64x64/4w/3s tma", KernelConfig(64, 64, 4, 3, True), KernelConfig(64, 64, 4, 3, True)),
    ("q128x64/8w/3s tma", KernelConfig(32, 128, 4, 2, True), KernelConfig(128, 64, 8, 3, True)),
]


class Sweep:
    def __init__(self, out_dir: Path, budget_s: float):
        self.path = out_dir / "sweep.json"
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.results: dict = {
            "card": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "rows": [],
        }
        import triton

        self.results["triton"] = triton.__version__

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > self.budget_s

    def add(self, row: dict) -> None:
        row["t_s"] = round(time.monotonic() - self.started, 1)
        self.results["rows"].append(row)
        self.path.write_text(json.dumps(self.results, indent=1))
        print(json.dumps(row), flush=True)


def time_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def problem(dtype: torch.dtype, d: int, n: int, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = (max(1, TOKENS // n), WIDTH // d, n, d)
    q, k, v, dout = (torch.randn(shape, generator=generator, device="cuda", dtype=dtype) for _ in range(4))
    return q, k, v, dout


def suspect(output: torch.Tensor, reference: torch.Tensor, dtype_name: str) -> bool:
    """The bench's check (attnbench.runner.compare): more than 16 ulps of the largest output apart."""
    return compare(output, reference, dtype_name)["suspect"]


def sdpa_times(q, k, v, dout, backend, causal: bool) -> tuple[torch.Tensor, float, float]:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
        forward = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        backward = do_bench(
            lambda: out.backward(dout, retain_graph=True),
            warmup=10,
            rep=40,
            grad_to_none=leaves,
            return_mode="median",
        )
    return out.detach(), forward, backward


def sweep_forward(sweep: Sweep, dtype_name: str, d: int, variants, causal: bool = True) -> None:
    dtype = DTYPES[dtype_name]
    scale = 1.0 / math.sqrt(d)
    for n in SEQ_LENS:
        q, k, v, dout = problem(dtype, d, n)
        flops = forward_flops(q.shape[0], q.shape[1], n, n, d, causal)
        reference, flash_fwd, flash_bwd = sdpa_times(q, k, v, dout, SDPBackend.FLASH_ATTENTION, causal)
        _, cudnn_fwd, cudnn_bwd = sdpa_times(q, k, v, dout, SDPBackend.CUDNN_ATTENTION, causal)
        base = {"pass": "fwd", "dtype": dtype_name, "d": d, "n": n, "causal": causal}
        sweep.add({**base, "variant": "FA2", "tflops": flops / flash_fwd / 1e9})
        sweep.add({**base, "variant": "cuDNN", "tflops": flops / cudnn_fwd / 1e9})
        backward_flops = PASS_FLOP_FACTOR["bwd"] * flops
        sweep.add({**base | {"pass": "bwd"}, "variant": "FA2", "tflops": backward_flops / flash_bwd / 1e9})
        sweep.add({**base | {"pass": "bwd"}, "variant": "cuDNN", "tflops": backward_flops / cudnn_bwd / 1e9})
        for name, config in variants:
            if sweep.out_of_time():
                return
            try:
                forward = functools.partial(
                    core.testing.forward, q, k, v, causal=causal, sm_scale=scale, config=config
                )
                out = forward()[0]
                torch.cuda.synchronize()
                milliseconds = time_ms(forward)
                row = {"tflops": flops / milliseconds / 1e9, "suspect": suspect(out, reference, dtype_name)}
            except Exception as failure:  # a variant that does not compile is a result too
                row = {"error": f"{type(failure).__name__}: {str(failure)[:300]}"}
            sweep.add({**base, "variant": name, **row})


def sweep_backward(sweep: Sweep, dtype_name: str, d: int, variants, causal: bool = True) -> None:
    dtype = DTYPES[dtype_name]
    scale = 1.0 / math.sqrt(d)
    for n in SEQ_LENS:
        q, k, v, dout = problem(dtype, d, n)
        flops = PASS_FLOP_FACTOR["bwd"] * forward_flops(q.shape[0], q.shape[1], n, n, d, causal)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            F.scaled_dot_product_attention(*leaves, is_causal=causal).backward(dout)
            reference = [t.grad for t in leaves]
        out, lse, lse_low = core.testing.forward(q, k, v, causal=causal, sm_scale=scale)
        base = {"pass": "bwd", "dtype": dtype_name, "d": d, "n": n, "causal": causal}
        for name, dkdv, dq in variants:
            if sweep.out_of_time():
                return
            portable.config.backward_configs = lambda *_, pair=(dkdv, dq): pair
            backward = functools.partial(
                core.testing.backward, dout, None, q, k, v, out, lse, lse_low, causal=causal, sm_scale=scale
            )
            try:
                grads = backward()
                torch.cuda.synchronize()
                bad = any(suspect(g, r, dtype_name) for g, r in zip(grads, reference))
                row = {"tflops": flops / time_ms(backward) / 1e9, "suspect": bad}
            except Exception as failure:
                row = {"error": f"{type(failure).__name__}: {str(failure)[:300]}"}
            sweep.add({**base, "variant": name, **row})


def summary(results: dict) -> str:
    lines = [f"{results['card']}, torch {results['torch']}, triton {results['triton']}"]
    for row in results["rows"]:
        value = f"{row['tflops']:6.1f}" if "tflops" in row else "   n/a"
        flag = " SUSPECT" if row.get("suspect") else ""
        error = f" {row['error'][:70]}" if "error" in row else ""
        masking = "causal" if row.get("causal", True) else "full"
        lines.append(
            f"{row['pass']} {masking} {row['dtype']} d{row['d']} n{row['n']:>5} {row['variant']:<30} "
            f"{value}{flag}{error}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds before the sweep stops")
    parser.add_argument("--bf16-variants", type=int, default=3, help="forward variants repeated in bf16")
    parser.add_argument("--plan", choices=("main", "d256", "dkdv"), default="main",
                        help="main: causal D 64/128; d256: causal D 256 and the "
                        "non-causal D 64 backward; dkdv: the dK/dV kernel's tiles (bf16)")  # fmt: skip
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(args.out, args.budget)
    if args.plan == "dkdv":
        for d in (128, 64):
            variants = [(name, dkdv, DQ_OF_TABLE[d]) for name, dkdv in DKDV_VARIANTS[d]]
            sweep_backward(sweep, "bf16", d, variants)
    elif args.plan == "d256":
        sweep_backward(sweep, "fp16", 256, BACKWARD_VARIANTS_256)
        sweep_forward(sweep, "fp16", 256, FORWARD_VARIANTS_256)
        sweep_backward(sweep, "fp16", 64, BACKWARD_VARIANTS_FULL_64, causal=False)
    else:
        for d in (128, 64):
            sweep_forward(sweep, "fp16", d, FORWARD_VARIANTS[d])
        for d in (128, 64):
            sweep_backward(sweep, "fp16", d, BACKWARD_VARIANTS[d])
        for d in (128, 64):
            sweep_forward(sweep, "bf16", d, FORWARD_VARIANTS[d][: args.bf16_variants])
    sweep.path.write_text(json.dumps(sweep.results, indent=1))
    print(summary(sweep.results))


if __name__ == "__main__":
    main()
