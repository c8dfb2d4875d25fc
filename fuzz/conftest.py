"""Wiring of the fuzzer into pytest: the device, the profile, NaN-poisoned outputs, failure files and the
report.

python -m pytest fuzz --profile ci -n 2        # or FUZZ_PROFILE=ci; docs/fuzzing.md lists the profiles

Every run gets its own report directory (printed in the header and the summary) holding a failure file
per failing example (fuzz/failures.py) and each process's live summary (fuzz/report.py), both written
while the run goes on, so a run cut short keeps them.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import torch

# Without a GPU the kernels run under Triton's CPU interpreter, which Triton picks when the kernel
# modules are imported: so before anything imports core.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import triton
from hypothesis import Phase

import core
import core.testing
from fuzz import failures, profiles, sharding
from fuzz import report as fuzz_report


def pytest_addoption(parser):
    group = parser.getgroup("fuzz", "flash-attention fuzzer")
    group.addoption(
        "--profile",
        choices=sorted(profiles.PROFILES),
        default=os.environ.get("FUZZ_PROFILE", profiles.DEFAULT),
        help=f"fuzz profile (default: FUZZ_PROFILE or {profiles.DEFAULT})",
    )
    group.addoption(
        "--nonfinite",
        action="store_true",
        default=os.environ.get("FUZZ_NONFINITE") == "1",
        help="also fuzz inputs holding inf/NaN (opt-in; or FUZZ_NONFINITE=1; the GPU profiles always do)",
    )
    group.addoption(
        "--slice", metavar="K/N", help="run slice K of N of a profile that runs in slices (nightly)"
    )
    group.addoption(
        "--fuzz-seed",
        type=int,
        help="seed of the slices' menus, the same for every slice of a run (default: today's date, UTC)",
    )
    group.addoption("--db", metavar="DIR", help="the example database directory (default: FUZZ_DATABASE)")
    group.addoption(
        "--time-box",
        type=float,
        metavar="SECONDS",
        help="draw no new examples after this many seconds of the run (0: none; default: the profile's)",
    )
    group.addoption(
        "--budget-scale",
        type=float,
        metavar="X",
        help="multiply every property's example budget by X (e.g. 4 for a call with a warm Triton cache)",
    )
    group.addoption(
        "--report-dir",
        metavar="DIR",
        default=os.environ.get("FUZZ_REPORT_DIR", str(profiles.REPO / ".hypothesis" / "fuzz-runs")),
        help="where each run makes its report directory (default: FUZZ_REPORT_DIR or .hypothesis/fuzz-runs)",
    )


def _slice(config, seed: int) -> profiles.Slice | None:
    text = config.getoption("slice")
    if text is None:
        return None
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise pytest.UsageError(f"--slice {text}: expected K/N, e.g. 3/8")
    return profiles.Slice(int(index), int(count), seed)


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _is_controller(config) -> bool:
    """The xdist controller: it hands the tests to workers and runs none itself."""
    return not _is_worker(config) and getattr(config.option, "dist", "no") != "no"


def pytest_configure(config):
    # What every process of the run shares: the controller decides, the xdist workers are told.
    shared = config.workerinput["fuzz_run"] if _is_worker(config) else None
    seed = (
        shared["seed"]
        if shared
        else config.getoption("fuzz_seed") or int(time.strftime("%Y%m%d", time.gmtime()))
    )
    slice_ = _slice(config, seed)
    try:
        profile = profiles.for_run(
            config.getoption("profile"),
            slice_,
            config.getoption("db"),
            config.getoption("time_box"),
            config.getoption("budget_scale"),
        )
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    profiles.activate(profile)
    if profile.needs_gpu and core.is_interpreted():
        raise pytest.UsageError(f"fuzz profile {profile.name!r} needs a CUDA GPU; on the CPU use ci or dev")
    # The interpreter runs each tile in numpy, which warns when lanes that the kernel then masks away
    # (scores of hidden keys, padded rows) overflow; what matters is checked in the results themselves.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
    config.addinivalue_line("markers", "nonfinite: fuzzes inputs holding inf/NaN; runs only with --nonfinite")

    if shared:
        directory, deadline = Path(shared["directory"]), shared["deadline"]
    else:
        directory = _new_run_directory(config, profile, slice_)
        deadline = time.time() + profile.time_box if profile.time_box else None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)
        if config.pluginmanager.hasplugin("xdist"):
            handed = {"directory": str(directory), "deadline": deadline, "seed": seed}
            config.pluginmanager.register(_HandRunToWorkers(handed), "fuzz-run-to-workers")
    worker = config.workerinput["workerid"] if _is_worker(config) else "main"
    shrinks = Phase.shrink in profile.settings.phases
    failures.configure(failures.Run(directory, profile.name, worker, deadline, shrinks))
    config.fuzz_header = _header(profile, slice_, directory, deadline)
    if not _is_controller(config):
        summary = directory / f"summary-{worker}.json"
        fuzz_report.start_summary(summary, {**config.fuzz_header, "worker": worker})


def _new_run_directory(config, profile: profiles.Profile, slice_: profiles.Slice | None) -> Path:
    name = profile.name + (f"-slice-{slice_.index}-of-{slice_.count}" if slice_ else "")
    directory = (
        Path(config.getoption("report_dir")) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    directory.mkdir(parents=True)
    return directory.resolve()


def _header(
    profile: profiles.Profile, slice_: profiles.Slice | None, directory: Path, deadline: float | None
) -> dict:
    database = profile.settings.database
    return {
        "profile": profile.name,
        "slice": str(slice_) if slice_ else None,
        "seed": slice_.seed if slice_ else None,
        "examples_budget": profile.total_examples,
        "time_box": profile.time_box,
        "deadline": deadline,
        "database": getattr(database, "path", None) and str(database.path),
        "run_directory": str(directory),
        "code": fuzz_report.code_fingerprint(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)",
    }


def _interrupt(signum, frame):
    """SIGTERM (what `timeout` sends) stops the run as Ctrl-C does, so pytest still reports what failed."""
    raise KeyboardInterrupt(f"signal {signum}")


class _HandRunToWorkers:
    """xdist's hook lives in a plugin object so that pytest without xdist never sees an unknown hook."""

    def __init__(self, shared: dict):
        self.shared = shared

    def pytest_configure_node(self, node):
        node.workerinput["fuzz_run"] = self.shared


