#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job, the demo: on the embedded
# synthetic dataset, train the CPU preset with K=0 and K=2 for the same short budget,
# evaluate both, print AP / AP50 / time per iteration and draw predictions (runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m codetr env
exec .venv/bin/python -m codetr demo --out runs/demo "$@"
