"""The portable forward's persistent kernel (core.testing.portable_persistent, off by default) against its
one-tile kernel, in one GPU process: does walking the tiles with a few programs per SM pay, and where?

    python packages/core/benchmarks/portable_persistent_check.py [--quick] [--out DIR]

Rows: the shapes the portable family serves on a Hopper card (the Hopper family takes plain fp16/bf16
D 64 and 128): D 96 and 256, a sliding window, logit softcapping, float32; and plain D 128 for scale.
16k tokens (B = 16384 / N) and H x D = 2048 at N 512 to 8k, causal and not. Each row first checks that
both kernels return the same bits (output and LSE), then times the forward alone (no autograd) in
alternating rounds, so drift between them cancels; TFLOP/s count the visible (query, key) pairs of a
plain causal or full call (attnbench.flops), which for the window rows is an upper bound, so read their
ratio. Results go to DIR/portable_persistent.json; a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from attnbench.flops import forward_flops
from triton.testing import do_bench

import core
import core.testing

TOKENS, WIDTH = 16384, 2048


def rows(quick: bool) -> list[dict]:
    lengths = (512, 2048) if quick else (512, 1024, 2048, 8192)
    variants = [
        {"dtype": "bf16", "d": 128},
        {"dtype": "bf16", "d": 96},
        {"dtype": "bf16", "d": 256},
        {"dtype": "bf16", "d": 128, "window": 256},
        {"dtype": "bf16", "d": 128, "softcap": 30.0},
        {"dtype": "fp32", "d": 64},
    ]
    return [
        variant | {"n": n, "causal": causal}
        for variant in variants
        for n in lengths
        for causal in (True, False)
        if not (quick and variant["dtype"] == "fp32" and n > 512)
    ]


def call(row: dict):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[row["dtype"]]
    batch, heads = max(TOKENS // row["n"], 1), WIDTH // row["d"]
    q, k, v = (torch.randn(batch, heads, row["n"], row["d"], device="cuda", dtype=dtype) for _ in range(3))
    window = (row["window"], 0 if row["causal"] else row["window"]) if "window" in row else (-1, -1)
    options = {"causal": row["causal"], "window_size": window, "softcap": row.get("softcap", 0.0)}

    def forward():
        return core.attention(q, k, v, return_lse=True, **options)

    return forward, forward_flops(batch, heads, row["n"], row["n"], row["d"], row["causal"])


def measure(row: dict, rounds: int) -> dict:
    forward, flops = call(row)
    with core.testing.use_family("portable"), torch.no_grad():
        with core.testing.portable_persistent(False):
            one_tile = forward()
        with core.testing.portable_persistent(True):
            persistent = forward()
        same = all(torch.equal(a, b) for a, b in zip(one_tile, persistent))
        times = {False: [], True: []}
        for _ in range(rounds):
            for mode in (False, True):
                with core.testing.portable_persistent(mode):
                    times[mode].append(do_bench(forward, warmup=10, rep=40, return_mode="median"))
    one_tile_ms, persistent_ms = (statistics.median(times[mode]) for mode in (False, True))
    return row | {
        "same_bits": same,
        "one_tile_tflops": flops / one_tile_ms / 1e9,
        "persistent_tflops": flops / persistent_ms / 1e9,
        "ratio": one_tile_ms / persistent_ms,
    }


def table(results: list[dict], device: str) -> str:
    lines = [
        f"portable forward, TFLOP/s ({device}); ratio: persistent / one-tile speed",
        " dtype   D  feature        N causal | one-tile persistent  ratio | same bits",
    ]
    for r in results:
        feature = (
            f"window {r['window']}"
            if "window" in r
            else f"softcap {r['softcap']:g}"
            if "softcap" in r
            else ""
        )
        lines.append(
            f"{r['dtype']:>6} {r['d']:>3}  {feature:<12} {r['n']:>5} {'yes' if r['causal'] else 'no':>6} |"
            f" {r['one_tile_tflops']:8.0f} {r['persistent_tflops']:10.0f} {r['ratio']:6.2f} |"
            f" {'yes' if r['same_bits'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N 512 and 2k, fewer rounds")
    parser.add_argument("--out", default="results/portable-persistent")
    args = parser.parse_args(argv)
    results = []
    for row in rows(args.quick):
        results.append(measure(row, rounds=2 if args.quick else 3))
        print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "portable_persistent.json").write_text(json.dumps(results, indent=1))
    print(table(results, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
