#!/usr/bin/env bash
# One device call's worth of GPU checks (the device tool runs this from the repository root; logs go to
# $OUT, a short summary is printed last). Usage: bash ci/gpu-check.sh [WHAT] [seconds]
# WHAT is a space-separated list of steps or groups (default "all"), run in the order given:
#   tests = "suite host": the core suite on the GPU (every kernel family), then host time per call route
#   bench = "kernels decode features e2e": each benchmark's --quick profile
#   also: decode-full (the decode benchmark's whole grid: B 1-32, caches 1k-128k, Nq 1 and 4, dense and
#   paged; one call), host-ab (host time beside the baseline in .ab/), decode-ab (the decode benchmark's
#   core column for a baseline copy of core in .base/, e.g. `git archive BASE packages/core/src/core | tar -x -C .base`;
#   the call carries ".base"), features-ab (the features benchmark on that baseline), kvcache (the
#   KV-cache tests alone), varlen (the packed-sequence tests alone), decode-sweep (core's decode tiles
#   and split rules side by side), decode-balance (the split rule with and without config.BALANCE_TILES, cuDNN beside them), decode-pdl (the merge
#   launched after the split kernel and early from 16 splits on, config.OVERLAP_MERGE_FROM_SPLITS, cuDNN beside), decode-kernels (each
#   decode kernel's time), precise-delta (the backward with and without plans.PreciseDelta's Delta pass;
#   precise-delta-ab: the same for the baseline copy in .base/, e.g. 0a5ed44's float32-sum pass;
#   dot-orientation: whether the dK/dV kernel's scores are bitwise the dQ kernel's; delta-sums: the
#   pass's loop alone with each way of summing its products, timed, and each one's error),
#   hopper (the Hopper forwards, one program per tile and persistent: correctness, whether their results
#   are the same bits, and their timing beside the portable forward, FA2 and cuDNN; table last in
#   hopper.log), hopper-tests (the Hopper kernels bitwise against each other, test_hopper.py),
#   hopper-bwd-tests (the Hopper backward against the truth and the split backward, test_hopper_backward.py),
#   hopper-bwd (it timed beside the split backward, FA2 and cuDNN: fused_bwd_check --kernel hopper;
#   BWD_DIMS=128 for one head dim), hopper-bwd-profile (each of its kernels' time per call),
#   portable-persistent (the portable forward's persistent kernel beside its one-tile kernel, same bits
#   checked first, then test_portable_persistent.py), cp (the simulated ring), numerics,
#   pinned (every fuzz failure pinned so far, inf/NaN ones included), sanitize (the compute-sanitizer
#   sweep: an H100, the H200 machines' runtime refuses the tool), control (racecheck's control kernel)
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
  timeout -s INT -k 20 "$limit" "$@" > "$out/$name.log" 2>&1
  local code=$?
  summary+=("$name: exit $code, $(tail -n 1 "$out/$name.log" | cut -c1-150)")
}
nvidia-smi -L > "$out/card.log" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$out/card.log" 2>&1
run=packages/core/benchmarks/run.py
# Groups expand as whole words only ("hopper-bwd-tests" is a step, not "hopper-bwd-" and "tests").
what=$(echo " $what " | sed -e 's/ all / tests bench /g' -e 's/ tests / suite host /g' \
         -e 's/ bench / kernels decode features e2e /g')
