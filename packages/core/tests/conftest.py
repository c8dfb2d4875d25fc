"""One suite, two targets (as JAX Pallas tests run the same properties compiled and interpreted).

Without a CUDA device the kernels run under Triton's CPU interpreter at small shapes; with one they are
compiled and the shape lists grow (N up to 4096, D up to 256). TRITON_INTERPRET must be set before core
(and so its @triton.jit kernels) is imported, which is why it happens here, at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import core  # noqa: E402  (must follow the TRITON_INTERPRET decision)
import core.testing  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def pytest_report_header(config):
    target = f"compiled on {torch.cuda.get_device_name()}" if ON_GPU else "Triton interpreter on CPU"
    return f"core kernels: {target}"


# The Hopper family runs twice: its one-program-per-tile forward ("hopper") and its persistent one.
HOPPER_PERSISTENT = "hopper-persistent"
FAMILIES = [*core.testing.families(), *([HOPPER_PERSISTENT] if "hopper" in core.testing.families() else [])]


@pytest.fixture(autouse=True, params=FAMILIES)
def family(request):
    """Every test runs once per kernel family this machine can run, the Hopper family once per forward
    kernel (core.testing.hopper_persistent off, then on). The portable family takes every call; another
    family is forced strictly, and a test that reaches a call it does not take is skipped there
    (pytest_runtest_call below): each family passes the properties of the calls it takes."""
    persistent = request.param == HOPPER_PERSISTENT
    name = "hopper" if persistent else request.param
    with core.testing.use_family(name, strict=name != "portable"), core.testing.hopper_persistent(persistent):
        yield request.param


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except Exception as failure:
        cause = failure  # tools such as torch.library.opcheck wrap the refusal in their own error
        while cause is not None and not isinstance(cause, core.testing.FamilyUnsupported):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        pytest.skip(str(cause))


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output starts as NaN, so an element the kernel forgot to write fails the test."""
    with core.testing.poisoned_outputs():
        yield


@pytest.fixture(autouse=True)
def fresh_plans():
    """Each test starts with no cached call plans, so a test that swaps a config or a layout rule sees
    its change, and every test exercises both a first call and its repeats."""
    core.testing.clear_plans()
