"""Sum the live summaries of fuzz runs: the slices of a nightly run, or any runs cut short.

    python -m fuzz.summary RUN_DIR_OR_FOLDER...    # e.g. the $OUT/fuzz folders of every slice's call
    python -m fuzz.summary --code PATH...           # only the runs on this checkout's kernels and fuzzer

Reads every summary-*.json below the paths (fuzz/report.py writes one per process while the run goes
on), prints one line per run (profile, slice, seed, examples, failures, whether it finished, the code
fingerprint and device it ran on) and the total: examples and failures per property, the worst
error/bound ratios, every failure file. With --code, runs whose fingerprint (report.code_fingerprint)
differs from this checkout's, or from the one given, are listed but left out of the total. Exits 1
when any counted run recorded a failure, else 0.
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
    parser.add_argument(
        "--code",
        nargs="?",
        const="this checkout",
        help="count only runs on this code fingerprint (default: this checkout's)",
    )
    args = parser.parse_args(argv)
    summaries = report.load_summaries(args.paths)
    if not summaries:
        print(f"no summary-*.json under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    wanted = report.code_fingerprint() if args.code == "this checkout" else args.code

    runs = defaultdict(list)  # run directory -> its processes' summaries
    for path, summary in summaries:
        runs[path.parent].append(summary)
    for directory, processes in sorted(runs.items()):
        first = processes[0]
        examples = sum(sum(p["examples"].values()) for p in processes)
        failed = sum(sum(p["failures"].values()) for p in processes)
        state = "finished" if all(p["finished"] for p in processes) else "cut short"
        slice_ = f" slice {first['slice']} seed {first['seed']}" if first.get("slice") else ""
        code = first.get("code", "unknown")
        left_out = wanted is not None and code != wanted
        print(
            f"{directory.name}: {first['profile']}{slice_}, {examples} examples, {failed} failures, {state};"
            f" code {code} on {first.get('device', 'an unrecorded device')}"
            + (" (left out: other code)" if left_out else "")
        )
        if left_out:
            continue
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
    counted = f"the runs on code {wanted}" if wanted else f"all {len(runs)} runs"
    print(f"\n{counted}:")
    print(report.table())
    for path in report.snapshot()["failure_files"]:
        print(f"failure file: {path}")
    return 1 if report.snapshot()["failure_files"] else 0


if __name__ == "__main__":
    sys.exit(main())
