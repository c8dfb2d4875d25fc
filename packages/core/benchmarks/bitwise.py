"""Bitwise A/B: the working tree's core against a baseline copy of core (ab.load_baseline), on the same
inputs: the output, the LSE, the three gradients (with a loss on the LSE too) and the no-grad output of
every case of a fixed grid (fp16/bf16/fp32, causal and not, MHA/GQA/MQA, Nq != Nk, odd lengths, D not a
power of two, BSHD views), compared with torch.equal. It runs where core runs: on the GPU, or on the CPU
under TRITON_INTERPRET=1. A change that claims unchanged results shows every case equal; a difference is
printed with its largest absolute size and both sides' largest error against float64. `--family NAME`
forces the working tree's family, to tell a kernel change from a change of which family takes a call.

    TRITON_INTERPRET=1 python packages/core/benchmarks/run.py bitwise --baseline .ab/packages/core/src/core

Exit status 1 when any case differs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
from pathlib import Path

import torch
from ab import load_baseline

import core
import core.testing

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (B, Hq, Hkv, Nq, Nk, D)
SHAPES = ((1, 2, 2, 33, 33, 16), (2, 4, 2, 17, 40, 24), (1, 3, 1, 64, 48, 64), (1, 2, 1, 1, 29, 8))
LAYOUTS = ("bhsd", "bshd")
RESULTS = ("out", "lse", "dq", "dk", "dv", "no-grad out")


def cases(quick: bool):
    grid = itertools.product(DTYPES, (True, False), SHAPES, LAYOUTS)
    return list(grid)[:: 12 if quick else 1]


def inputs(seed: int, dtype, shape, layout: str, device: str):
    batch, q_heads, kv_heads, n_queries, n_keys, head_dim = shape
    generator = torch.Generator().manual_seed(seed)

    def draw(heads, n):
        if layout == "bhsd":
            x = torch.randn(batch, heads, n, head_dim, generator=generator)
        else:  # (B, N, H, D) storage read through its (B, H, N, D) view
            x = torch.randn(batch, n, heads, head_dim, generator=generator).transpose(1, 2)
        return x.to(device=device, dtype=dtype)

    q, k, v = draw(q_heads, n_queries), draw(kv_heads, n_keys), draw(kv_heads, n_keys)
    dout = torch.randn(q.shape, generator=generator).to(device=device, dtype=dtype)
    dlse = torch.randn(q.shape[:-1], generator=generator).to(device)
    return q, k, v, dout, dlse


def results(package, q, k, v, dout, dlse, causal: bool) -> list[torch.Tensor]:
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = package.attention(q, k, v, causal=causal, return_lse=True)
    torch.autograd.backward([out, lse], [dout, dlse])
    with torch.no_grad():
        no_grad_out = package.attention(q, k, v, causal=causal)
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad, no_grad_out]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, required=True, help="a copy of packages/core/src/core")
    parser.add_argument("--quick", action="store_true", help="every 12th case of the grid")
    parser.add_argument(
        "--family", help="force the working tree's kernel family (core.testing.families()), strictly"
    )
    args = parser.parse_args(argv)
    device = "cpu" if core.testing.is_interpreted() else "cuda"
    baseline = load_baseline(args.baseline)
    grid = cases(args.quick)
    equal = 0
    for seed, (dtype, causal, shape, layout) in enumerate(grid):
        q, k, v, dout, dlse = inputs(seed, dtype, shape, layout, device)
        with core.testing.use_family(args.family, strict=True) if args.family else contextlib.nullcontext():
            ours = results(core, q, k, v, dout, dlse, causal)
        theirs = results(baseline, q, k, v, dout, dlse, causal)
        same = [torch.equal(a, b) for a, b in zip(ours, theirs)]
        equal += all(same)
        if not all(same):
            truth = core.attention_reference(q.double(), k.double(), v.double(), causal=causal)
            errors = [(out.double() - truth).abs().max().item() for out in (ours[0], theirs[0])]
            differences = ", ".join(
                f"{name} by {(a.double() - b.double()).abs().max().item():.3g}"
                for name, a, b, s in zip(RESULTS, ours, theirs, same)
                if not s
            )
            print(
                f"differs: {dtype} causal={causal} (B, Hq, Hkv, Nq, Nk, D)={shape} {layout}: {differences}; "
                f"largest output error vs float64: ours {errors[0]:.3g}, baseline {errors[1]:.3g}"
            )
    print(
        f"{equal}/{len(grid)} cases bitwise equal ({', '.join(RESULTS)}) on {device}, "
        f"baseline {args.baseline}"
    )
    if equal != len(grid):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
