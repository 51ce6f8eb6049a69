#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU and CuPy already installed
# (no network needed): check the device, run the GPU tests (the same tests
# that run emulated in CI, now on the real kernels), then print the kernel
# benchmark table. Writes logs and the benchmark CSV/plot into $OUT (or
# gpu_out/). Installs nothing; uses the python3 on PATH unless PYTHON is set.
#   scripts/gpu_check.sh            tests + benchmark
#   QUICK=1 scripts/gpu_check.sh    smaller benchmark grid
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ARCFACE_CE_CACHE_DIR
ARCFACE_CE_CACHE_DIR=$(mktemp -d)
status=0

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    2>&1 | tee "$OUT/device.txt"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/device.txt" || status=1
import cupy, numpy
print("cupy", cupy.__version__, "numpy", numpy.__version__,
      "cuda runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "device", cupy.cuda.Device().compute_capability)
assert cupy.cuda.is_available(), "CuPy sees no GPU"
PYEOF

echo "== GPU tests (kernels through cupy.RawModule)"
timeout_args=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    timeout_args=(--timeout 300)
fi
timeout 900 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_gpu_backend.py tests/test_loss.py tests/test_errors.py \
    tests/test_head.py -k "not emulated" "${timeout_args[@]}" \
    2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark (GPU grid only)"
bench_args=(--no-cpu --out "$OUT/bench")
[ "${QUICK:-0}" = 1 ] && bench_args+=(--quick)
timeout 600 "$PY" scripts/bench.py "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
rm -rf "$ARCFACE_CE_CACHE_DIR"
echo "gpu_check: exit $status"
exit $status
