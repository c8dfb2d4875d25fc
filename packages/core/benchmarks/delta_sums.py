"""What does each way of summing the Delta pass's products cost, and how accurate is it? The pass (the dQ
kernel's, docs/perf-notes.md "the Delta pass") computes S and dP for every key block, P = exp2(S - LSE),
and sums P dP over the keys of each query row. The sum is the question: each score's float32 -> float64
conversion issues on the exp's pipe, so the float64 sums weigh on the pass like a second exp (their cost
on an H100: docs/log/perf.md). This times the pass's loop alone, non-causal, with each summation:

- float32: tl.sum of the products in float32 (core's earlier pass; not accurate enough);
- float64: each product split by an FMA into its rounding and that rounding's error, the roundings summed
  in float64 and the errors in float32, per key block (core's pass now);
- float64 tiles: the same products converted and added into a float64 tile, reduced to the rows once after
  the loop (the conversions stay, the per-block row reductions go);
- twosum tiles: no float64 in the loop: each product added into a float32 tile by TwoSum, the sums' and
  products' errors added into a second float32 tile, both reduced to the rows in float64 after the loop;
- renormalized tiles: the same with the pair renormalized after every addition (Fast2Sum), a
  double-float32 accumulator whose low part stays below an ulp of its high part.

Accuracy is each sum's largest |sum - exact| / sum |P dP| over rows built to stress it (16k keys, wide
logits, dP a common value plus small noise), the exact one from the same kernel with every product taken
in float64. Timing: bf16, H 16, the dQ kernel's tiles and warps at D 64 and 128 (core's tile table).

    python packages/core/benchmarks/delta_sums.py     # on a GPU; TRITON_INTERPRET=1 checks it on a CPU
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import core.testing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SUMS = ("float32", "float64", "float64 tiles", "twosum tiles", "renormalized tiles")


@triton.jit
def _two_sum(a, b):
    """(a + b rounded, its exact rounding error), any order of magnitudes (Knuth)."""
    total = a + b
    virtual = total - a
    return total, (a - (total - virtual)) + (b - virtual)


@triton.jit
def row_sums_kernel(
    Q, K, V, dOut, Lse, Sums, Magnitudes, n_queries, n_keys, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUM: tl.constexpr,
):  # fmt: skip
    """Sums (H, n_queries) float64 = sum_j P_ij dP_ij for BLOCK_M query rows of one head, P = exp2(Q K^T
    qk_scale - Lse), dP = dO V^T, summed as SUM says ("exact": every product in float64, and Magnitudes
    (H, n_queries) float64 = sum_j |P_ij dP_ij|). Q, dOut (H, n_queries, HEAD_DIM), K, V (H, n_keys,
    HEAD_DIM) contiguous fp16/bf16; Lse (H, n_queries) float32, base 2. n_queries and n_keys multiples of
    the blocks. Grid (n_queries / BLOCK_M, H)."""
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + (head * n_queries + rows[:, None]) * HEAD_DIM + dims[None, :])
    do = tl.load(dOut + (head * n_queries + rows[:, None]) * HEAD_DIM + dims[None, :])
    lse = tl.load(Lse + head * n_queries + rows)
    total = tl.zeros([BLOCK_M], dtype=tl.float64)
    magnitude = tl.zeros([BLOCK_M], dtype=tl.float64)
    total32 = tl.zeros([BLOCK_M], dtype=tl.float32)
    high = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    low = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    wide = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    for start in range(0, n_keys, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kT = tl.load(K + (head * n_keys + cols[None, :]) * HEAD_DIM + dims[:, None])
        vT = tl.load(V + (head * n_keys + cols[None, :]) * HEAD_DIM + dims[:, None])
        p = tl.math.exp2(tl.dot(q, kT) * qk_scale - lse[:, None])
        dp = tl.dot(do, vT)
        product = p * dp
        if SUM == "exact":
            exact = p.to(tl.float64) * dp.to(tl.float64)
            total += tl.sum(exact, 1)
            magnitude += tl.sum(tl.abs(exact), 1)
        elif SUM == "float32":
            total32 += tl.sum(product, 1)
        elif SUM == "float64":
            total += tl.sum(product.to(tl.float64), 1) + tl.sum(tl.fma(p, dp, -product), 1).to(tl.float64)
        elif SUM == "float64 tiles":
            wide += product.to(tl.float64)
            low += tl.fma(p, dp, -product)
        elif SUM == "twosum tiles":
            high, error = _two_sum(high, product)
            low += error + tl.fma(p, dp, -product)
        else:  # "renormalized tiles"
            added, error = _two_sum(high, product)
            error += low + tl.fma(p, dp, -product)
            high = added + error  # Fast2Sum: |added| >= |error|
            low = error - (high - added)
    if SUM == "float32":
        total = total32.to(tl.float64)
    elif SUM == "float64 tiles":
        total = tl.sum(wide, 1) + tl.sum(low.to(tl.float64), 1)
    elif SUM == "twosum tiles" or SUM == "renormalized tiles":
        total = tl.sum(high.to(tl.float64), 1) + tl.sum(low.to(tl.float64), 1)
    tl.store(Sums + head * n_queries + rows, total)
    if SUM == "exact":
        tl.store(Magnitudes + head * n_queries + rows, magnitude)


def row_sums(q, k, v, dout, lse, how: str, tiles) -> tuple[torch.Tensor, torch.Tensor]:
    heads, n_queries, head_dim = q.shape
    sums = torch.empty(heads, n_queries, device=q.device, dtype=torch.float64)
    magnitudes = torch.empty_like(sums)
    grid = (n_queries // tiles.block_m, heads)
    row_sums_kernel[grid](
        q, k, v, dout, lse, sums, magnitudes, n_queries, k.shape[1], 1.0, head_dim, tiles.block_m,
        tiles.block_n, how, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return sums, magnitudes


def stressing_rows(heads: int, n_queries: int, n_keys: int, head_dim: int, dtype, gen):
    """Rows whose products span many scales without cancelling: logits spread over ~40 (base 2), every
    value vector a common one plus 1e-3 noise, so each row's dP is one value plus small ones and
    sum |P dP| is about |sum P dP|; the LSE exact for these scores (float64 of the same products)."""
    randn = lambda *shape: torch.randn(*shape, device=DEVICE, generator=gen)  # noqa: E731
    q = (randn(heads, n_queries, head_dim) * 1.5).to(dtype)
    k = randn(heads, n_keys, head_dim).to(dtype)
    common = randn(heads, 1, head_dim)
    v = (common + 1e-3 * randn(heads, n_keys, head_dim)).to(dtype)
    dout = randn(heads, n_queries, head_dim).to(dtype)
    scores = q.double() @ k.double().transpose(-1, -2)  # base 2: qk_scale 1
    lse = torch.logsumexp(scores * math.log(2), -1) / math.log(2)
    return q, k, v, dout, lse.float()


def main() -> None:
    config = core.testing.portable.config
    interpreted = DEVICE == "cpu"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    # The interpreter's bf16 dots are wrong (triton-lang/triton#11584): the CPU check runs in fp16.
    dtype = torch.float16 if interpreted else torch.bfloat16
    print(f"accuracy: largest |sum - exact| / sum |P dP| over the rows ({dtype}, 16k keys; CPU: 256)")
    for head_dim in (64, 128):
        _, tiles = config.backward_configs(head_dim, dtype, interpreted=interpreted)
        n_keys, n_queries = (256, tiles.block_m) if interpreted else (16384, 512)
        inputs = stressing_rows(4, n_queries, n_keys, head_dim, dtype, gen)
        exact, magnitudes = row_sums(*inputs, "exact", tiles)
        errors = {
            how: (row_sums(*inputs, how, tiles)[0] - exact).abs().div(magnitudes).max().item() for how in SUMS
        }
        print(f"D{head_dim}: " + ", ".join(f"{how} {error:.2g}" for how, error in errors.items()), flush=True)
    if interpreted:
        print("CPU (Triton interpreter): timing skipped")
        return
    print("time of the pass's loop (bf16, H 16, N 4096 x 4096, non-causal): ms (ratio to float32)")
    for head_dim in (64, 128):
        _, tiles = config.backward_configs(head_dim, torch.bfloat16, interpreted=False)
        inputs = stressing_rows(16, 4096, 4096, head_dim, torch.bfloat16, gen)
        times = {
            how: triton.testing.do_bench(
                lambda how=how, inputs=inputs, tiles=tiles: row_sums(*inputs, how, tiles)
            )
            for how in SUMS
        }
        print(
            f"D{head_dim} ({tiles.block_m}x{tiles.block_n}/{tiles.num_warps}w/{tiles.num_stages}s): "
            + ", ".join(f"{how} {t:.3f} ({t / times['float32']:.2f}x)" for how, t in times.items()),
            flush=True,
        )
    print(torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
