#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with torch and the build tools, and builds rnnattn_ext
# into it. Needs only Python 3.10+ and a C++ compiler; builds the CUDA kernels too when nvcc is
# found and the installed torch is a CUDA build.
#
#   RNNATTN_VENV      where the environment goes (default: .venv in the repository)
#   RNNATTN_TORCH     the torch requirement (default: torch>=2.11,<2.15)
#   RNNATTN_CUDA      AUTO (default), ON or OFF
#   RNNATTN_CUDA_ARCHS  CUDA architectures in CMake syntax (default: 80-real;86-real;89-real;90)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${RNNATTN_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# nvcc is often installed without being on PATH
if ! command -v nvcc >/dev/null 2>&1; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then export PATH="$d/bin:$PATH"; break; fi
  done
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "${RNNATTN_TORCH:-torch>=2.11,<2.15}" \
  "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.24" pytest numpy matplotlib tqdm hypothesis mypy \
  onnx onnxscript onnxruntime
"$venv/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e .
"$venv/bin/python" -c "import torch, rnnattn_ext, rnnattn_ext._ops as o; print('rnnattn_ext', rnnattn_ext.__version__, 'built for torch', o._C.built_with_torch, '| CUDA kernels:', o._C.cuda_architectures or 'not built')"
