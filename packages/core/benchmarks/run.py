"""One entry point for every benchmark and kernel tool: `python packages/core/benchmarks/run.py TOOL [ARGS]`
(`nox -s bench -- TOOL [ARGS]` runs the same). `run.py TOOL --help` lists a tool's options.

    kernels   core vs SDPA (FLASH, CUDNN, EFFICIENT) and compiled FlexAttention, TFLOP/s; writes
              docs/benchmarks.md (bench.py; --quick, --full, --dry-run, --report FILE)
    e2e       a transformers Llama training step: tokens/s for core vs SDPA, eager and compiled (e2e.py)
    host      host microseconds per call of every route (eager, op, compiled, no cache), and SDPA's
    sweep     tile and load variants of the portable kernels vs FLASH/CUDNN, one GPU call (sweep.py)
    ab        the working tree's kernels vs a baseline copy of core, in one GPU process (ab.py)
    bitwise   the working tree's results vs a baseline copy of core's, bitwise, GPU or CPU (bitwise.py)
    report    registers, spills and loop instruction mix from an sm_90a compile, on the CPU (kernel_report.py)
    compile   torch.compile over core.attention: graph breaks, recompiles, bitwise vs eager (GPU or CPU)
    hopper    the Hopper family's forward: checks and timing (GPU), or --report (sm_90a compile on CPU)
    fused     the portable family's fused backward (behind its switch) vs the split one, timed (GPU)
    cp        context parallelism: the simulated ring's overhead on one GPU; with --multi under torchrun,
              ring and Ulysses attention per-GPU TFLOP/s and scaling (context_parallel.py)
    decode    KV-cache decode (core.attention_with_kvcache, dense and paged) vs SDPA FLASH/CUDNN and core's
              portable path, GB/s against the measured copy bandwidth (decode.py; --quick, --out FILE)
    features  packed documents (varlen), a sliding window and softcapping: core vs Flex and SDPA (features.py)

Every tool but `report`, `compile`, `bitwise` (and `kernels --report`/`--dry-run`) needs a CUDA GPU.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

TOOLS = {
    "kernels": "bench",
    "e2e": "e2e",
    "host": "host_profile",
    "sweep": "sweep",
    "ab": "ab",
    "bitwise": "bitwise",
    "report": "kernel_report",
    "compile": "compile_matrix",
    "hopper": "hopper_fwd_check",
    "fused": "fused_bwd_check",
    "cp": "context_parallel",
    "decode": "decode",
    "features": "features",
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in TOOLS:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))  # the tools import attnbench and each other by plain name
    importlib.import_module(TOOLS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
