"""A fused backward on the GPU: the portable family's (`tl`, core.kernels.portable.fused_backward) or,
with --kernel hopper, the Hopper family's (Gluon, core.kernels.hopper.backward); checked against
today's split backward, then timed against it and against SDPA's FLASH and CUDNN backward passes, in
one process.

    PYTHONPATH=packages/core/src python3 packages/core/benchmarks/fused_bwd_check.py [--quick] [--out DIR]
        [--kernel portable|hopper]

Without a GPU, --report compiles the Hopper kernel for sm_90a on the CPU (triton 3.6, whose ptxas ships
in its wheel) and prints what the compiler made of it: shared memory, registers per partition
(setmaxnreg), spills, the wgmma instructions, the dQ adds, and ptxas's warnings.

    PYTHONPATH=packages/core/src $TRITON36_PYTHON packages/core/benchmarks/fused_bwd_check.py --report

Rows: causal and not, bf16 and fp16, D 64 and 128, N 1k/4k/16k at 16k tokens (B = 16384 / N) and
H * D = 2048, the benchmark's target shapes. Backward only: every implementation's forward runs once,
outside the timing (SDPA's backward through autograd.grad with retain_graph). TFLOP/s count the
backward as 2.5x the forward's flops, causal ones halved (attnbench.flops).

`--profile` times each kernel the plans launch instead (torch.profiler, CUDA time per call): the fused
backward in both modes and the split one, kernel by kernel, so a slow row shows which kernel holds it.

Before timing, each row checks the fused gradients against the split backward's (at most a few ulps of
the largest gradient apart: both sum dQ in float32, in another order) and the deterministic mode
against itself (bitwise). `--sweep` also times other tile shapes of the portable deterministic kernel.
`--jobs N` compiles every row's kernels in N processes first (Triton's on-disk cache is shared), so the
timing process finds them compiled. Results go to DIR/fused_bwd.json; a short table is printed last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import re
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from attnbench.flops import PASS_FLOP_FACTOR, forward_flops
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

# The forward's saved statistics and the split backward's plan are internals: until core has a
# testing seam, they are reached here.
import core.testing

_config, _launch = core.testing.portable.config, core.testing.portable.plans
FusedBackwardPlan = core.testing.portable.fused_plans.FusedBackwardPlan
# Whose fused backward: the portable family's, or the Hopper family's with its own Delta pass or with
# the portable pass (the same sums; to time the two passes apart).
KERNELS = ("portable", "hopper", "hopper-portable-delta")

TOKENS, WIDTH = 16384, 2048
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SEQ_LENS = (1024, 4096, 16384)
# Other tiles of the deterministic kernel (--sweep): (D, BLOCK_M, BLOCK_N, warps, stages).
SWEEP = [(64, 64, 64, 4, 2), (64, 64, 128, 8, 3), (128, 64, 64, 8, 2), (128, 32, 128, 8, 2)]
AGREE_ULPS = 4  # fused vs split: dQ is summed in another order, then rounded once to the dtype


def rows(quick: bool, dtypes: list[str], head_dims: list[int]) -> list[dict]:
    lens = (1024, 16384) if quick else SEQ_LENS
    return [
        {"causal": causal, "dtype": dtype, "d": d, "n": n}
        for causal in (True, False)
        for dtype in dtypes
        for d in head_dims
        for n in lens
    ]


def sweep_rows() -> list[dict]:
    return [
        {"causal": True, "dtype": "bf16", "d": d, "n": n, "config": (bm, bn, warps, stages)}
        for d, bm, bn, warps, stages in SWEEP
        for n in (1024, 16384)
    ]


class Problem:
    def __init__(self, row: dict, seed: int = 0):
        dtype, d, n = DTYPES[row["dtype"]], row["d"], row["n"]
        generator = torch.Generator(device="cuda").manual_seed(seed)
        shape = (TOKENS // n, WIDTH // d, n, d)
        self.q, self.k, self.v, self.dout = (
            torch.randn(shape, generator=generator, device="cuda", dtype=dtype) for _ in range(4)
        )
        self.causal, self.scale = row["causal"], 1.0 / math.sqrt(d)
        with core.testing.use_family("portable"):
            self.out, self.lse, self.lse_low = core.testing.forward(
                self.q, self.k, self.v, causal=self.causal, sm_scale=self.scale
            )
        self.args = (self.dout, None, self.q, self.k, self.v, self.out, self.lse, self.lse_low)
        self.flops = PASS_FLOP_FACTOR["bwd"] * forward_flops(shape[0], shape[1], n, n, d, self.causal)

    def split_plan(self):
        return _launch.BackwardPlan(self.dout, None, self.q, self.k, self.v, self.causal, self.scale)

    def fused_plan(self, deterministic: bool, config=None, kernel: str = "portable"):
        if kernel.startswith("hopper"):
            BackwardPlan = core.testing.family("hopper").BackwardPlan
            gluon_delta = kernel == "hopper"
            return BackwardPlan(
                self.dout, None, self.q, self.k, self.v, self.causal, self.scale, deterministic, gluon_delta
            )
        return FusedBackwardPlan(
            self.dout, None, self.q, self.k, self.v, self.causal, self.scale, deterministic, config
        )


def config_of(row: dict):
    return _config.KernelConfig(*row["config"], descriptors=True) if "config" in row else None


def compile_row(row: dict) -> str:
    """Run every core kernel of a row once (the --jobs warm-up)."""
    torch.cuda.set_device(0)
    problem = Problem(row)
    kernel = row.get("kernel", "portable")
    plans = [problem.fused_plan(True, config_of(row), kernel)]
    if "config" not in row:
        plans += [problem.split_plan(), problem.fused_plan(False, kernel=kernel)]
    for plan in plans:
        plan(*problem.args)
    torch.cuda.synchronize()
    return json.dumps(row)


def ulps_apart(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().item() * torch.finfo(expected.dtype).eps
    return (got.float() - expected.float()).abs().max().item() / max(scale, 1e-30)


def time_ms(fn, quick: bool) -> float:
    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def sdpa_backward_ms(problem: Problem, backend, quick: bool) -> float:
    leaves = [t.detach().requires_grad_() for t in (problem.q, problem.k, problem.v)]
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(*leaves, is_causal=problem.causal)
    return time_ms(lambda: torch.autograd.grad(out, leaves, problem.dout, retain_graph=True), quick)


def measure(row: dict, quick: bool) -> dict:
    problem = Problem(row)
    result = dict(row)
    tflops = lambda ms: problem.flops / ms / 1e9  # noqa: E731
    split = problem.split_plan()
    expected = split(*problem.args)
    kernel = row.get("kernel", "portable")
    ordered = problem.fused_plan(True, config_of(row), kernel)
    first = ordered(*problem.args)
    result["ulps_vs_split"] = max(ulps_apart(g, e) for g, e in zip(first, expected))
    result["bitwise_repeat"] = all(
        all(torch.equal(a, b) for a, b in zip(first, ordered(*problem.args))) for _ in range(3)
    )
    result["ordered"] = tflops(time_ms(lambda: ordered(*problem.args), quick))
    if "config" in row:
        return result
    result["split"] = tflops(time_ms(lambda: split(*problem.args), quick))
    unordered = problem.fused_plan(False, kernel=kernel)
    got = unordered(*problem.args)
    result["ulps_vs_split"] = max(result["ulps_vs_split"], *(ulps_apart(g, e) for g, e in zip(got, expected)))
    result["atomic"] = tflops(time_ms(lambda: unordered(*problem.args), quick))
    for name, backend in (("FLASH", SDPBackend.FLASH_ATTENTION), ("CUDNN", SDPBackend.CUDNN_ATTENTION)):
        try:
            result[name] = tflops(sdpa_backward_ms(problem, backend, quick))
        except RuntimeError as failure:
            result[name] = f"n/a: {str(failure)[:80]}"
    return result


def profile(row: dict, calls: int = 5) -> dict:
    """CUDA time per call of each kernel that the fused plans (both modes) and the split plan launch, in
    ms, from torch.profiler over `calls` calls after three warm-up calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    problem = Problem(row)
    kernel = row.get("kernel", "portable")
    plans = {
        "ordered": problem.fused_plan(True, kernel=kernel),
        "atomic": problem.fused_plan(False, kernel=kernel),
        "split": problem.split_plan(),
    }
    result = dict(row)
    for name, plan in plans.items():
        for _ in range(3):
            plan(*problem.args)
        torch.cuda.synchronize()
        with profiler(activities=[ProfilerActivity.CUDA]) as recorded:
            for _ in range(calls):
                plan(*problem.args)
            torch.cuda.synchronize()
        events = [e for e in recorded.key_averages() if e.device_time_total > 0 and e.count >= calls]
        result[name] = {e.key[:60]: round(e.device_time_total / calls / 1000, 4) for e in events}
    return result


