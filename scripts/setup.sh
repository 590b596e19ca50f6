#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned development requirements, then builds and
# installs codetr into it in editable mode. Honours CODETR_CUDA, CODETR_BUILD_EXT and
# TORCH_CUDA_ARCH_LIST (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
# The nvcc on PATH may be a wrapper script; torch must see the real toolkit root.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
# --no-build-isolation: compile against the torch in .venv, not a second one pip would fetch.
.venv/bin/pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
