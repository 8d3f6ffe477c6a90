#!/usr/bin/env bash
# The main job: sets everything up (scripts/setup.sh) and runs the demo, python -m rnnattn_ext.demo
# (character language models on the standard library's sources: AttnLSTM vs LSTM vs torch.nn.LSTM).
# Extra arguments go to the demo (e.g. --steps 2000 --device cuda --out my_run); see --help.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${RNNATTN_VENV:-.venv}/bin/python" -m rnnattn_ext.demo "$@"
