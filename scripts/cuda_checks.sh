#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and torch installed: build in place against that torch, run the
# whole test suite, the CUDA tests under compute-sanitizer (memcheck and racecheck), and the
# benchmarks against cuDNN. Logs and results go to the folder given as $1 (default: cuda_checks_out).
#
#   RNNATTN_CUDA_ARCHS   architectures to build (default: the visible GPU's, e.g. 90)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-cuda_checks_out}"
mkdir -p "$out"
python="${PYTHON:-python3}"
arch="$("$python" -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}{c[1]}")')"
export RNNATTN_CUDA_ARCHS="${RNNATTN_CUDA_ARCHS:-$arch}"
export PYTHONUNBUFFERED=1

echo "== build (architectures $RNNATTN_CUDA_ARCHS)"
"$python" -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
"$python" -c "import torch, rnnattn_ext._ops as o; print('torch', torch.__version__, '| GPU', torch.cuda.get_device_name(), '| kernels for', o._C.cuda_architectures)"

echo "== tests"
# In parallel where pytest-xdist is installed (the CPU tests take most of the time).
parallel=()
"$python" -c "import xdist" 2>/dev/null && parallel=(-n 8)
"$python" -m pytest -q "${parallel[@]}" tests 2>&1 | tee "$out/tests.log" | tail -5

echo "== compute-sanitizer (memcheck, racecheck) over the CUDA tests"
PYTHON="$python" bash scripts/cuda_sanitizer.sh "$out"

echo "== fuzzing on the GPU (3,000 cases: 4 processes of 750 with different seeds, under a minute on an H100 machine)"
for seed in 1 2 3 4; do
  RNNATTN_FUZZ_DEVICE=cuda RNNATTN_FUZZ_EXAMPLES=750 RNNATTN_FUZZ_SEED=$seed "$python" -m pytest -q -p no:cacheprovider \
    tests/test_fuzz.py >"$out/fuzz_seed$seed.log" 2>&1 &
done
wait
tail -q -n 1 "$out"/fuzz_seed*.log

if [ -z "${RNNATTN_SKIP_BENCH:-}" ]; then
  echo "== speed suite, cuda float32 and bfloat16"
  "$python" benchmarks/suite.py --devices cuda --out "$out" --name suite_cuda | tail -60
  echo "== CUDA's forward loop, one persistent kernel against a cuBLAS product per step, by batch size"
  for loop in persistent per_step; do
    RNNATTN_CUDA_LOOP=$loop "$python" benchmarks/bench_recurrent.py --device cuda --cells lstm,gru,rnn_tanh \
      --shapes 1x256x256x256,16x128x256x256,64x256x512x512,128x128x512x512,256x64x512x512 \
      --out "$out" --name "loop_$loop" | tail -30
  done
fi
