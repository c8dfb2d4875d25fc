"""Context parallelism (core.distributed): what the ring costs on one GPU, and how it scales on several.

Single GPU, the simulated ring's overhead (core.distributed.LocalRing: the same ring code with every rank
in one process, no transfers) against one core.attention call on the same total sequence, forward and
forward+backward: what the LSE merges, the per-step slicing and the bookkeeping cost.

    PYTHONPATH=packages/core/src python packages/core/benchmarks/run.py cp [--tokens 8192,16384,32768]
        [--world-sizes 2,4,8] [--out FILE]

Several GPUs, one process per GPU under torchrun: per-GPU TFLOP/s of ring (zigzag) and Ulysses attention
over the whole sequence, scaling efficiency against one core.attention call on one GPU, and PyTorch's
context_parallel over SDPA in the same run where this torch has it:

    PYTHONPATH=packages/core/src torchrun --nproc-per-node 8 packages/core/benchmarks/run.py cp --multi
        [--tokens 32768,65536,131072] [--out FILE]

The problem is Llama-like: 32 query heads, 8 key/value heads, D 128, bf16, causal, batch 1. FLOP
counts are the whole sequence's (attnbench.flops), per-GPU TFLOP/s divides them by the GPU count, and
scaling efficiency = T(one GPU, whole sequence) / (W x T(W GPUs)). Timings on several GPUs take the
slowest rank's, with the same number of calls on every rank (do_bench chooses its own count, which
would desynchronise the collectives). NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 is set
unless the environment sets it. `--dry-run` runs either part on the CPU with tiny shapes under the
Triton interpreter (with gloo under torchrun): the numbers mean nothing, the code paths run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch
import torch.distributed as dist
from attnbench.flops import PASS_FLOP_FACTOR, forward_flops

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DRY_RUN_SHAPE = {"q_heads": 4, "kv_heads": 2, "head_dim": 16, "tokens": [32]}


def parse_args(argv):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--multi", action="store_true", help="several GPUs under torchrun")
    parser.add_argument("--tokens", type=_ints, default=None, help="total sequence lengths, comma-separated")
    parser.add_argument("--world-sizes", type=_ints, default=[2, 4, 8], help="simulated ring sizes (one GPU)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreted kernels")
    parser.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:  # before core's kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import core  # noqa: F401  (registers torch.ops.core before the schemes are imported)

    shape = (
        DRY_RUN_SHAPE if args.dry_run else {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM}
    )
    if args.multi:
        tokens = args.tokens or shape.get("tokens") or [32768, 65536, 131072]
        rows = multi_gpu(tokens, shape, args.dry_run)
    else:
        tokens = args.tokens or shape.get("tokens") or [8192, 16384, 32768]
        rows = single_gpu(tokens, args.world_sizes, shape, args.dry_run)
    if args.out and (not dist.is_initialized() or dist.get_rank() == 0):
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=1)


# ---------------------------------------------------------------------------------------------------------
# Inputs and timers
# ---------------------------------------------------------------------------------------------------------


def _qkv(tokens: int, shape: dict, device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch.bfloat16

    def draw(heads):
        return torch.randn(1, heads, tokens, shape["head_dim"], generator=gen).to(device=device, dtype=dtype)

    return draw(shape["q_heads"]), draw(shape["kv_heads"]), draw(shape["kv_heads"])


def _flops(tokens: int, shape: dict, passes: str) -> float:
    one = forward_flops(1, shape["q_heads"], tokens, tokens, shape["head_dim"], True)
    return one * PASS_FLOP_FACTOR[passes]


def _timer(dry_run: bool):
    """ms per call: do_bench on a GPU (single process only), the wall clock in a dry run."""
    if dry_run:

        def host(fn, grad_to_none=()):
            started = time.perf_counter()
            fn()
            return (time.perf_counter() - started) * 1e3

        return host
    from triton.testing import do_bench

    def device(fn, grad_to_none=()):
        return do_bench(fn, grad_to_none=list(grad_to_none) or None, return_mode="median")

    return device


def _fixed_count_timer(dry_run: bool, warmup: int = 3, repeats: int = 10):
    """ms per call, the slowest rank's, with the same number of calls on every rank."""

    def timed(fn, grad_to_none=()):
        def call():
            for tensor in grad_to_none:
                tensor.grad = None
            fn()

        for _ in range(0 if dry_run else warmup):
            call()
        count = 1 if dry_run else repeats
        _synchronize(dry_run)
        dist.barrier()
        started = time.perf_counter()
        for _ in range(count):
            call()
        _synchronize(dry_run)
        elapsed = torch.tensor([(time.perf_counter() - started) * 1e3 / count])
        if not dry_run:
            elapsed = elapsed.cuda()
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    return timed


