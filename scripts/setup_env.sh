#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install
# the package in editable mode with everything the demo and tests need:
# NumPy, mpi4py with MPICH from PyPI, pytest, scikit-learn, the NVRTC
# compiler and CUDA headers used to compile-check the kernels without a GPU.
# Needs only Python 3.11+ and a C++ compiler (for the kernel emulation).
# Usage: scripts/setup_env.sh [extra ...]   e.g. scripts/setup_env.sh torch
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras="mpi,test,demo,kernels,bench${1:+,$1}"
# One setup at a time in this checkout (two commands started together).
if command -v flock >/dev/null; then
    exec 9>.venv.lock
    flock 9
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.arcface_ce-installed
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16) $extras"
# The stamp says what was installed; the import checks it is still there
# (a damaged environment is reinstalled from scratch).
force=()
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] &&
    ! .venv/bin/python -c "import arcface_ce, numpy, mpi4py, pytest, sklearn" \
        2>/dev/null; then
    force=(--force-reinstall)
    rm -f "$stamp"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "${force[@]}" -e ".[$extras]"
    echo "$want" > "$stamp"
fi
