#!/usr/bin/env bash
# The CPU pipeline that CI runs and that anyone can run locally:
#   lint -> test suite (core under the Triton interpreter, bench harness, numerics emulator)
#   -> the fuzzer's `ci` profile (derandomized, a few minutes on 2 cores; docs/fuzzing.md).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --upgrade "nox>=2024.4.15"
python3 -m nox --version

start=$(date +%s)
python3 -m nox -s lint
python3 -m nox -s tests
python3 -m nox -s fuzz -- --profile ci -n 2 -p no:cacheprovider
echo "ci: lint, tests and fuzz passed in $(( $(date +%s) - start )) s"