def _synchronize(dry_run: bool) -> None:
    if not dry_run:
        torch.cuda.synchronize()


def _causal_attention(q, k, v):
    import core

    return core.attention(q, k, v, causal=True)


def _forward_and_backward(attend, leaves):
    """A call that runs `attend` on the leaves and backpropagates ones through every output."""

    def run():
        outs = attend(*leaves)
        outs = outs if isinstance(outs, list) else [outs]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


# ---------------------------------------------------------------------------------------------------------
# (a) one GPU: the simulated ring against one call
# ---------------------------------------------------------------------------------------------------------


def single_gpu(token_counts, world_sizes, shape, dry_run: bool) -> list[dict]:
    import core
    import core.distributed as cd

    device = "cpu" if dry_run else "cuda"
    timer = _timer(dry_run)
    rows = []
    print(
        "simulated ring (LocalRing, zigzag) vs one core.attention call; bf16 causal, "
        f"Hq {shape['q_heads']}, Hkv {shape['kv_heads']}, D {shape['head_dim']}"
    )
    columns = f"{'fwd ms':>8} {'ring':>8} {'over':>7} | {'fwd+bwd':>8} {'ring':>8} {'over':>7}"
    print(f"{'tokens':>7} {'W':>3} | {columns}")
    for tokens in token_counts:
        q, k, v = _qkv(tokens, shape, device)
        whole = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.no_grad():
            single_fwd = timer(lambda whole=whole: core.attention(*whole, causal=True))
        single_both = timer(_forward_and_backward(_causal_attention, whole), whole)
        for world_size in world_sizes:
            if tokens % (2 * world_size):
                continue
            ring = cd.LocalRing(world_size)
            shards = [[s.requires_grad_() for s in cd.shard_sequence(t, group=ring)] for t in (q, k, v)]
            flat = [s for rank_shards in shards for s in rank_shards]

            def attend(*_, shards=shards, ring=ring):
                return cd.ring_attention(*shards, group=ring, causal=True)

            with torch.no_grad():
                ring_fwd = timer(attend)
            ring_both = timer(_forward_and_backward(attend, []), flat)
            row = {
                "tokens": tokens, "world_size": world_size,
                "single_fwd_ms": single_fwd, "ring_fwd_ms": ring_fwd,
                "single_fwd_bwd_ms": single_both, "ring_fwd_bwd_ms": ring_both,
            }  # fmt: skip
            rows.append(row)
            forward = f"{single_fwd:8.3f} {ring_fwd:8.3f} {ring_fwd / single_fwd - 1:+7.1%}"
            both = f"{single_both:8.3f} {ring_both:8.3f} {ring_both / single_both - 1:+7.1%}"
            print(f"{tokens:>7} {world_size:>3} | {forward} | {both}")
    return rows


# ---------------------------------------------------------------------------------------------------------
# (b) several GPUs under torchrun
# ---------------------------------------------------------------------------------------------------------


