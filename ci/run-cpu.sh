#!/usr/bin/env bash
# The CPU pipeline that CI runs and that anyone can run locally:
#   lint -> core test suite (Triton interpreter) -> fuzzer `ci` profile.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --upgrade "nox>=2024.4.15"
python3 -m nox --version

start=$(date +%s)
python3 -m nox -s lint
python3 -m nox -s tests
python3 -m nox -s fuzz -- --profile ci
echo "ci: lint, tests and fuzz(ci) passed in $(( $(date +%s) - start )) s"
