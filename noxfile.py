"""Every job of the monorepo, one nox session each.

On a CPU machine each session builds its own virtualenv (torch's CPU build and triton >= 3.9, whose
interpreter runs the kernels on the CPU). On an offline GPU machine that already has torch and triton,
run the same sessions without building anything:

    nox --no-venv -s tests          # uses the python on PATH; packages/core/src is put on PYTHONPATH

Extra arguments after `--` go to the underlying command (pytest, the fuzzer, the benchmark).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CORE = ROOT / "packages" / "core"

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

# torch 2.13.0 resolves to a CPU wheel on our CPU machines; triton >= 3.9 is the first interpreter that
# works with numpy >= 2.4.
CPU_STACK = ["torch==2.13.0", "triton>=3.9"]
TEST_DEPS = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "hypothesis>=6.100",
    "numpy>=1.26",
    "scipy>=1.11",
    "matplotlib>=3.8",
    "transformers>=4.54",  # core.integrations.transformers and its tests (optional for users)
]


def _passthrough(session: nox.Session) -> bool:
    """True under `--no-venv`: use the interpreter on PATH as it is, install nothing."""
    return session.venv_backend == "none"


def _prepare(session: nox.Session) -> dict[str, str]:
    """Install the stack (unless passthrough) and return the environment for session.run."""
    env = {"PYTHONUNBUFFERED": "1"}
    if _passthrough(session):
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(CORE / "src"), os.environ.get("PYTHONPATH", "")) if p
        )
    else:
        session.install(*CPU_STACK, *TEST_DEPS)
        session.install("-e", str(CORE))
        env["PYTHONPATH"] = str(ROOT)
    return env


@nox.session
def tests(session: nox.Session) -> None:
    """The core suite (interpreted on CPU, compiled on a GPU: the tests' conftest.py decides), plus the
    benchmark harnesses' and the numerics emulator's own CPU tests."""
    env = _prepare(session)
    args = session.posargs or ["-n", "auto", "-q"]
    suites = [
        CORE / "tests",
        CORE / "benchmarks" / "test_bench_harness.py",
        CORE / "benchmarks" / "test_e2e.py",
        ROOT / "numerics" / "test_emulator.py",
    ]
    session.run("python", "-m", "pytest", *map(str, suites), *args, env=env)


@nox.session
def fuzz(session: nox.Session) -> None:
    """Hypothesis fuzzer vs the float64 reference. Profile: `-- --profile nightly` or FUZZ_PROFILE."""
    env = _prepare(session)
    session.run("python", "-m", "pytest", str(ROOT / "fuzz"), *session.posargs, env=env)


@nox.session
def numerics(session: nox.Session) -> None:
    """The numerics lab: experiments, tables, plots and docs/numerics.md."""
    env = _prepare(session)
    session.run("python", "-m", "numerics", *session.posargs, env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks and kernel tools, one entry point: `nox -s bench -- TOOL [ARGS]` (kernels, e2e, host,
    sweep, ab, report; packages/core/benchmarks/run.py lists them). Without a tool: `kernels`."""
    env = _prepare(session)
    args = session.posargs or ["kernels"]
    session.run("python", str(CORE / "benchmarks" / "run.py"), *args, env=env)


@nox.session
def demo(session: nox.Session) -> None:
    """Compute attention on a default problem, check it against float64, print error and time."""
    env = _prepare(session)
    session.run("python", str(CORE / "demo.py"), *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole repository."""
    if not _passthrough(session):
        session.install("ruff>=0.6")
    session.run("ruff", "check", str(ROOT))
    session.run("ruff", "format", "--check", str(ROOT))