def multi_gpu(token_counts, shape, dry_run: bool) -> list[dict]:
    import core
    import core.distributed as cd

    if "RANK" not in os.environ:
        raise SystemExit(
            "--multi runs under torchrun, one process per GPU:\n  PYTHONPATH=packages/core/src "
            "torchrun --nproc-per-node 8 packages/core/benchmarks/run.py cp --multi"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if dry_run:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    timer = _fixed_count_timer(dry_run)
    solo = _timer(dry_run)
    rows = []
    if rank == 0:
        name = "CPU (dry run)" if dry_run else torch.cuda.get_device_name()
        heads = f"Hq {shape['q_heads']}, Hkv {shape['kv_heads']}, D {shape['head_dim']}"
        print(f"{world_size} x {name}; bf16 causal, {heads}; per-GPU TFLOP/s (scaling efficiency vs one GPU)")
    for tokens in token_counts:
        if tokens % (2 * world_size):
            continue
        q, k, v = _qkv(tokens, shape, device)
        flops = {passes: _flops(tokens, shape, passes) for passes in ("fwd", "fwd+bwd")}
        times: dict[str, dict[str, float | str]] = {}

        # One GPU, the whole sequence: every rank times it on its own GPU, rank 0's counts.
        whole = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.no_grad():
            single_fwd = solo(lambda whole=whole: core.attention(*whole, causal=True))
        times["core, 1 GPU"] = {
            "fwd": single_fwd,
            "fwd+bwd": solo(_forward_and_backward(_causal_attention, whole), whole),
        }
        for scheme, layout in (("ring", "zigzag"), ("ulysses", "contiguous")):
            if scheme == "ulysses" and (shape["q_heads"] % world_size or shape["kv_heads"] % world_size):
                times[scheme] = {"skipped": f"heads not divisible by {world_size}"}
                continue
            leaves = [cd.shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v)]
            attend = functools.partial(
                cd.ring_attention if scheme == "ring" else cd.ulysses_attention, causal=True
            )
            with torch.no_grad():
                forward = timer(lambda attend=attend, leaves=leaves: attend(*leaves))
            times[scheme] = {"fwd": forward, "fwd+bwd": timer(_forward_and_backward(attend, leaves), leaves)}
        times["torch context_parallel (SDPA)"] = _torch_context_parallel(q, k, v, world_size, timer, dry_run)

        for method, result in times.items():
            row = {"tokens": tokens, "world_size": world_size, "method": method, **result}
            gpus = 1 if method == "core, 1 GPU" else world_size
            for passes in ("fwd", "fwd+bwd"):
                if isinstance(result.get(passes), float):
                    row[f"{passes}_tflops_per_gpu"] = flops[passes] / gpus / (result[passes] * 1e-3) / 1e12
                    row[f"{passes}_efficiency"] = times["core, 1 GPU"][passes] / (gpus * result[passes])
            rows.append(row)
            if rank == 0:
                print(_describe(row))
        if rank == 0:
            q_shard, k_shard = (cd.shard_sequence(t) for t in (q, k))
            for scheme, volume in (("ring", cd.ring_volume), ("ulysses", cd.ulysses_volume)):
                sent = volume(q_shard, k_shard, world_size)
                print(f"{'':>7} {scheme} sends per rank: forward {sent.forward_bytes / 2**20:.1f} MiB, "
                      f"backward {sent.backward_bytes / 2**20:.1f} MiB")  # fmt: skip
    dist.destroy_process_group()
    return rows


def _describe(row: dict) -> str:
    text = f"{row['tokens']:>7} {row['method']:<30}"
    if "skipped" in row or "unavailable" in row:
        return f"{text} {row.get('skipped') or row.get('unavailable')}"
    for passes in ("fwd", "fwd+bwd"):
        text += f" | {passes} {row[passes]:8.2f} ms {row[passes + '_tflops_per_gpu']:6.1f} TFLOP/s"
        text += f" ({row[passes + '_efficiency']:.0%})"
    return text


def _torch_context_parallel(q, k, v, world_size, timer, dry_run: bool) -> dict:
    """PyTorch's own context parallelism over SDPA (a ring over its flash/cuDNN kernels). k and v are
    expanded to every query head: its SDPA dispatch takes no GQA. The API is experimental and differs
    across torch versions, so any failure is reported rather than raised."""
    if dry_run:
        return {"unavailable": "needs CUDA"}
    try:
        import torch.nn.functional as F
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError as error:
        return {"unavailable": f"this torch has no context_parallel ({error})"}
    try:
        mesh = init_device_mesh("cuda", (world_size,))
        group = q.shape[1] // k.shape[1]
        buffers = [q.clone(), k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)]
        sharding = {"buffers": buffers, "buffer_seq_dims": [2, 2, 2], "no_restore_buffers": set(buffers)}
        with context_parallel(mesh, **sharding):
            leaves = [b.requires_grad_() for b in buffers]

            def attend(*x):
                return F.scaled_dot_product_attention(*x, is_causal=True)

            with torch.no_grad():
                forward = timer(lambda: attend(*leaves))
            return {"fwd": forward, "fwd+bwd": timer(_forward_and_backward(attend, leaves), leaves)}
    except Exception as error:  # an experimental API: report, do not abort the other rows
        return {"unavailable": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
