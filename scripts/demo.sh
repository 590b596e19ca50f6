#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job: the multi-scale deformable
# attention benchmark (compiled kernel vs the grid_sample reference) on cases C and A.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m codetr env
exec .venv/bin/python benchmarks/bench_ms_deform_attn.py --cases C,A --repeats 3 \
    --out runs/bench_ms_deform_attn.json "$@"
