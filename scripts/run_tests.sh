#!/usr/bin/env bash
# The whole test suite: set up .venv, then run pytest in one process (every
# test; those needing several ranks skip), then the MPI tests under
# `mpiexec -n 2` and `mpiexec -n 3`. Each MPI run is bounded by a timeout
# and a failure on any rank aborts the whole job (see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
export PYTHONUNBUFFERED=1
# The CUDA kernels must be compiled (NVRTC) and run (CPU emulation) here:
# a skip for a missing compiler or NVRTC is a failure.
export ARCFACE_CE_REQUIRE_KERNELS=1
# A fresh kernel cache per run: no stale binary can hide an edit.
ARCFACE_CE_CACHE_DIR=$(mktemp -d)
export ARCFACE_CE_CACHE_DIR
trap 'rm -rf "$ARCFACE_CE_CACHE_DIR"' EXIT
echo "== pytest, one process"
.venv/bin/python -m pytest "$@"
# Ranks busy-poll in collectives: one BLAS/worker thread per rank.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ARCFACE_CE_NUM_THREADS=1
for n in 2 3; do
    echo "== pytest -m mpi under mpiexec -n $n"
    timeout --foreground -k 10 900 .venv/bin/mpiexec -n "$n" \
        .venv/bin/python -m pytest -m mpi -p no:cacheprovider "$@"
done
