#!/usr/bin/env bash
# One device call's worth of GPU checks (the device tool runs this from the repository root; logs go to
# $OUT, a short summary is printed last). Usage: bash ci/gpu-check.sh [tests|bench|all] [seconds]
#   tests: the core suite on the GPU (every kernel family), then host time per call route
#   bench: kernels (--quick), decode (--quick), features (--quick), e2e (--quick)
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
budget=${2:-540}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/packages/core/src${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
summary=()
step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, keeps its log and exit code
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  (( limit > remaining )) && limit=$remaining
  if (( limit < 20 )); then summary+=("$name: skipped (time)"); return; fi
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local code=$?
  summary+=("$name: exit $code, $(tail -n 1 "$out/$name.log" | cut -c1-150)")
}
nvidia-smi -L > "$out/card.log" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$out/card.log" 2>&1
run=packages/core/benchmarks/run.py
if [[ $what == tests || $what == all ]]; then
  step tests 330 python3 -m pytest packages/core/tests packages/core/benchmarks/test_bench_harness.py -n 16 -q -p no:cacheprovider -o junit_family=xunit1 --junitxml "$out/tests.xml"
  step host 80 python3 $run host
fi
if [[ $what == bench || $what == all ]]; then
  step kernels 200 python3 $run kernels --quick --out "$out" --docs "$out/docs"
  step decode 90 python3 $run decode --quick
  step features 90 python3 $run features --quick
  step e2e 150 python3 $run e2e --quick --out "$out/e2e.json"
fi
cat "$out/card.log"
printf '%s\n' "${summary[@]}"
