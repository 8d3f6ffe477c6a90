#!/usr/bin/env bash
# Runs the CUDA tests under compute-sanitizer, memcheck and racecheck (and synccheck and initcheck
# with --all), and writes a summary: one line per tool with its error summary and the tests'
# pass/fail line; the exit status is 1 if any tool found an error. Needs a GPU, compute-sanitizer and
# an installed build.
#
#   bash scripts/cuda_sanitizer.sh [OUT_DIR] [--all]      (default OUT_DIR: sanitizer_out)
#
# The tests run are those of the `cuda` marker outside the accuracy sweeps (long under the sanitizer),
# in RNNATTN_SANITIZER_TESTS's files (default: test_cuda, test_bad_inputs, test_determinism and
# test_persistent_loop).
# racecheck looks at shared memory (the persistent forward loop's weights, staged rows and gates) and
# is the slowest tool.
# initcheck reports every float16/bfloat16 element that cuBLAS's sm_90 GEMMs wrote as uninitialised
# (torch.addmm alone does the same: benchmarks/results/cuda_checks_h100.txt); read its 16-bit reports
# with that in mind.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-sanitizer_out}"
tools="memcheck racecheck"
if [ "${2:-}" = "--all" ]; then tools="memcheck racecheck synccheck initcheck"; fi
python="${PYTHON:-python3}"
mkdir -p "$out"
if ! command -v compute-sanitizer >/dev/null 2>&1; then
  echo "compute-sanitizer is not on PATH (it ships with the CUDA toolkit, in bin/)" >&2
  exit 2
fi
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device is visible" >&2
  exit 2
fi
tests="${RNNATTN_SANITIZER_TESTS:-tests/test_cuda.py tests/test_bad_inputs.py tests/test_determinism.py tests/test_persistent_loop.py}"
summary="$out/sanitizer_summary.txt"
{
  echo "compute-sanitizer over the CUDA tests ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  "$python" -c "import torch; print('GPU', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
} >"$summary"
# The tools run at once, each over its own processes (racecheck is the slow one); where pytest-xdist
# is installed each tool spreads the tests over RNNATTN_SANITIZER_WORKERS processes (default 4), which
# compute-sanitizer follows (--target-processes all).
parallel=()
"$python" -c "import xdist" 2>/dev/null && parallel=(-n "${RNNATTN_SANITIZER_WORKERS:-4}")
pids=()
for tool in $tools; do
  compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
    "$python" -m pytest -q -p no:cacheprovider "${parallel[@]}" -m cuda $tests -k "not accuracy" \
    >"$out/sanitizer_$tool.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
for tool in $tools; do
  log="$out/sanitizer_$tool.log"
  echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1 | sed 's/^=* *//') | $(grep -E '[0-9]+ (passed|failed)' "$log" | tail -1)" >>"$summary"
done
cat "$summary"
exit $status
