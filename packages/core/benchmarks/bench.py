"""Side-by-side attention benchmark: core vs SDPA's FLASH, CUDNN and EFFICIENT backends and FlexAttention.

    python packages/core/benchmarks/bench.py --quick     # issue 2's subset (about 1-2 min on an H100)
    python packages/core/benchmarks/bench.py --full      # issue 5's grid, most important rows first
    python packages/core/benchmarks/bench.py --dry-run   # CPU: tiny shapes through the whole harness
    python packages/core/benchmarks/bench.py --report results/<card>-<date>.json   # docs from a saved run

`core` must be importable (PYTHONPATH=packages/core/src from the repository root). A run writes the
results JSON into --out (after every case, so a cut run keeps its data), regenerates
docs/benchmarks.md and docs/img/bench/ from it (--docs), and prints a short summary last.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.monotonic()  # the --time-budget counts from here

from attnbench.cases import DTYPE_NAMES, PLANS  # noqa: E402 (after STARTED, so imports count against the budget)
from attnbench.report import summary_text, write_docs  # noqa: E402
from attnbench.results import PROVIDER_ORDER, load_results, new_results, save_results  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[2]

# Per mode: what runs by default and how hard each measurement tries. The full grid has ~300 rows and
# must finish in about 8 minutes, so its timings are shorter (the median over fewer calls) and it stops
# at its time budget, leaving a minute for Flex's last compile, the plots and the summary.
MODES = {
    "quick": {
        "providers": "core,flash,cudnn",
        "warmup_ms": 25,
        "rep_ms": 100,
        "time_budget": None,
        "matmul_size": 8192,
        "copy_bytes": 2**30,
        "host_calls": 200,
        "host_repeats": 5,
    },
    "full": {
        "providers": ",".join(PROVIDER_ORDER),
        "warmup_ms": 10,
        "rep_ms": 50,
        "time_budget": 390.0,
        "matmul_size": 8192,
        "copy_bytes": 2**30,
        "host_calls": 200,
        "host_repeats": 5,
    },
    "dry-run": {
        "providers": ",".join(PROVIDER_ORDER),
        "warmup_ms": 0,
        "rep_ms": 0,
        "time_budget": None,
        "matmul_size": 256,
        "copy_bytes": 2**24,
        "host_calls": 2,
        "host_repeats": 1,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="(default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    mode.add_argument("--dry-run", dest="mode", action="store_const", const="dry-run")
    mode.add_argument("--report", type=Path, metavar="RESULTS_JSON", help="only regenerate the docs")
    parser.add_argument("--providers", help=f"comma list of {','.join(PROVIDER_ORDER)}")
    parser.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16,bf16")
    parser.add_argument("--time-budget", type=float, help="seconds from start before measuring stops")
    parser.add_argument("--warmup-ms", type=int, help="do_bench warmup per measurement")
    parser.add_argument("--rep-ms", type=int, help="do_bench repetition time per measurement")
    parser.add_argument("--out", type=Path, help="results directory (default: benchmarks/results)")
    parser.add_argument("--docs", type=Path, help="where benchmarks.md and img/bench/ go (default: docs/)")
    parser.add_argument("--core-fn", default="core:attention", help="module:function benchmarked as core")
    parser.set_defaults(mode="quick")
    args = parser.parse_args(argv)
    for flag, given, known in (
        ("--providers", args.providers, PROVIDER_ORDER),
        ("--dtypes", args.dtypes, DTYPE_NAMES),
    ):
        unknown = set((given or "").split(",")) - set(known) - {""}
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(sorted(unknown))}; choose from {','.join(known)}")
    return args


def display_path(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def log(line: str) -> None:
    print(line, flush=True)


def load_providers(names: list[str], core_target: str) -> tuple[list, dict[str, str]]:
    """Import what each provider needs; one that cannot load is reported, not fatal."""
    from attnbench.providers import ProviderError, explained_failures, make_providers

    loaded, unavailable = [], {}
    for provider in make_providers(names, core_target):
        try:
            with explained_failures():
                provider.load()
            loaded.append(provider)
        except ProviderError as failure:
            unavailable[provider.name] = str(failure)
            log(f"UNAVAILABLE {provider.name}: {failure}")
    return loaded, unavailable


def measure_machine(results: dict, core, device: str, settings: dict, timer) -> None:
    """The card's ceilings and core's host overhead per call (before the cases: both are quick)."""
    from attnbench import machine

    results["ceilings"] = machine.measure_ceilings(
        timer, device, settings["matmul_size"], settings["copy_bytes"]
    )
    log(f"ceilings: {results['ceilings']}")
    if core is not None:
        calls, repeats = settings["host_calls"], settings["host_repeats"]
        results["host"] = machine.measure_host_overhead(core.function, device, calls, repeats)
        log(f"host overhead: {results['host']}")


def check_graph_capture(results: dict, core, device: str, settings: dict) -> None:
    """Last, after the cases: a capture that fails can leave the CUDA context in a poor state."""
    from attnbench import machine

    if core is None:
        return
    if device == "cuda":
        graph = machine.check_cuda_graph(core.function, settings["host_calls"], settings["host_repeats"])
    else:
        graph = {"captured": False, "error": "no CUDA device (dry run)"}
    results["host"]["cuda_graph"] = graph
    log(f"CUDA graph: {graph}")


def run(args: argparse.Namespace) -> tuple[dict, Path, Path]:
    settings = dict(MODES[args.mode])
    overrides = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "time_budget": args.time_budget}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    dry_run = args.mode == "dry-run"
    if dry_run:  # must be set before core's kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch
    from attnbench.machine import describe_machine
    from attnbench.runner import Budget, run_plan
    from attnbench.timing import DeviceTimer, HostTimer

    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: no CUDA device. Use --dry-run on a CPU, or --report to regenerate the docs.")
    names = (args.providers or settings["providers"]).split(",")
    cases = PLANS[args.mode](tuple(args.dtypes.split(",")))
    providers, unavailable = load_providers(names, args.core_fn)
    timer = HostTimer() if dry_run else DeviceTimer(settings["warmup_ms"], settings["rep_ms"])
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        **describe_machine(device),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "mode": args.mode,
        "argv": sys.argv[1:],
        "core_fn": args.core_fn,
        "timer": timer.describe(),
        "time_budget_s": settings["time_budget"],
        "providers": [name for name in PROVIDER_ORDER if name in names],
        "unavailable": unavailable,
        "complete": False,
        "stop_reason": None,
        "elapsed_s": 0.0,
    }
    results = new_results(meta, cases)
    out_dir = args.out or (
        Path(tempfile.mkdtemp(prefix="bench-dry-run-")) if dry_run else BENCH_DIR / "results"
    )
    path = out_dir / f"{meta['card_slug']}-{now.strftime('%Y%m%d-%H%M')}.json"
    budget = Budget(settings["time_budget"], started=STARTED)

    def save() -> None:
        meta["elapsed_s"] = budget.spent()
        save_results(results, path)

    log(f"{meta['card']}, torch {meta['torch']}, triton {meta['triton']}: {len(cases)} cases -> {path}")
    core = next((provider for provider in providers if provider.name == "core"), None)
    measure_machine(results, core, device, settings, timer)
    records = {record["id"]: record for record in results["cases"]}
    stop_reason = run_plan(
        cases, providers, timer=timer, device=device, budget=budget, records=records, save=save, log=log
    )
    meta["complete"], meta["stop_reason"] = stop_reason is None, stop_reason
    check_graph_capture(results, core, device, settings)
    save()
    docs_dir = args.docs or (out_dir if dry_run else REPO_ROOT / "docs")
    return results, path, docs_dir


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        results, path, docs_dir = load_results(args.report), args.report, args.docs or REPO_ROOT / "docs"
    else:
        results, path, docs_dir = run(args)
    try:
        page = display_path(write_docs(results, display_path(path), docs_dir))
    except Exception as failure:  # the results file is what matters; the summary must still come last
        page = f"NOT WRITTEN ({type(failure).__name__}: {failure})"
    log(summary_text(results, display_path(path), page))


if __name__ == "__main__":
    main()
