"""Controls for racecheck on warp-specialized kernels (sm_90): Gluon kernels with the Hopper forward's
partition shape (a default warpgroup, a second warpgroup and one producer warp; registers 240 and 24
of 168) whose partitions touch no shared memory of their own. Each partition stores a value loaded by
the default warpgroup (so it reaches them as a capture, through shared memory) into its own output.
The second control adds what the Hopper forward's default warpgroup has besides: an mbarrier
initialised before the partitions start and a barrier of the default warpgroup alone (`bar.sync 0,
128`) inside its partition, in case that is what racecheck misreads. The third keeps that barrier
and drops the mbarrier, to tell which of the two racecheck reacts to.

The sweep's racecheck runs of the Hopper forward report hazards whose both sides are instructions of
Triton's warp_specialize lowering, not of core's tiles (fuzz.sanitize_sites): the switch loop's
per-warp state bytes and the capture slot, which the lowering hands over across `bar.sync 1`.
Whatever racecheck reports on this control has the same origin.

    python -m fuzz.sanitize_control --out DIR    # on an sm_90 GPU machine: DIR/control-racecheck.log
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from fuzz.sanitize import REPO, SANITIZER
from fuzz.sanitize_sites import annotate

PROGRAMS = 8


# Triton 3.6 calls the barrier of a partition's warps thread_barrier; later releases, barrier.
_warpgroup_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _store(out, slot: gl.constexpr, value):
    gl.store(out + gl.program_id(0) * 3 + slot, value + slot)


@gluon.jit
def _default_warpgroup(out, value):
    _store(out, 0, value)


@gluon.jit
def _second_warpgroup(out, value):
    _store(out, 1, value)


@gluon.jit
def _producer_warp(out, value):
    _store(out, 2, value)


@gluon.jit
def _default_warpgroup_with_barriers(out, value, ready):
    _warpgroup_barrier()
    mbarrier.arrive(ready, count=1)  # keeps the mbarrier alive (and its own) through the partitions
    _store(out, 0, value)


@gluon.jit
def _default_warpgroup_with_barrier(out, value):
    _warpgroup_barrier()  # bar.sync 0, 128
    _store(out, 0, value)


@gluon.jit
def warp_specialize_control_kernel(out, source):
    """out (PROGRAMS, 3) float32: partition p of program i writes out[i, p] = source[0] + p."""
    value = gl.load(source)  # a load cannot be rematerialized in the partitions: it becomes a capture
    gl.warp_specialize(
        [
            (_default_warpgroup, (out, value)),
            (_second_warpgroup, (out, value)),
            (_producer_warp, (out, value)),
        ],
        [4, 1],
        [240, 24],
    )


@gluon.jit
def warp_specialize_control_kernel_with_barriers(out, source):
    """As warp_specialize_control_kernel, with an mbarrier initialised first and a warpgroup barrier in
    the default partition."""
    ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(ready, count=1)
    value = gl.load(source)
    gl.warp_specialize(
        [
            (_default_warpgroup_with_barriers, (out, value, ready)),
            (_second_warpgroup, (out, value)),
            (_producer_warp, (out, value)),
        ],
        [4, 1],
        [240, 24],
    )


@gluon.jit
def warp_specialize_control_kernel_with_barrier_only(out, source):
    """As warp_specialize_control_kernel, with the warpgroup barrier in the default partition and no
    mbarrier."""
    value = gl.load(source)
    gl.warp_specialize(
        [
            (_default_warpgroup_with_barrier, (out, value)),
            (_second_warpgroup, (out, value)),
            (_producer_warp, (out, value)),
        ],
        [4, 1],
        [240, 24],
    )


CONTROLS = (
    warp_specialize_control_kernel,
    warp_specialize_control_kernel_with_barriers,
    warp_specialize_control_kernel_with_barrier_only,
)


def run_child() -> None:
    import torch

    source = torch.tensor([10.0], device="cuda")
    expected = torch.tensor([10.0, 11.0, 12.0], device="cuda").expand(PROGRAMS, 3)
    for kernel in CONTROLS:
        out = torch.full((PROGRAMS, 3), float("nan"), device="cuda")
        kernel[(PROGRAMS,)](out, source, num_warps=4, maxnreg=168)
        torch.cuda.synchronize()
        assert torch.equal(out, expected), f"{kernel.fn.__name__} wrote {out.tolist()}"
    print("control kernels: every partition ran", flush=True)


def main(argv: list[str] | None = None) -> int:
    summary = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m fuzz.sanitize_control", description=summary)
    parser.add_argument("--out", type=Path, default=REPO / ".hypothesis" / "sanitize")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".hypothesis" / "sanitize-control-cache")
    parser.add_argument("--sanitizer", default=SANITIZER)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        run_child()
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "control-racecheck.log"
    env = {**os.environ, "TRITON_CACHE_DIR": str(args.cache_dir.resolve())}
    command = [args.sanitizer, "--tool", "racecheck", "--print-limit", "20",
               sys.executable, "-m", "fuzz.sanitize_control", "--child"]  # fmt: skip
    with open(log, "w") as handle:
        subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text(errors="replace")
    print("\n".join(line for line in text.splitlines() if "SUMMARY" in line or "control kernels" in line))
    print("\n".join(annotate(log, args.cache_dir)) or "racecheck named no hazard sites")
    return 0


if __name__ == "__main__":
    sys.exit(main())
