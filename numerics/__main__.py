"""python -m numerics: run the numerics lab and write docs/numerics.md.

python -m numerics                  # CPU: emulator + Triton interpreter at small sizes, then the report
python -m numerics --mode gpu       # compiled kernel at large sizes + SDPA; raw JSON under --out
python -m numerics --report         # regenerate docs/numerics.md from the saved CPU and GPU results
python -m numerics --only e1,e9     # a subset (prefixes of the experiment names)
"""

from __future__ import annotations

import os

# One BLAS/OpenMP thread. The emulator makes thousands of small tile matmuls, for which threads only add
# overhead, and on a shared machine multi-threaded BLAS spins so badly that a run slows down tenfold.
# (This must happen before numpy and torch are imported.)
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from numerics import kernel  # noqa: E402
from numerics.lab import RESULTS, Lab  # noqa: E402


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m numerics", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--out", type=Path, help="where this run's JSON goes (default numerics/results/<mode>)"
    )
    parser.add_argument(
        "--gpu-results", type=Path, default=RESULTS / "gpu", help="GPU results the report merges"
    )
    parser.add_argument("--only", help="comma-separated experiment name prefixes, e.g. e1,e9")
    parser.add_argument("--report", action="store_true", help="only regenerate docs/numerics.md")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if not args.report:
        if args.mode == "gpu":
            import torch

            if not torch.cuda.is_available():
                sys.exit("--mode gpu needs a CUDA device")
        # core's kernels are built for the interpreter or the GPU when core is first imported: decide first.
        kernel.load(args.mode)
        from numerics import experiments

        names = experiments.NAMES
        if args.only:
            prefixes = args.only.split(",")
            names = [n for n in names if any(n.startswith(p) for p in prefixes)]
        lab = Lab(args.mode, args.out or RESULTS / args.mode)
        for name in names:
            start = time.time()
            print(f"[numerics] {name} ...", flush=True)
            path = lab.save(name, experiments.load(name).run(lab), time.time() - start)
            print(f"[numerics] {name}: {time.time() - start:.1f} s -> {path}", flush=True)
        print(f"[numerics] {args.mode} run: {time.time() - lab.started:.1f} s", flush=True)
        if args.mode == "gpu":
            print("[numerics] now commit the JSON and run `python -m numerics --report` on a CPU machine")
            return 0
    from numerics import report

    path = report.write(RESULTS / "cpu", args.gpu_results)
    print(f"[numerics] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