def profile_table(results: list[dict]) -> str:
    lines = ["ms per call, by kernel (the row's fused plan in both modes, then the split plan)"]
    for r in results:
        lines.append(f"causal {r['causal']}, {r['dtype']}, D {r['d']}, N {r['n']}, {r['kernel']}:")
        for plan in ("ordered", "atomic", "split"):
            kernels = sorted(r[plan].items(), key=lambda item: -item[1])
            total = sum(ms for _, ms in kernels)
            parts = " + ".join(f"{name} {ms:.3f}" for name, ms in kernels)
            lines.append(f"  {plan:8} {total:8.3f} = {parts}")
    return "\n".join(lines)


def number(value) -> str:
    return f"{value:6.0f}" if isinstance(value, float) else "   n/a"


def table(results: list[dict]) -> str:
    lines = [
        "TFLOP/s (backward only); ok: fused within "
        f"{AGREE_ULPS} ulps of split and ordered mode bitwise repeatable",
        "causal dtype   D     N |  split ordered atomic  FLASH  CUDNN | ord/split ord/CUDNN | ok",
    ]
    for r in results:
        if "config" in r:
            continue
        ok = r["ulps_vs_split"] <= AGREE_ULPS and r["bitwise_repeat"]
        cudnn = r["CUDNN"] if isinstance(r["CUDNN"], float) else float("nan")
        lines.append(
            f"{'yes' if r['causal'] else 'no':>6} {r['dtype']:>5} {r['d']:>3} {r['n']:>5} |"
            f" {number(r['split'])} {number(r['ordered'])} {number(r['atomic'])} {number(r['FLASH'])}"
            f" {number(r['CUDNN'])} | {r['ordered'] / r['split']:9.2f} {r['ordered'] / cudnn:11.2f} |"
            f" {'yes' if ok else 'NO'} ({r['ulps_vs_split']:.1f} ulps)"
        )
    swept = [r for r in results if "config" in r]
    if swept:
        lines.append("ordered mode, other tiles (BLOCK_M, BLOCK_N, warps, stages), bf16 causal:")
        for r in swept:
            ok = r["ulps_vs_split"] <= AGREE_ULPS and r["bitwise_repeat"]
            lines.append(
                f"  D{r['d']} N{r['n']} {r['config']}: {r['ordered']:.0f} {'ok' if ok else 'NOT OK'}"
            )
    return "\n".join(lines)


