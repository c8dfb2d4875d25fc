"""Re-run one failing example from its failure file (fuzz/failures.py), on this machine's device.

    python -m fuzz.replay .hypothesis/fuzz-runs/RUN/failures/FILE.json           # the latest example
    python -m fuzz.replay FILE.json --found                                      # the one first found

Prints the verdicts (error / bound per quantity) and the error, and exits 1 if the example still fails,
0 if it passes now, 2 if it cannot be replayed. The property runs exactly as under pytest (its own
body, NaN-poisoned outputs, hypothesis' assume/event/target active), with the arguments the file holds.
Inputs are rebuilt from the case's seeds on this device: a failure found on the GPU replays with other
values on the CPU (torch generates them per device), so replay GPU failures on a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import core.testing
import fuzz.conftest  # noqa: F401  first: on a CPU machine it sets TRITON_INTERPRET=1 before core is imported
from fuzz import failures, profiles, report
from fuzz.cases import from_data

REPLAYED, STILL_FAILS, CANNOT_REPLAY = 0, 1, 2


def load_property(record: dict):
    """The property's test function, imported as pytest imported it (a module of the repository by
    name, any other file by path)."""
    path = Path(record["module_file"])
    if not path.is_absolute():
        return getattr(importlib.import_module(record["module"]), record["property"])
    spec = importlib.util.spec_from_file_location(record["module"], path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[record["module"]] = module
    spec.loader.exec_module(module)
    return getattr(module, record["property"])


def replay(record: dict, which: str = "example") -> BaseException | None:
    """Run the property once on the arguments of record[which]; the exception it raised, or None."""
    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st

    # Test modules read their example budgets at import; which budget does not matter for one example.
    profiles.activate(record["profile"] if record["profile"] in profiles.PROFILES else profiles.DEFAULT)
    test = load_property(record)
    body = test.hypothesis.inner_test
    arguments = {name: from_data(value) for name, value in record[which]["arguments"].items()}
    # pytest's arguments (the kernel family) are what remains in the signature after @given took its own.
    from_pytest = {name: arguments[name] for name in inspect.signature(test).parameters}
    drawn = {name: value for name, value in arguments.items() if name not in from_pytest}

    @settings(database=None, max_examples=1, phases=[Phase.generate], deadline=None, print_blob=False)
    @given(**{name: st.just(value) for name, value in drawn.items()})
    def once(**given_arguments):
        report.start_example()
        body(**from_pytest, **given_arguments)

    try:
        with core.testing.poisoned_outputs():
            once()
    except Exception as error:
        return error
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="a failure file (<run dir>/failures/*.json)")
    parser.add_argument("--found", action="store_true", help="replay the example first found, not the latest")
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.file.read_text())
        if record.get("format") != failures.FORMAT:
            raise ValueError(f"not a failure file ({failures.FORMAT}): format {record.get('format')!r}")
    except (OSError, ValueError) as error:
        print(f"cannot replay {args.file}: {error}", file=sys.stderr)
        return CANNOT_REPLAY

    which = "found" if args.found else "example"
    here = failures.environment()["device"]
    print(f"{record['item']}: the {'first' if args.found else 'latest'} failing example ({record['stage']})")
    print(f"  {record[which]['repr']}")
    there = record["environment"]["device"]
    print(f"  failed on {there} with {record[which]['error']['type']}; replaying on {here}")
    if there != here:
        print("  (another device: the inputs are generated there and differ here)")

    error = replay(record, which)
    for verdict in report.example_verdicts():
        mark = "ok  " if verdict["ok"] else "FAIL"
        numbers = f"error {verdict['error']:.3e}, bound {verdict['bound']:.3e}, ratio {verdict['ratio']:.3g}"
        print(f"  {mark} {verdict['quantity']:>4}: {numbers}")
    if error is None:
        print("passes now")
        return REPLAYED
    print(f"still fails: {type(error).__name__}: {error}")
    return STILL_FAILS


if __name__ == "__main__":
    sys.exit(main())
