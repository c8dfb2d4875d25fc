"""A/B: the working tree's backward against a baseline copy of core, in one GPU process.

    mkdir -p .ab && git archive HEAD packages/core/src/core | tar -x -C .ab   # here: the baseline
    PYTHONPATH=packages/core/src python packages/core/benchmarks/ab.py \
        --baseline .ab/packages/core/src/core --out DIR                         # on the GPU, carrying .ab

Two runs on two machines differ by more than most kernel changes move (docs/perf-notes.md: the
forward's rows moved -7..+5% between full benchmarks with no code change), so a change is judged here:
the baseline package is loaded under another name next to the working tree's, both time the same
inputs in alternating rounds, and SDPA's FLASH and CUDNN backends are timed in the same process for
scale. For each row it reports the full backward and the dK/dV kernel alone (KERNEL_SHARE says which
flops it is credited with), and whether the two gave the same bits. With --dlse it
also times the candidate's backward with a loss on the LSE, which takes the dQ kernel's Delta pass
(the portable backward, DELTA_IN_DQ).

Results go to DIR/ab.json; a short table is printed last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from attnbench.flops import PASS_FLOP_FACTOR, forward_flops
from attnbench.runner import DTYPES
from sweep import problem, sdpa_times
from torch.nn.attention import SDPBackend
from triton.testing import do_bench

import core

# The dK/dV kernel computes S, dP, dV and dK: 4 of the backward's 5 counted matmuls (core's split adds
# S and dP again in the dQ kernel), so it is credited with 4/5 of the backward's flops.
KERNEL_SHARE = 4 / 5


def load_baseline(source: Path):
    """The package at `source` (a copy of packages/core/src/core) imported as `core_baseline`: its own
    modules renamed, so both versions' kernels and caches live side by side."""
    root = Path(tempfile.mkdtemp(prefix="ab-"))
    target = root / "core_baseline"
    shutil.copytree(source, target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        text = text.replace("from core.", "from core_baseline.").replace(
            "from core import", "from core_baseline import"
        )
        text = text.replace("import core.", "import core_baseline.")
        path.write_text(text)
    sys.path.insert(0, str(root))
    if (target / "testing.py").exists():  # copies from before the core.testing seam have none
        importlib.import_module("core_baseline.testing")
    return importlib.import_module("core_baseline")


def time_ms(fn, grads=None) -> float:
    return do_bench(fn, warmup=10, rep=60, grad_to_none=grads, return_mode="median")


class Side:
    """One implementation's backward on one problem: the plans, the forward's outputs, and timers."""

    def __init__(self, package, q, k, v, dout, causal: bool):
        self.package = package
        launch = package.testing.portable.plans
        scale = 1.0 / math.sqrt(q.shape[-1])
        self.forward = launch.ForwardPlan(q, k, v, causal, scale)
        self.out, self.lse, self.lse_low = self.forward(q, k, v)
        self.plan = launch.BackwardPlan(dout, None, q, k, v, causal, scale)
        self.args = (dout, None, q, k, v, self.out, self.lse, self.lse_low)
        self.q, self.k, self.v, self.dout = q, k, v, dout

    def run_forward(self):
        return self.forward(self.q, self.k, self.v)

    def backward(self):
        return self.plan(*self.args)

    def dkdv_alone(self):
        """The dK/dV launch on its own (its row statistics computed once beforehand, as the backward
        does)."""
        plan = self.plan
        lse, lse_low, delta = self.row_statistics()
        dk, dv = torch.empty_like(self.k), torch.empty_like(self.v)
        # Delta stands in for cu_seqlens (trailing pointers that plain calls never read).
        unused = [delta] * getattr(plan.dkdv, "trailing_tensors", 0)

        def run():
            if plan.needs_scratch:
                self.package.testing.portable.plans.install_scratch_allocator()
            plan.dkdv(plan.index, self.q, self.k, self.v, self.dout, lse, lse_low, delta, dk, dv, *unused)

        return run

    def row_statistics(self):
        """(lse, lse_low, delta) as the plan's dK/dV kernel reads them: the padded copy the preprocess
        writes (BackwardPlan.row_statistics), or for a baseline from before it, the forward's statistics
        in place and Delta in a buffer of its own."""
        plan = self.plan
        if hasattr(plan, "row_statistics"):
            return plan.row_statistics(self.dout, None, self.q, self.out, self.lse, self.lse_low)
        delta = torch.empty(plan.delta_shape, device="cuda", dtype=torch.float32)
        # The LSE stands in for dLSE, Delta for cu_seqlens (trailing pointers that plain calls never read,
        # of kernels that take them: a baseline from before packed sequences has none).
        unused = [delta] * getattr(plan.preprocess, "trailing_tensors", 0)
        plan.preprocess(plan.index, self.out, self.dout, self.lse, delta, *unused)
        return self.lse, self.lse_low, delta


def dlse_backward_ms(q, k, v, dout, causal) -> tuple[float, float]:
    """The candidate's backward through autograd without and with a loss on the LSE, in ms."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = core.attention(*leaves, causal=causal, return_lse=True)
    dlse = torch.randn_like(lse)
    plain = time_ms(lambda: torch.autograd.backward([out], [dout], retain_graph=True), grads=leaves)
    both = time_ms(lambda: torch.autograd.backward([out, lse], [dout, dlse], retain_graph=True), grads=leaves)
    return plain, both


def measure(baseline, dtype_name: str, d: int, n: int, causal: bool, rounds: int, dlse: bool) -> dict:
    """One row: both sides' forward, backward and dK/dV kernel (best of `rounds` alternating rounds),
    whether they agree bitwise, FLASH and CUDNN for scale, and optionally the cost of a dLSE."""
    q, k, v, dout = problem(DTYPES[dtype_name], d, n)
    forward = forward_flops(q.shape[0], q.shape[1], n, n, d, causal)
    backward = PASS_FLOP_FACTOR["bwd"] * forward
    sides = {"base": Side(baseline, q, k, v, dout, causal), "new": Side(core, q, k, v, dout, causal)}
    same = all(torch.equal(a, b) for a, b in zip(sides["base"].backward(), sides["new"].backward()))
    same &= all(torch.equal(a, b) for a, b in zip(sides["base"].run_forward(), sides["new"].run_forward()))
    times = {name: {"fwd": [], "bwd": [], "dkdv": []} for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            times[name]["fwd"].append(time_ms(side.run_forward))
            times[name]["bwd"].append(time_ms(side.backward))
            times[name]["dkdv"].append(time_ms(side.dkdv_alone()))
    row = {"dtype": dtype_name, "d": d, "n": n, "causal": causal, "same_bits": same}
    for name in sides:
        row[f"{name}_fwd"] = forward / min(times[name]["fwd"]) / 1e9
        row[f"{name}_bwd"] = backward / min(times[name]["bwd"]) / 1e9
        row[f"{name}_dkdv"] = KERNEL_SHARE * backward / min(times[name]["dkdv"]) / 1e9
        row[f"{name}_ms"] = times[name]
    for label, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        _, forward_ms, backward_ms = sdpa_times(q, k, v, dout, backend, causal)
        row[f"{label}_fwd"] = forward / forward_ms / 1e9
        row[f"{label}_bwd"] = backward / backward_ms / 1e9
    if dlse:
        plain, both = dlse_backward_ms(q, k, v, dout, causal)
        row["dlse_cost"] = both / plain
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, required=True, help="a copy of packages/core/src/core")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--d", default="64,128")
    parser.add_argument("--n", default="1024,4096,16384")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--non-causal", action="store_true", help="also the non-causal rows")
    parser.add_argument("--dlse", action="store_true", help="also the cost of a loss on the LSE")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = load_baseline(args.baseline)
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for dtype_name in args.dtypes.split(","):
        for d in map(int, args.d.split(",")):
            for n in map(int, args.n.split(",")):
                for causal in (True, False) if args.non_causal else (True,):
                    row = measure(baseline, dtype_name, d, n, causal, args.rounds, args.dlse)
                    results["rows"].append(row)
                    (args.out / "ab.json").write_text(json.dumps(results, indent=1))
                    print(json.dumps({key: value for key, value in row.items() if not key.endswith("_ms")}))
    print(
        f"\n{results['card']}, torch {results['torch']}; TFLOP/s (best of {args.rounds} alternating rounds)"
    )
    print(
        "dtype  D      N mask   | base fwd new fwd ratio  FA2 cuDNN | base bwd new bwd ratio | base dkdv "
        "new dkdv ratio |  FA2 cuDNN | same bits dLSE cost"
    )
    for r in results["rows"]:
        cost = f"{r['dlse_cost']:.2f}x" if "dlse_cost" in r else "-"
        print(
            f"{r['dtype']:5} {r['d']:3} {r['n']:6} {'causal' if r['causal'] else 'full':6} | "
            f"{r['base_fwd']:8.1f} {r['new_fwd']:7.1f} {r['new_fwd'] / r['base_fwd']:5.3f} "
            f"{r['fa2_fwd']:4.0f} {r['cudnn_fwd']:5.0f} | "
            f"{r['base_bwd']:8.1f} {r['new_bwd']:7.1f} {r['new_bwd'] / r['base_bwd']:5.3f} | "
            f"{r['base_dkdv']:9.1f} {r['new_dkdv']:8.1f} {r['new_dkdv'] / r['base_dkdv']:5.3f} | "
            f"{r['fa2_bwd']:4.0f} {r['cudnn_bwd']:5.0f} | {r['same_bits']!s:9} {cost}"
        )


if __name__ == "__main__":
    main()
