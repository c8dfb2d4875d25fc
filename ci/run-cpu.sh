#!/usr/bin/env bash
# The CPU pipeline that CI runs and that anyone can run locally:
#   lint -> test suite (core under the Triton interpreter, bench harness, numerics emulator).
# The fuzzer's `ci` profile joins this pipeline when its CPU budget is met (issue 3).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --upgrade "nox>=2024.4.15"
python3 -m nox --version

start=$(date +%s)
python3 -m nox -s lint
python3 -m nox -s tests
echo "ci: lint and tests passed in $(( $(date +%s) - start )) s"
