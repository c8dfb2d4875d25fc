#!/usr/bin/env bash
# One device call of GPU fuzzing whose findings all come back. The device tool returns at most 8 files
# from $OUT, two folders down, so a report directory (a summary per worker, failure files a level deeper)
# and an example database (a folder per test) would be cut: this packs them into one archive,
# $OUT/NAME.tar.gz (runs/ and db/; NAME is FUZZ_NAME, default "fuzz", so that several runs of one call
# come back apart), and prints the summary and every failure file as well. Kernels compile into
# .hypothesis/triton-cache, which stays on a warm machine: a second call compiles little (--budget-scale).
#
#   bash ci/gpu-fuzz.sh PROFILE [pytest arguments...]
#   bash ci/gpu-fuzz.sh gpu-1k -n 12
#   FUZZ_NAME=warm bash ci/gpu-fuzz.sh gpu-1k --budget-scale 4 --time-box 480 -n 12
#   FUZZ_NAME=kv bash ci/gpu-fuzz.sh gpu-1k fuzz/test_kvcache.py -n 12     (one property file)
#   bash ci/gpu-fuzz.sh nightly --slice 3/10 --fuzz-seed 20261206 -n 12     (carry .hypothesis/fuzz-nightly)
#
# Here, afterwards: tar -xzf FILES_AT/NAME.tar.gz -C .hypothesis/gpu-runs/NAME, then
# `python -m fuzz.summary .hypothesis/gpu-runs/*/runs` sums every call; a nightly slice's db/ replaces
# .hypothesis/fuzz-nightly for the next slice (docs/fuzzing.md).
set -uo pipefail
cd "$(dirname "$0")/.."
profile=${1:?usage: bash ci/gpu-fuzz.sh PROFILE [pytest arguments...]}
shift
out=${OUT:-/tmp/gpu-fuzz}
name=${FUZZ_NAME:-fuzz}
work=$(mktemp -d)
mkdir -p "$out" "$work/runs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/packages/core/src${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.hypothesis/triton-cache}
database=.hypothesis/fuzz-${profile%%-*}  # gpu-1k -> fuzz-gpu, nightly -> fuzz-nightly (fuzz/profiles.py)
# The profile's own time box ends the run; this limit only catches a hang, as SIGINT (pytest reports).
# Test files among the arguments (fuzz/test_kvcache.py, say) narrow the run; else the whole fuzzer runs.
tests=(fuzz)
for argument in "$@"; do [[ $argument == fuzz/* ]] && tests=(); done
timeout -s INT -k 20 "${FUZZ_SECONDS:-540}" python3 -m pytest "${tests[@]}" -p no:cacheprovider --profile "$profile" \
  --report-dir "$work/runs" "$@" > "$out/$name.log" 2>&1
code=$?
mkdir -p "$work/db"
[[ -d $database ]] && cp -r "$database/." "$work/db/"
tar -czf "$out/$name.tar.gz" -C "$work" runs db
tail -n 25 "$out/$name.log"
python3 -m fuzz.summary "$work/runs" 2>&1 | tail -n 30
for failure in "$work"/runs/*/failures/*; do
  [[ -e $failure ]] && { echo "=== $failure"; head -c 4000 "$failure"; echo; }
done
echo "pytest exit $code; archive $(du -h "$out/$name.tar.gz" | cut -f1): runs/ and db/"
exit $code