POINTER_TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}


def report() -> None:
    """The Hopper backward's two Gluon kernels (its Delta pass and the backward itself) compiled for
    sm_90a as its plans launch them (both modes, causal and not, D 64 and 128, bf16), without a GPU:
    the plans are built on CPU tensors and their arguments specialised as Triton's launcher would."""
    import triton
    from kernel_report import HOPPER, ptxas_report

    try:
        from triton.experimental.gluon import GluonASTSource
    except ImportError:  # Triton 3.6 keeps it in its runtime module
        from triton.experimental.gluon._runtime import GluonASTSource

    BackwardPlan = core.testing.family("hopper").BackwardPlan
    print(f"triton {triton.__version__}, sm_90a, bf16")
    for head_dim, causal, deterministic in itertools.product((64, 128), (False, True), (True, False)):
        q, dout = (torch.randn(2, 4, 1000, head_dim).to(torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(2, 2, 1000, head_dim).to(torch.bfloat16) for _ in range(2))
        plan = BackwardPlan(dout, None, q, k, v, causal, head_dim**-0.5, deterministic)
        lse = torch.empty(2, 4, 1000)
        delta, accumulator = torch.empty(plan.delta.shape), torch.empty(plan.accumulator_shape)
        turns = torch.empty(plan.turns_shape, dtype=torch.int32)
        kernels = {
            "backward": (plan.kernel, plan.arguments(
                q, k, v, dout, torch.empty_like(k), torch.empty_like(v), lse, lse[None], delta, accumulator,
                turns,
            )),
            "delta pass": (plan.delta_kernel, plan.delta_arguments(q, k, v, dout, lse, lse[None], delta)),
        }  # fmt: skip
        if not deterministic:
            del kernels["delta pass"]  # the same kernel as the deterministic row's
        for name, (kernel, arguments) in kernels.items():
            arguments = {
                key: core.testing.Pointer(POINTER_TYPES[value.dtype])
                if isinstance(value, torch.Tensor)
                else value
                for key, value in arguments.items()
            }
            signature, constants, attributes = core.testing.compile_signature(kernel, arguments)
            compiled = triton.compile(
                GluonASTSource(kernel, signature, constants, attributes), target=HOPPER,
                options=plan.options,
            )  # fmt: skip
            ptx = compiled.asm["ptx"]
            resources, warnings = ptxas_report(ptx)
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", resources)
            wgmma = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
            facts = {
                "shared bytes": compiled.metadata.shared,
                "setmaxnreg": sorted(
                    {int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}
                ),
                "spill stores/loads": "/".join(spills.groups()) if spills else "?",
                "wgmma shapes": sorted({re.search(r"aligned\.(\w+)\.", line).group(1) for line in wgmma}),
                "wgmma": len(wgmma),
                "dQ adds": ptx.count("red.global.gpu.relaxed.add.f32"),
                "float64 conversions": ptx.count("cvt.f64.f32"),
                "ptxas warnings": warnings,
            }
            print(
                f"{name} D={head_dim} causal={causal} deterministic={deterministic}: "
                + ", ".join(f"{k} {v}" for k, v in facts.items()),
                flush=True,
            )


def give_up(row: dict, results: list[dict]) -> None:
    print(f"row {json.dumps(row)} did not finish; results so far:", flush=True)
    print(table(results), flush=True)
    os._exit(3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N 1k and 16k only, shorter timings")
    parser.add_argument("--sweep", action="store_true", help="also time other tiles of the ordered mode")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated, of " + ",".join(DTYPES))
    parser.add_argument("--dims", default="64,128", help="comma-separated head dims")
    parser.add_argument("--jobs", type=int, default=0, help="compile in this many processes first")
    parser.add_argument("--compile-only", action="store_true", help="compile (with --jobs) and stop")
    parser.add_argument("--budget", type=float, default=math.inf, help="stop timing after SECONDS")
    parser.add_argument("--row-timeout", type=float, default=60.0, help="give up (print, exit) after")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="each kernel's time per call, not TFLOP/s")
    parser.add_argument("--kernel", choices=KERNELS, default="portable", help="whose fused backward")
    parser.add_argument(
        "--report", action="store_true", help="the Hopper kernel's sm_90a compile, on the CPU"
    )
    args = parser.parse_args(argv)
    if args.report:
        report()
        return
    head_dims = [int(d) for d in args.dims.split(",")]
    work = rows(args.quick, args.dtypes.split(","), head_dims) + (sweep_rows() if args.sweep else [])
    work = [row | {"kernel": args.kernel} for row in work]
    started = time.time()
    if args.jobs:
        # The kernels' specialisation does not depend on N here (lengths and batch are not
        # specialised on), so one row per (causal, dtype, D, tiles) compiles everything.
        classes = {json.dumps({**row, "n": 4096}): row | {"n": 4096} for row in work}
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for done in pool.imap_unordered(compile_row, list(classes.values())):
                print(f"compiled {done} at {time.time() - started:.0f}s", flush=True)
    if args.compile_only:
        return
    results = []
    timing_started = time.time()
    for row in work:
        if time.time() - timing_started > args.budget:
            print(f"out of time budget: {len(work) - len(results)} rows left", flush=True)
            break
        # A row that hangs (a turn never passed on would) ends the run with what was measured so far.
        watchdog = threading.Timer(args.row_timeout, give_up, (row, results))
        watchdog.start()
        result = profile(row) if args.profile else measure(row, args.quick)
        watchdog.cancel()
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "fused_bwd.json").write_text(json.dumps(results, indent=1))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(profile_table(results) if args.profile else table(results))


if __name__ == "__main__":
    main()
