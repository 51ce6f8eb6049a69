#!/usr/bin/env bash
# The main job: set up .venv, then train an ArcFace embedding network on
# scikit-learn's handwritten digits with the 10 classes split unevenly over
# two MPI ranks. Extra arguments go to scripts/train_digits.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
RANKS=${RANKS:-2}
exec timeout --foreground -k 10 600 .venv/bin/mpiexec -n "$RANKS" \
    .venv/bin/python scripts/train_digits.py "$@"
