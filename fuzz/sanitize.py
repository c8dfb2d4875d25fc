"""compute-sanitizer sweep: the fuzzer's problems, each run forward and backward under memcheck, synccheck and
racecheck, in parallel child processes, into one markdown table.

    python -m fuzz.sanitize --out DIR        # on the GPU machine; DIR/sanitize.md is the table

Problems are drawn with the fuzzer's own strategies (fuzz/strategies.py) from a fixed seed: odd and
edge lengths, GQA/MQA, head dims 1..256, contiguous, BSHD and sliced or padded views, every dtype,
causal and not, each with its upstream gradient. They cycle through the routes into core's kernels
(ROUTES): the portable kernels with tensor descriptors forced on (wherever the layout allows them, also
for problems too small to pay for them; fp16/bf16) and forced off (pointer loads only); the portable
kernels' sliding-window and softcap variants; packed batches (core.attention_varlen); KV-cache calls
(dense and paged caches, appends); decode-shaped calls forced onto the decode family (its split and
merge kernels, then the portable backward); and calls forced onto the Hopper family (fp16/bf16 at its
head dims, on an sm_90 GPU: a route whose family this machine lacks is left out). Within a route the
problems cycle through the (dtype, causal) kernel families. Each (problem, tool) runs in its own process,
`compute-sanitizer --tool T python -m fuzz.sanitize --child PROBLEM.json`, with PyTorch's caching
allocator off so that every tensor is its own allocation and a read past one is caught, and with one
Triton cache shared by all, so each kernel variant compiles once (in its memcheck run: memcheck runs
first, then synccheck, then racecheck, the slowest). A run past its per-tool time limit is killed and
listed as such, and so is a run the sweep's time budget cuts; runs it leaves no time for are listed as
not run. The table and results.json are rewritten after every run, so a sweep cut short keeps what it
found.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

TOOLS = ("memcheck", "synccheck", "racecheck")
# Every way into core's kernels that the sweep takes (draw_problems, run_child).
ROUTES = ("descriptors", "pointers", "window-softcap", "varlen", "kvcache", "decode", "hopper")
FORCED_FAMILY = {"decode": "decode", "hopper": "hopper"}  # routes run under core.testing.use_family
HALF_ONLY = ("descriptors", "hopper")  # routes float32 cannot take
REPO = Path(__file__).resolve().parents[1]
DONE = "SANITIZE_CHILD_DONE"  # the child's last line: it ran to the end (a crash can leave "0 errors")
KERNEL_PATH = "KERNEL_PATH "
MIN_RUN_SECONDS = 20  # a run is not started with less of the budget left: it could not finish
SANITIZER = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"


# --- Drawing the problems -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    index: int
    case: object  # fuzz.cases.Case, VarlenCase (route varlen) or KvCase (route kvcache)
    route: str  # one of ROUTES


def _limits():
    """Small problems: racecheck slows a kernel by orders of magnitude, and every edge (one row, one
    tile plus one, a masked head dim, rows that see no key) shows at a few hundred rows."""
    from fuzz.profiles import Limits

    return Limits(
        max_batch=2, max_kv_heads=2, max_group=3, max_seq=300, max_head_dim=256,
        max_scores=2**17, max_work=2**23,
    )  # fmt: skip


@contextlib.contextmanager
def _drawing_within(limits):
    """Make `limits` the active profile's while drawing (the layout strategies read the active profile),
    and restore the profile that was active before (under pytest: the run's)."""
    from hypothesis import settings

    from fuzz import profiles

    try:
        previous = profiles.active()
    except RuntimeError:
        previous = None
    profiles.activate(profiles.Profile("sanitize", True, limits, {}, settings()))
    try:
        yield
    finally:
        if previous is not None:
            profiles.activate(previous)


def routes() -> tuple[str, ...]:
    """The routes this machine can take: those whose forced family it runs."""
    import core.testing

    families = core.testing.families()
    return tuple(r for r in ROUTES if FORCED_FAMILY.get(r, "portable") in families)


def draw_problems(count: int, seed: int) -> list[Problem]:
    """`count` problems from the fuzzer's strategies, the same for the same seed (and machine)."""
    import torch

    from fuzz import sharding

    taken = routes()
    problems = []
    for index in range(count):
        route = taken[index % len(taken)]
        kernels = [k for k in sharding.KERNELS if not (route in HALF_ONLY and k[0] == torch.float32)]
        dtype, causal = kernels[(index // len(taken)) % len(kernels)]
        problems.append(draw_problem(index, route, dtype, causal, seed))
    return problems


def draw_problem(index: int, route: str, dtype, causal: bool, seed: int) -> Problem:
    """Problem `index` of a sweep: a case of `route` in the (dtype, causal) family."""
    from hypothesis import strategies as st

    from fuzz import strategies

    family = strategies.problems(dtypes=st.just(dtype), causal=st.just(causal))
    with _drawing_within(_route_limits(route, _limits(), dtype, causal)):
        case = _draw(_route_strategy(route, family, dtype, causal), seed * 1000 + index)
    return Problem(index, case, route)


def _route_limits(route: str, limits, dtype, causal: bool):
    """What a route draws within: tensor descriptors and the Hopper family need layouts and head dims
    the copy engine can read (16-byte rows; for the Hopper family, the head dims it takes at this
    causality and these lengths)."""
    import core.testing
    from fuzz.cases import Layout

    copyable = (Layout(), Layout(order=(0, 2, 1, 3)))
    if route == "descriptors":
        head_dims = tuple(range(8, 257, 8))
    elif route == "hopper":
        hopper = core.testing.family("hopper")
        head_dims = tuple(
            d for d in hopper.KERNEL_HEAD_DIMS if hopper.faster_than_portable(d, causal, limits.max_seq)
        )
    else:
        return limits
    return replace(limits, head_dims={dtype: head_dims}, layouts=copyable)


def _route_strategy(route: str, family, dtype, causal):
    """The strategy of one route's cases. Decode-shaped and Hopper problems are drawn as any problem,
    then given the lengths their family takes: at most 4 queries against the decode family's threshold
    plus up to 300 keys; at least two query tiles for the Hopper family."""
    from hypothesis import strategies as st

    import core.testing
    from fuzz import strategies

    def lengths(case, n_queries, n_keys):
        return replace(case, problem=replace(case.problem, n_queries=n_queries, n_keys=n_keys))

    if route == "window-softcap":
        return strategies.cases(problem=strategies.windowed_problems(family))
    if route == "varlen":
        return strategies.varlen_cases().map(lambda c: replace(c, dtype=dtype, causal=causal))
    if route == "kvcache":
        return strategies.kvcache_cases().map(lambda c: replace(c, dtype=dtype, causal=causal))
    if route == "decode":
        least = core.testing.decode.config.min_keys_for_attention(core.testing.is_interpreted())
        return strategies.cases(problem=family).map(
            lambda c: lengths(c, 1 + (c.problem.n_queries - 1) % 4, least + c.problem.n_keys)
        )
    if route == "hopper":
        hopper = core.testing.family("hopper")
        return st.tuples(strategies.cases(problem=family), st.integers(0, 44)).map(
            lambda drawn: lengths(
                drawn[0], 2 * hopper.tile_config(drawn[0].problem.head_dim).block_m + drawn[1],
                drawn[0].problem.n_keys,
            )
        )  # fmt: skip
    return strategies.cases(problem=family)


def _draw(strategy, seed: int):
    """One value of `strategy`, the same for the same seed: the last of a few examples (hypothesis' first
    ones are its simplest)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    drawn = []

    @hypothesis_seed(seed)
    @settings(max_examples=8, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(value=strategy)
    def collect(value):
        drawn.append(value)

    collect()
    return drawn[-1]


# --- One child: a problem forward and backward ----------------------------------------------------------


@contextlib.contextmanager
def forced_kernel_path(path: str):
    """Tensor descriptors on wherever the layout allows (also for problems too small to pay for them), or
    off everywhere. The one place this script reads core's launch rules."""
    import core.testing

    _launch = core.testing.portable.plans

    name, forced = (
        ("descriptors_pay_off", lambda *sizes: True) if path == "descriptors" else
        ("descriptors_fit", lambda *tensors: False)
    )  # fmt: skip
    original = getattr(_launch, name)
    setattr(_launch, name, forced)
    try:
        yield
    finally:
        setattr(_launch, name, original)


def run_child(problem_file: Path) -> None:
    import fuzz.conftest  # noqa: F401  first: on a CPU machine it sets TRITON_INTERPRET=1 before core
    from fuzz.cases import from_data

    spec = json.loads(problem_file.read_text())
    case, route = from_data(spec["case"]), spec["route"]
    with _on_route(route):
        run_route(case, route)
        print(KERNEL_PATH + json.dumps(_kernel_path(case, route)), flush=True)
    print(DONE, flush=True)


@contextlib.contextmanager
def _on_route(route: str):
    import core.testing

    if route in ("descriptors", "pointers"):
        with forced_kernel_path(route):
            yield
    elif route in FORCED_FAMILY:
        with core.testing.use_family(FORCED_FAMILY[route]):  # strict: a call it cannot take raises
            yield
    else:
        yield


def run_route(case, route: str) -> None:
    """One problem through its route, forward and backward (KV-cache calls: the append and the
    attention; they have no backward), then a device synchronisation, so that every kernel has run
    before the child prints its last line."""
    import torch

    import core
    from fuzz import oracle
    from fuzz.cases import KvInputs, build, build_varlen

    if route == "kvcache":
        oracle.run_kvcache(case, KvInputs(case, oracle.DEVICE))
    elif route == "varlen":
        packed = build_varlen(case, oracle.DEVICE)
        out = core.attention_varlen(
            packed.q, packed.k, packed.v, packed.cu_seqlens_q, packed.cu_seqlens_k, max(*case.lens_q, 1),
            max(*case.lens_k, 1), **case.options,
        )  # fmt: skip
        out.backward(packed.dout)
    else:
        oracle.run_kernel(case, build(case, oracle.DEVICE), backward=True)
    if oracle.DEVICE == "cuda":
        torch.cuda.synchronize()


def _kernel_path(case, route: str) -> dict:
    """What path_taken reads: the plans' launches of a dense call, the route of the others."""
    from fuzz import failures
    from fuzz.cases import Case

    return failures.kernel_path(case) if isinstance(case, Case) else {"route": route}


# --- Reading a run's output ------------------------------------------------------------------------------


@dataclass
class Outcome:
    errors: int | None  # None: no summary line (the run did not finish)
    warnings: int
    finished: bool  # the child printed its last line
    kernel_path: dict | None


def parse_output(text: str) -> Outcome:
    """The sanitizer's error count ("ERROR SUMMARY: N errors", and racecheck's "RACECHECK SUMMARY: H
    hazards displayed (E errors, W warnings)"), and what the child itself printed."""
    counts = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) errors?", text)]
    warnings = 0
    for _, errors, warned in re.findall(
        r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warn", text
    ):
        counts.append(int(errors))
        warnings += int(warned)
    path = next(
        (line[len(KERNEL_PATH) :] for line in text.splitlines() if line.startswith(KERNEL_PATH)), None
    )
    return Outcome(
        errors=max(counts) if counts else None,
        warnings=warnings,
        finished=DONE in text,
        kernel_path=json.loads(path) if path else None,
    )


def path_taken(kernel_path: dict | None) -> str:
    """Which family ran the forward (where not the portable one) and which kernels read through tensor
    descriptors, as the child's plans say; the route, for calls whose plans the child does not list."""
    if kernel_path is None:
        return "?"
    if "route" in kernel_path:
        return kernel_path["route"]
    family = kernel_path["forward"].get("plan", "").split(".")[2:3]
    prefix = f"{family[0]} fwd, " if family and family[0] != "portable" else ""
    # Each pass names its plan's module and maps launch names to their settings (failures.kernel_path).
    forward = {
        "fwd" if name == "launch" else f"fwd {name}": launch
        for name, launch in kernel_path["forward"].items()
    }
    launches = {**forward, **kernel_path["backward"]}
    launches = {name: launch for name, launch in launches.items() if isinstance(launch, dict)}
    through = [name for name, launch in launches.items() if launch.get("TENSOR_DESCRIPTORS")]
    return prefix + (f"descriptors ({', '.join(through)})" if through else "pointers")


def shape_label(case) -> str:
    from fuzz.cases import KvCase, VarlenCase

    if isinstance(case, VarlenCase):
        mask = ("causal" if case.causal else "full") + _features(case.window_size, case.softcap)
        return (
            f"varlen {len(case.lens_q)} seqs, Nq {'/'.join(map(str, case.lens_q))}, Nk "
            f"{'/'.join(map(str, case.lens_k))}, H{case.q_heads}/{case.kv_heads} D{case.head_dim} {mask}"
        )
    if isinstance(case, KvCase):
        mask = ("causal" if case.causal else "full") + _features(case.window, case.softcap)
        cache = f"paged {case.page}" if case.page else "dense"
        return (
            f"kvcache B{case.batch} H{case.q_heads}/{case.kv_heads} Nq{case.n_queries} cache {case.capacity} "
            f"{cache} +{case.n_new} D{case.head_dim} {mask}"
        )
    p = case.problem

    def layout(lay) -> str:
        if lay == type(lay)():
            return "dense"
        return "bshd" if lay == type(lay)(order=(0, 2, 1, 3)) else "view"

    views = ",".join(layout(lay) for lay in case.layouts)
    mask = ("causal" if p.causal else "full") + _features(p.window_size, p.softcap)
    return f"B{p.batch} H{p.q_heads}/{p.kv_heads} N{p.n_queries}/{p.n_keys} D{p.head_dim} {mask} {views}"


def _features(window: tuple[int, int], softcap: float) -> str:
    window_text = f" window {window[0]},{window[1]}" if tuple(window) != (-1, -1) else ""
    return window_text + (f" softcap {softcap:.3g}" if softcap else "")


def dtype_of(case) -> str:
    dtype = case.problem.dtype if hasattr(case, "problem") else case.dtype
    return str(dtype).removeprefix("torch.")


# --- The sweep -----------------------------------------------------------------------------------------


@dataclass
class Run:
    problem: Problem
    tool: str
    status: str = "not run (time budget)"
    errors: int | None = None
    warnings: int = 0
    seconds: float = 0.0
    path: str = "?"
    log: str = ""


def status_of(outcome: Outcome, returncode: int) -> str:
    if outcome.errors:
        return "ERRORS"
    if not outcome.finished or returncode != 0:
        return f"child failed (exit {returncode})"
    if outcome.errors is None:
        return "no summary"
    return "clean"


def table(runs: list[Run], header: list[str]) -> str:
    columns = "| # | shape (B H/Hkv N/Nk D mask q,k,v) | dtype | path | tool | errors | status | seconds |"
    lines = [*header, "", columns, "|---:|---|---|---|---|---:|---|---:|"]
    for run in sorted(runs, key=lambda r: (r.problem.index, TOOLS.index(r.tool))):
        dtype = dtype_of(run.problem.case)
        errors = (
            "-"
            if run.errors is None
            else f"{run.errors}" + (f" (+{run.warnings} warn)" if run.warnings else "")
        )
        lines.append(
            f"| {run.problem.index} | {shape_label(run.problem.case)} | {dtype} | {run.path} | {run.tool} | "
            f"{errors} | {run.status} | {run.seconds:.0f} |"
        )
    flagged = [r for r in runs if r.status not in ("clean", "not run (time budget)")]
    if flagged:
        lines += ["", "Runs that were not clean (their logs are in logs/):", ""]
        lines += [f"- #{r.problem.index} {r.tool}: {r.status}, logs/{r.log}" for r in flagged]
    return "\n".join(lines) + "\n"


def _tally(runs: list[Run]) -> str:
    by_status: dict[str, int] = {}
    for run in runs:
        by_status[run.status] = by_status.get(run.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))


def sweep(args) -> int:
    from fuzz import failures, report
    from fuzz.cases import to_data

    out = args.out.resolve()
    (out / "problems").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    problems = draw_problems(args.problems, args.seed)
    for problem in problems:
        spec = {"case": to_data(problem.case), "route": problem.route}
        report.write_json_atomically(out / "problems" / f"{problem.index:02d}.json", spec)

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            (str(REPO), str(REPO / "packages" / "core" / "src"), os.environ.get("PYTHONPATH", ""))
        ),
        "PYTORCH_NO_CUDA_MEMORY_CACHING": "1",  # each tensor its own allocation: reads past it are caught
        "TRITON_CACHE_DIR": str(args.cache_dir.resolve()),
    }
    tools = [t for t in TOOLS if t in args.tools]
    runs = [Run(problem, tool) for tool in tools for problem in problems]  # every memcheck run first
    deadline = time.monotonic() + args.budget
    lock = threading.Lock()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    machine = failures.environment()

    def write() -> None:
        header = [
            f"# compute-sanitizer sweep, {started}",
            "",
            f"{machine['device']}, commit {machine['commit']}, "
            f"torch {machine['torch']}, triton {machine['triton']}.",
            f"{len(problems)} problems (seed {args.seed}) x {', '.join(tools)}, {args.jobs} processes, "
            f"{args.budget:.0f} s budget: {_tally(runs)}.",
            "",
            f"`{' '.join(args.command_line)}`",
        ]
        (out / "sanitize.md").write_text(table(runs, header))
        results = [
            {"problem": r.problem.index, "shape": shape_label(r.problem.case), "route": r.problem.route,
             "path": r.path, "tool": r.tool, "status": r.status, "errors": r.errors, "warnings": r.warnings,
             "seconds": round(r.seconds, 1), "log": r.log, "case": to_data(r.problem.case)}
            for r in runs
        ]  # fmt: skip
        report.write_json_atomically(out / "results.json", results)

    def execute(run: Run) -> None:
        if time.monotonic() > deadline - MIN_RUN_SECONDS:
            return
        run.log = f"{run.problem.index:02d}-{run.tool}.log"
        problem_file = out / "problems" / f"{run.problem.index:02d}.json"
        command = [
            args.sanitizer, "--tool", run.tool, "--print-limit", "20",
            sys.executable, "-m", "fuzz.sanitize", "--child", str(problem_file),
        ]  # fmt: skip
        begin = time.monotonic()
        # Within the tool's limit and within the sweep's budget: the sweep ends on time.
        limit = min(
            args.memcheck_timeout if run.tool == "memcheck" else args.timeout, max(deadline - begin, 1)
        )
        with open(out / "logs" / run.log, "w") as log:
            child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
            try:
                returncode = child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)  # the sanitizer and the python it runs
                returncode = None
                child.wait()
        outcome = parse_output((out / "logs" / run.log).read_text(errors="replace"))
        with lock:
            run.seconds = time.monotonic() - begin
            run.errors, run.warnings, run.path = (
                outcome.errors,
                outcome.warnings,
                path_taken(outcome.kernel_path),
            )
            run.status = f"timeout ({limit:.0f} s)" if returncode is None else status_of(outcome, returncode)
            write()

    write()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(execute, run) for run in runs]:
            future.result()
    write()
    _append_hazard_sites(out / "sanitize.md", [out / "logs" / r.log for r in runs if r.tool == "racecheck"
                                               and r.status == "ERRORS"], args.cache_dir)  # fmt: skip
    # The device tool returns a few files of $OUT: the logs and problems travel as one archive.
    with tarfile.open(out / "logs.tar.gz", "w:gz") as archive:
        archive.add(out / "logs", arcname="logs")
        archive.add(out / "problems", arcname="problems")
    print((out / "sanitize.md").read_text())
    return 1 if any(r.status == "ERRORS" for r in runs) else 0


