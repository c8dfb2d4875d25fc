"""What the Delta pass costs: core's backward with plans.PreciseDelta on and off, side by side in one process
(each setting timed twice, interleaved; the faster of the two kept).

    python packages/core/benchmarks/precise_delta_ab.py        # on a GPU; prints one line per shape

bf16, H 16, causal and not; ms per backward (torch.autograd.grad on a kept graph) and TFLOP/s counted as
2.5x the forward's visible flops.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

import core
import core.testing

SHAPES = [(4, 16, 4096, 128, True), (2, 16, 8192, 128, False), (8, 16, 2048, 64, True)]  # B, H, N, D, causal


def backward_ms(q, k, v, grad, causal: bool) -> float:
    out = core.attention(q, k, v, causal=causal)
    return do_bench(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), warmup=25, rep=150)


def main() -> None:
    for batch, heads, n, head_dim, causal in SHAPES:
        q, k, v = (
            torch.randn(batch, heads, n, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn_like(q)
        times: dict[bool, list[float]] = {True: [], False: []}
        for enabled in (True, False, True, False):
            with core.testing.precise_delta(enabled):
                times[enabled].append(backward_ms(q, k, v, grad, causal))
        on, off = min(times[True]), min(times[False])
        flops = 2.5 * 4 * batch * heads * n * n * head_dim * (0.5 if causal else 1.0)
        print(
            f"B{batch} H{heads} N{n} D{head_dim} {'causal' if causal else 'full'}: backward {on:.3f} ms with"
            f" the pass ({flops / on / 1e9:.0f} TFLOP/s), {off:.3f} without ({flops / off / 1e9:.0f}):"
            f" {on / off:.3f}x",
            flush=True,
        )
    print(torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