for name in $what; do
  case $name in
    # -v: each outcome is logged as it comes (a run cut short still names its failures); SIGINT at the
    # time limit lets pytest print its summary when there is time for it
    suite) step suite ${SUITE_SECONDS:-370} python3 -m pytest packages/core/tests packages/core/benchmarks/test_bench_harness.py \
             -n 16 -v -rfEs -p no:cacheprovider -o junit_family=xunit1 --junitxml "$out/tests.xml" ;;
    host) step host 80 python3 $run host ;;
    # host time beside the pre-restructure core (8f51f75) copied to .ab/ (the device call carries ".ab")
    host-ab) step host-ab 90 python3 $run host --baseline .ab/packages/core/src/core ;;
    cp) step cp 90 python3 $run cp --tokens 8192,32768 --out "$out/cp.json" ;;
    hopper) step hopper 480 python3 $run hopper --quick --out "$out/hopper" ;;
    hopper-tests) step hopper-tests 200 python3 -m pytest packages/core/tests/test_hopper.py -n 16 -q -rfE -p no:cacheprovider ;;
    hopper-bwd-tests) step hopper-bwd-tests 330 python3 -m pytest packages/core/tests/test_hopper_backward.py -n 8 -q -rfE -p no:cacheprovider ;;
    hopper-bwd) step hopper-bwd 240 python3 packages/core/benchmarks/fused_bwd_check.py --kernel hopper --quick --dtypes bf16 --dims "${BWD_DIMS:-64,128}" \
                  --row-timeout 90 --out "$out/hopper-bwd" ;;
    # each kernel's time per call, the fused backward's (both modes) beside the split one's
    portable-persistent) step portable-persistent 240 python3 packages/core/benchmarks/portable_persistent_check.py --quick \
                           --out "$out/portable-persistent"; \
                         step portable-persistent-tests 120 python3 -m pytest packages/core/tests/test_portable_persistent.py -q -rfE -p no:cacheprovider ;;
    hopper-bwd-profile) step hopper-bwd-profile 150 python3 packages/core/benchmarks/fused_bwd_check.py --kernel hopper --quick \
                          --dtypes bf16 --dims "${BWD_DIMS:-128}" --profile --row-timeout 60 --out "$out/hopper-bwd-profile" ;;
    # numerics lab experiments on the GPU (NUMERICS=e10 by default); copy $OUT/numerics into numerics/results/gpu
    numerics) step numerics 200 python3 -m numerics --mode gpu --only "${NUMERICS:-e10}" --out "$out/numerics" ;;
    kernels) step kernels 200 python3 $run kernels --quick --out "$out" --docs "$out/docs" ;;
    decode) step decode 90 python3 $run decode --quick ;;
    # issue 23's whole grid (128 rows); each row is logged and written to decode-full.json as it ends
    decode-full) step decode-full 560 python3 $run decode --warmup-ms 10 --rep-ms 40 --out "$out/decode-full.json" ;;
    decode-ab) step decode-ab 60 env PYTHONPATH="$PWD/.base/packages/core/src:$PYTHONPATH" \
                 python3 $run decode --quick --providers core ;;
    features-ab) step features-ab 90 env PYTHONPATH="$PWD/.base/packages/core/src:$PYTHONPATH" \
                   python3 $run features --quick ;;
    decode-kernels) step decode-kernels 60 python3 $run decode --quick --kernels --providers core,cudnn ;;
    decode-sweep) step decode-sweep 240 python3 $run decode --sweep ;;
    decode-balance) step decode-balance 120 python3 $run decode --sweep --variants "64/4w/3s x2,64/4w/3s x2b" --providers cudnn ;;
    decode-pdl) step decode-pdl 120 python3 $run decode --sweep --variants "64/4w/3s x2b,64/4w/3s x2b pdl16" --providers cudnn ;;
    precise-delta) step precise-delta 120 python3 packages/core/benchmarks/precise_delta_ab.py ;;
    dot-orientation) step dot-orientation 60 python3 packages/core/benchmarks/dot_orientation.py ;;
    delta-sums) step delta-sums 90 python3 packages/core/benchmarks/delta_sums.py ;;
    precise-delta-ab) step precise-delta-ab 120 env PYTHONPATH="$PWD/.base/packages/core/src:$PYTHONPATH" \
                        python3 packages/core/benchmarks/precise_delta_ab.py ;;
    kvcache) step kvcache 120 python3 -m pytest packages/core/tests/test_kvcache.py -n 8 -q -p no:cacheprovider ;;
    varlen) step varlen 150 python3 -m pytest packages/core/tests/test_varlen.py -n 8 -q -rfE -p no:cacheprovider ;;
    features) step features 120 python3 $run features --quick ;;
    pinned) step pinned 200 python3 -m pytest fuzz -p no:cacheprovider --profile pinned --nonfinite -n 16 -q ;;
    # the logs come back in logs.tar.gz: the device tool returns only a few files of $OUT
    sanitize) step sanitize 340 bash -c 'python3 -m fuzz.sanitize --out "$0/sanitize" --budget 300; code=$?
                rm -rf "$0/sanitize/logs" "$0/sanitize/problems"; exit $code' "$out" ;;
    control) step control 120 python3 -m fuzz.sanitize_control --out "$out/sanitize" ;;
    e2e) step e2e 150 python3 $run e2e --quick --out "$out/e2e.json" ;;
    *) summary+=("$name: unknown step") ;;
  esac
done
cat "$out/card.log"
printf '%s\n' "${summary[@]}"
