"""Sum the live summaries of fuzz runs: the slices of a nightly run, or any runs cut short.

    python -m fuzz.summary RUN_DIR_OR_FOLDER...    # e.g. the $OUT/fuzz folders of every slice's call

Reads every summary-*.json below the paths (fuzz/report.py writes one per process while the run goes
on), prints one line per run (profile, slice, seed, examples, failures, whether it finished) and the
total: examples and failures per property, the worst error/bound ratios, every failure file. Exits 1
when any run recorded a failure, else 0.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from fuzz import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories, or folders holding them")
    args = parser.parse_args(argv)
    summaries = report.load_summaries(args.paths)
    if not summaries:
        print(f"no summary-*.json under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2

    runs = defaultdict(list)  # run directory -> its processes' summaries
    for path, summary in summaries:
        runs[path.parent].append(summary)
    for directory, processes in sorted(runs.items()):
        first = processes[0]
        examples = sum(sum(p["examples"].values()) for p in processes)
        failed = sum(sum(p["failures"].values()) for p in processes)
        state = "finished" if all(p["finished"] for p in processes) else "cut short"
        slice_ = f" slice {first['slice']} seed {first['seed']}" if first.get("slice") else ""
        print(
            f"{directory.name}: {first['profile']}{slice_}, {examples} examples, {failed} failures, {state}"
        )
        listed = set()
        for summary in processes:
            listed.update(summary["failure_files"])
            report.merge({**summary, "failure_files": [str(directory / f) for f in summary["failure_files"]]})
        # A process killed between writing a failure file and its summary leaves the file unlisted.
        unlisted = sorted(
            str(path) for path in (directory / "failures").glob("*.json")
            if str(path.relative_to(directory)) not in listed
        )  # fmt: skip
        if unlisted:
            report.merge({"failure_files": unlisted})
    print(f"\nall {len(runs)} runs:")
    print(report.table())
    for path in report.snapshot()["failure_files"]:
        print(f"failure file: {path}")
    return 1 if report.snapshot()["failure_files"] else 0


if __name__ == "__main__":
    sys.exit(main())
