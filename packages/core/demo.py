"""Compute attention on a default problem, check it against float64 and print error and time.

    python packages/core/demo.py            # GPU if there is one, else the Triton interpreter on CPU

On CPU the problem is small (the interpreter executes the kernel in numpy); on a GPU it is a realistic
causal bf16 problem.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede `import core`

import core  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = (4, 16, 4096, 128) if ON_GPU else (1, 2, 128, 64)
    parser.add_argument("--shape", type=int, nargs=4, default=default, metavar=("B", "H", "N", "D"))
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--non-causal", action="store_true")
    args = parser.parse_args()

    batch, heads, n, head_dim = args.shape
    dtype, causal = getattr(torch, args.dtype), not args.non_causal
    device = "cuda" if ON_GPU else "cpu"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(device, dtype) for _ in range(3))

    core.attention(q, k, v, causal=causal)  # compile (GPU) / warm up before timing
    if ON_GPU:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = core.attention(q, k, v, causal=causal)
    if ON_GPU:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    truth = core.attention_reference(q, k, v, causal=causal)
    eager = core.attention_reference(q, k, v, causal=causal, compute_dtype=None)
    verdict = core.tolerance.judge("out", out, truth, eager)
    flops = 4 * batch * heads * n * n * head_dim / (2 if causal else 1)
    where = torch.cuda.get_device_name() if ON_GPU else "CPU, Triton interpreter"
    print(f"core.attention  B={batch} H={heads} N={n} D={head_dim} {args.dtype} causal={causal}  on {where}")
    print(f"max |out - float64|      {verdict.error:.3e}")
    print(f"eager {args.dtype:<9} error    {verdict.eager_error:.3e}   (policy bound {verdict.bound:.3e})")
    print(f"time {seconds * 1e3:9.3f} ms  ({flops / seconds / 1e12:.2f} TFLOP/s)")
    print("PASS" if verdict.ok else "FAIL")
    raise SystemExit(0 if verdict.ok else 1)


if __name__ == "__main__":
    main()
