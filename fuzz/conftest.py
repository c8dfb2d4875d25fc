"""Wiring of the fuzzer into pytest: the device, the profile, NaN-poisoned outputs and the report.

python -m pytest fuzz --profile ci -n 2        # or FUZZ_PROFILE=ci; docs/fuzzing.md lists the profiles
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU the kernels run under Triton's CPU interpreter, which Triton picks when the kernel
# modules are imported: so before anything imports core.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

import core
import core.testing
from fuzz import profiles, report, sharding


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
        help="also fuzz inputs holding inf/NaN (opt-in; or FUZZ_NONFINITE=1)",
    )


def pytest_configure(config):
    profile = profiles.activate(config.getoption("profile"))
    if profile.needs_gpu and core.is_interpreted():
        raise pytest.UsageError(f"fuzz profile {profile.name!r} needs a CUDA GPU; on the CPU use ci or dev")
    # The interpreter runs each tile in numpy, which warns when lanes that the kernel then masks away
    # (scores of hidden keys, padded rows) overflow; what matters is checked in the results themselves.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
    config.addinivalue_line("markers", "nonfinite: fuzzes inputs holding inf/NaN; runs only with --nonfinite")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_CollectWorkerReports(), "fuzz-worker-reports")


def pytest_collection_modifyitems(config, items):
    if config.getoption("nonfinite"):
        return
    skip = pytest.mark.skip(reason="inf/NaN inputs are opt-in: --nonfinite or FUZZ_NONFINITE=1")
    for item in items:
        if "nonfinite" in item.keywords:
            item.add_marker(skip)


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


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session):
    if _is_worker(session.config):  # hand this worker's tallies to the controller
        session.config.workeroutput["fuzz_report"] = report.snapshot()


class _CollectWorkerReports:
    """xdist's hook lives in a plugin object so that pytest without xdist never sees an unknown hook."""

    def pytest_testnodedown(self, node, error):
        report.merge(getattr(node, "workeroutput", {}).get("fuzz_report", {}))


def pytest_terminal_summary(terminalreporter, config):
    if _is_worker(config):
        return
    profile = config.getoption("profile")
    path = Path(
        os.environ.get("FUZZ_REPORT") or profiles.REPO / ".hypothesis" / f"fuzz-report-{profile}.json"
    )
    report.write(path, profile)
    terminalreporter.write_sep("=", f"fuzz profile {profile}: worst error / bound ratio (passes below 1)")
    terminalreporter.write_line(report.table())
    terminalreporter.write_line(f"report: {path}")
