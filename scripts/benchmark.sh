#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the recurrent-layer benchmark against torch.nn.
# Extra arguments go to benchmarks/bench_recurrent.py (e.g. --device cuda --dtype bfloat16).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${RNNATTN_VENV:-.venv}/bin/python" benchmarks/bench_recurrent.py "$@"
