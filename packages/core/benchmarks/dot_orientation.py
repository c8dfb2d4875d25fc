"""Are the dK/dV kernel's scores bitwise the dQ kernel's? Both kernels take the same products over the head
dim in opposite orientations: the dQ kernel S = Q K^T on (BLOCK_M x BLOCK_N) tiles, the dK/dV kernel
S^T = K Q^T on its own (BLOCK_N x BLOCK_M) tiles and warps (core's tile table); dP = dO V^T and its
transpose are the same kind of dot. If the tensor cores sum each element's products in the same order
either way, a backward could take its dQ kernel's Delta from the dK/dV kernel's own P and dP instead of a
pass over the keys (docs/perf-notes.md, "the Delta pass"). This times nothing: it counts the elements
that differ, per dtype and head dim, with each kernel's tiles and warps.

    python packages/core/benchmarks/dot_orientation.py      # on a GPU; one line per (dtype, head dim)

(Under TRITON_INTERPRET=1 it runs on the CPU, with the GPU's tile table, as a check of the script: the
interpreter's dots sum exactly and round once, so nothing can differ there.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import core.testing

N = 2048  # queries = keys: a multiple of every tile in the table
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def products_kernel(X, Y, Out, n_y, HEAD_DIM: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr):
    """Out (n_x, n_y) float32 = X (n_x, HEAD_DIM) @ Y (n_y, HEAD_DIM)^T, one (BLOCK_X x BLOCK_Y) tile per
    program, as the attention kernels' tl.dot takes it (fp16/bf16 products summed in float32). All
    contiguous. Grid (n_x / BLOCK_X, n_y / BLOCK_Y)."""
    rows = tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X)
    cols = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(X + rows[:, None] * HEAD_DIM + dims[None, :])
    y = tl.load(Y + cols[:, None] * HEAD_DIM + dims[None, :])
    tl.store(Out + rows[:, None] * n_y + cols[None, :], tl.dot(x, tl.trans(y)))


def products(x: torch.Tensor, y: torch.Tensor, block_x: int, block_y: int, warps: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], y.shape[0], device=x.device, dtype=torch.float32)
    grid = (x.shape[0] // block_x, y.shape[0] // block_y)
    products_kernel[grid](x, y, out, y.shape[0], x.shape[1], block_x, block_y, num_warps=warps)
    return out


def main() -> None:
    config = core.testing.portable.config
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            dkdv, dq = config.backward_configs(head_dim, dtype, interpreted=False)
            gen = torch.Generator(device=DEVICE).manual_seed(head_dim)
            n = N if DEVICE == "cuda" else 256
            q, k = (torch.randn(n, head_dim, device=DEVICE, generator=gen).to(dtype) for _ in range(2))
            scores = products(q, k, dq.block_m, dq.block_n, dq.num_warps)  # the dQ kernel's S
            scores_t = products(k, q, dkdv.block_n, dkdv.block_m, dkdv.num_warps)  # the dK/dV kernel's S^T
            differ = scores != scores_t.T
            largest = (scores - scores_t.T).abs().max().item()
            print(
                f"{str(dtype).removeprefix('torch.')} D{head_dim}: dQ tiles {dq.block_m}x{dq.block_n}/"
                f"{dq.num_warps}w, dK/dV tiles {dkdv.block_n}x{dkdv.block_m}/{dkdv.num_warps}w: "
                f"{int(differ.sum())} of {differ.numel()} scores differ (largest difference {largest:.3g})",
                flush=True,
            )
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (Triton interpreter)")


if __name__ == "__main__":
    main()