def pytest_report_header(config):
    h = config.fuzz_header
    lines = [
        f"fuzz profile {h['profile']}"
        + (f", slice {h['slice']} (seed {h['seed']})" if h["slice"] else "")
        + f": at most {h['examples_budget']} examples"
        + (f", time box {h['time_box']:.0f} s" if h["time_box"] else "")
        + (f", database {h['database']}" if h["database"] else ""),
        f"fuzz report directory (failure files, live summaries): {h['run_directory']}",
        f"fuzz code fingerprint {h['code']} on {h['device']}, torch {h['torch']}, triton {h['triton']}",
    ]
    return lines


def pytest_collection_modifyitems(config, items):
    for function in {item.obj for item in items if hasattr(getattr(item, "obj", None), "hypothesis")}:
        function.hypothesis.inner_test = failures.recording(function.hypothesis.inner_test)
    _interleave_by_property(items)
    if config.getoption("nonfinite") or profiles.active().nonfinite:
        return
    skip = pytest.mark.skip(reason="inf/NaN inputs are opt-in: --nonfinite or FUZZ_NONFINITE=1")
    for item in items:
        if "nonfinite" in item.keywords:
            item.add_marker(skip)


def _interleave_by_property(items) -> None:
    """Order the items round-robin over the properties (test functions): each property's first (dtype,
    causal) family, then each one's second, ... A time box that ends a GPU run skips the items not yet
    started, and in collection order those were all of the last properties' (window/varlen's, in a cold
    gpu-1k run); interleaved, every property runs its first families. Deterministic, so every xdist
    worker sees the same order."""
    order: dict[tuple, int] = {}
    seen: dict[tuple, int] = {}
    keys = {}
    for item in items:
        prop = (str(item.path), getattr(item, "originalname", None) or item.nodeid)
        order.setdefault(prop, len(order))
        keys[item.nodeid] = (seen.get(prop, 0), order[prop])
        seen[prop] = seen.get(prop, 0) + 1
    items.sort(key=lambda item: keys[item.nodeid])


@pytest.fixture(autouse=True)
def fuzz_item(request):
    """Name the running test item for its failure files, and skip it once the time box is over."""
    if failures.past_time_box():
        pytest.skip("the run's time box was over before this test item started")
    token = failures.entered_item(request.node.nodeid, frozenset(request.fixturenames))
    yield
    failures.left_item(token)


@pytest.fixture(autouse=True)
def kernel_family(request):
    """Make a sharded test item's (dtype, causal) family the one its strategies draw (fuzz/sharding.py).
    Hypothesis draws every example inside this fixture, and the value never changes between them."""
    callspec = getattr(request.node, "callspec", None)
    token = sharding.entered(callspec.params.get("kernel") if callspec else None)
    yield
    sharding.left(token)


@pytest.fixture(scope="session", autouse=True)
def nan_poisoned_outputs():
    """Every kernel output starts as NaN, so an element the kernels never write cannot pass as a value."""
    with core.testing.poisoned_outputs():
        yield


def pytest_runtest_logstart(nodeid, location):
    if fuzz_report.live():
        fuzz_report.item_started(nodeid)


def pytest_runtest_logreport(report):
    if fuzz_report.live() and (report.when == "call" or (report.when == "setup" and not report.passed)):
        examples = failures.examples_run(report.nodeid)
        fuzz_report.item_finished(report.nodeid, report.outcome, report.duration, examples)


def pytest_sessionfinish(session):
    if fuzz_report.live():
        fuzz_report.flush(finished=True)


def pytest_terminal_summary(terminalreporter, config):
    if _is_worker(config):
        return
    header = config.fuzz_header
    directory = Path(header["run_directory"])
    if _is_controller(config):  # the workers' tallies, as their summaries hold them
        for _, summary in fuzz_report.load_summaries([directory]):
            fuzz_report.merge(summary)
    fuzz_report.write(directory / "report.json", header)
    terminalreporter.write_sep(
        "=", f"fuzz profile {header['profile']}: worst error / bound ratio (passes below 1)"
    )
    terminalreporter.write_line(fuzz_report.table())
    terminalreporter.write_line(f"report directory: {directory}")
    for path in fuzz_report.snapshot()["failure_files"]:
        terminalreporter.write_line(f"failure file: {directory / path}")
    if fuzz_report.snapshot()["failure_files"]:
        terminalreporter.write_line("replay one: python -m fuzz.replay FILE")
