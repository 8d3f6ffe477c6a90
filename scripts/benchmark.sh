#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole speed suite (benchmarks/suite.py): every
# cell against its peer on the CPU and, when visible, the GPU; JSON, markdown and PNG under
# benchmarks/results/. Extra arguments go to the suite (e.g. --devices cuda --name suite_h100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${RNNATTN_VENV:-.venv}/bin/python" benchmarks/suite.py "$@"
