#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and torch installed: build in place against that torch, then, most
# important first and each inside what is left of one time budget, the CUDA tests, the CUDA tests
# under compute-sanitizer (memcheck, racecheck), the fuzz tests on the GPU, the speed suite against cuDNN
# and the forward loop's two forms against each other. A stage that would not fit is skipped, one
# that overruns is stopped, and the log says which.
#
#   bash scripts/cuda_checks.sh [OUT_DIR]       (default OUT_DIR: cuda_checks_out)
#
# OUT_DIR gets at most eight files: checks.log (every stage's output, written as it runs, so a run
# cut short keeps what it did), build.log, the sanitizer's summary and two logs, and the suite's
# JSON, markdown and PNG. The CPU tests are left to CI.
#
#   RNNATTN_CHECKS_SECONDS  the budget for the whole script, the build included (default 480)
#   RNNATTN_CUDA_ARCHS      architectures to build (default: the visible GPU's, e.g. 90)
#   RNNATTN_SKIP_BENCH      set: no benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-cuda_checks_out}"
mkdir -p "$out"
exec > >(tee -a "$out/checks.log") 2>&1
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
budget="${RNNATTN_CHECKS_SECONDS:-480}"
failed=()

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device is visible: these checks need one"
  exit 2
fi
arch="$("$python" -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}{c[1]}")')"
export RNNATTN_CUDA_ARCHS="${RNNATTN_CUDA_ARCHS:-$arch}"

# stage NAME NEEDS CAP COMMAND...: runs COMMAND if NEEDS seconds of the budget are left, for at most
# CAP seconds (a hung kernel must not eat the later stages) or what is left; a failure is recorded.
stage() {
  local name="$1" needs="$2" cap="$3" left status
  shift 3
  left=$((budget - SECONDS))
  if [ "$left" -lt "$needs" ]; then
    echo "== $name: skipped, $left s of the budget left (it needs about $needs)"
    return 0
  fi
  [ "$cap" -lt "$left" ] && left="$cap"
  echo "== $name (at most $left s, $(date -u '+%H:%M:%S UTC'))"
  # (bash -c: the command may be one of the functions below; timeout stops its whole process group)
  timeout --kill-after=15 "$left" bash -c '"$@"' stage "$@"
  status=$?
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "== $name: stopped after $left s"
    failed+=("$name (stopped)")
  elif [ "$status" -ne 0 ]; then
    failed+=("$name (exit $status)")
  fi
  return 0
}

build() {
  "$python" -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; return 1; }
  "$python" -m rnnattn_ext.info
}

parallel=()
"$python" -c "import xdist" 2>/dev/null && parallel=(-n 12)

fuzz() {
  # The ops: 4 processes of 250 cases with different seeds; the modules against their peers (cuDNN
  # among them) and streaming against one call: 150 cases each. Their last lines only.
  local logs seed pid status=0 pids=()
  logs="$(mktemp -d)"
  for seed in 1 2 3 4; do
    RNNATTN_FUZZ_DEVICE=cuda RNNATTN_FUZZ_EXAMPLES=250 RNNATTN_FUZZ_SEED=$seed "$python" -m pytest -q \
      -p no:cacheprovider tests/test_fuzz.py >"$logs/seed$seed.log" 2>&1 &
    pids+=($!)
  done
  RNNATTN_FUZZ_DEVICE=cuda RNNATTN_FUZZ_MODULE_EXAMPLES=150 "$python" -m pytest -q -p no:cacheprovider \
    tests/test_fuzz_modules.py >"$logs/modules.log" 2>&1 &
  pids+=($!)
  RNNATTN_FUZZ_DEVICE=cuda RNNATTN_FUZZ_STREAM_EXAMPLES=150 "$python" -m pytest -q -p no:cacheprovider \
    tests/test_fuzz_streaming.py >"$logs/streaming.log" 2>&1 &
  pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  tail -q -n 1 "$logs"/seed*.log "$logs/modules.log" "$logs/streaming.log"
  return $status
}

loops() {
  # Results go to a scratch folder: OUT_DIR keeps to its eight files; the tables are in checks.log.
  local scratch loop
  scratch="$(mktemp -d)"
  for loop in persistent per_step; do
    RNNATTN_CUDA_LOOP=$loop "$python" benchmarks/bench_recurrent.py --device cuda --cells lstm,gru,rnn_tanh \
      --shapes 1x256x256x256,16x128x256x256,64x256x512x512,256x64x512x512 --out "$scratch" --name "loop_$loop" || return 1
  done
}

export out python
export -f build fuzz loops
stage build 0 240 build
if [ "${#failed[@]}" -gt 0 ]; then
  echo "the build failed: nothing else can run"
  exit 1
fi
# The persistent loops first, one test at a time by name: if a grid-wide barrier hangs, the log's
# last line names the test.
stage "persistent loops" 30 120 "$python" -m pytest -v -p no:cacheprovider -m cuda tests/test_persistent_loop.py
stage "CUDA tests" 60 180 "$python" -m pytest -q -p no:cacheprovider "${parallel[@]}" -m cuda tests
stage "compute-sanitizer" 90 150 env PYTHON="$python" \
  RNNATTN_SANITIZER_TESTS="tests/test_persistent_loop.py tests/test_cuda.py" bash scripts/cuda_sanitizer.sh "$out"
stage "fuzz on the GPU" 45 60 fuzz
if [ -z "${RNNATTN_SKIP_BENCH:-}" ]; then
  stage "speed suite, cuda float32 and bfloat16" 120 200 "$python" benchmarks/suite.py --devices cuda --out "$out" \
    --name suite_cuda
  stage "forward loop: one persistent kernel against a cuBLAS product per step" 60 90 loops
fi

echo "== done in $SECONDS s of $budget"
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