def _append_hazard_sites(table_file: Path, logs: list[Path], cache_dir: Path) -> None:
    """Under the table, the SASS instruction of each racecheck hazard's two accesses (fuzz.sanitize_sites),
    so that the table says whose shared memory races: core's tiles or the compiler's bookkeeping."""
    from fuzz.sanitize_sites import annotate

    if not logs:
        return
    lines = ["", "Racecheck hazard sites (the instruction at each offset, from the sweep's Triton cache):"]
    lines.append("")
    for log in logs:
        try:
            sites = annotate(log, cache_dir)
        except (OSError, subprocess.SubprocessError, ImportError) as failure:
            sites = [f"could not disassemble: {failure!r}"]
        lines += [f"- logs/{log.name}:", *(f"    {line}" for line in sites)]
    with open(table_file, "a") as handle:
        handle.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fuzz.sanitize", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / ".hypothesis" / "sanitize", help="output directory"
    )
    parser.add_argument("--problems", type=int, default=70, help="10 per route on an sm_90 GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, of " + ", ".join(TOOLS))
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="parallel runs")
    parser.add_argument("--budget", type=float, default=330, help="seconds the sweep's runs may take in all")
    parser.add_argument("--memcheck-timeout", type=float, default=240, help="per run, compiling included")
    parser.add_argument("--timeout", type=float, default=120, help="per synccheck / racecheck run")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".hypothesis" / "sanitize-triton-cache")
    parser.add_argument("--sanitizer", default=SANITIZER)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0
    if not (Path(args.sanitizer).is_file() or shutil.which(args.sanitizer)):
        parser.error(f"no compute-sanitizer at {args.sanitizer}: pass --sanitizer PATH")
    unknown = set(args.tools.split(",")) - set(TOOLS)
    if unknown:
        parser.error(f"--tools: unknown {', '.join(sorted(unknown))}; choose from {', '.join(TOOLS)}")
    args.command_line = ["python -m fuzz.sanitize", *argv]
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
