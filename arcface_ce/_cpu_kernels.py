"""Compiled CPU row kernels of the NumPy backend (``margin_ce_cpu.cpp``).

NumPy runs the per-block work of the backend as six ufunc calls, each of
which takes and gives back the GIL: with two or more worker threads the
handovers cost more than the arithmetic. The same work written once in
C++ (``kernels/margin_ce_cpu.cpp``) and called through :mod:`ctypes`,
which releases the GIL for the whole call, runs at memory speed on every
core.

The source is compiled on first use by the host C++ compiler (``$CXX``,
else ``g++``) with ``-O3 -march=native`` and cached like the emulated
CUDA modules (``$ARCFACE_CE_CACHE_DIR``, else ``~/.cache/arcface_ce``),
under a key that includes the CPU's feature flags. Without a compiler, or
with ``ARCFACE_CE_CPU_KERNELS=0``, the backend keeps its pure NumPy code:
same results within rounding, slower. :func:`status` says which is used.

float16 and bfloat16 logits are computed in float32 inside the kernels
(their conversions are bit arithmetic, rounding to nearest even), which
spares NumPy's slow 16-bit ufuncs altogether.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ._emulator import (
    _cache_dir,
    _compile,
    _compiler,
    _compiler_id,
    load_cached,
)
from ._kernels import CACHE_ENV, kernel_dir

SOURCE_FILE = "margin_ce_cpu.cpp"
ENV = "ARCFACE_CE_CPU_KERNELS"
FLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-std=c++17",
    "-fno-math-errno",
    "-shared",
    "-fPIC",
]

_lock = threading.Lock()
_loaded: dict[str, Any] = {}
_why_not: dict[str, str] = {}

_i64 = ctypes.c_int64
_dbl = ctypes.c_double
_ptr = ctypes.c_void_p


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` depends on them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> ctypes.CDLL:
    source = (kernel_dir() / SOURCE_FILE).read_text()
    cxx = _compiler()
    h = hashlib.sha256()
    parts = (source, " ".join(FLAGS), cxx, _compiler_id(cxx), _cpu_flags())
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    path = _cache_dir(None) / f"cpu-{h.hexdigest()[:40]}.so"
    lib = load_cached(
        path, lambda: _compile(source, FLAGS, cxx, path, "CPU kernel module")
    )
    for name in ("f32", "f64", "f16", "bf16"):
        stats = getattr(lib, f"mce_cpu_stats_{name}")
        stats.restype = None
        stats.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _dbl, _dbl]
        stats.argtypes += [_ptr, _ptr, _ptr, _i64]
    for name in ("f32", "f64", "f16", "bf16"):
        write = getattr(lib, f"mce_cpu_write_{name}")
        write.restype = None
        write.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _dbl, _ptr, _ptr]
        write.argtypes += [_ptr, _dbl, _ptr, _i64]
    for name in ("f16", "bf16"):
        for kind in ("widen", "narrow"):
            conv = getattr(lib, f"mce_cpu_{kind}_{name}")
            conv.restype = None
            conv.argtypes = [_ptr, _ptr, _i64]
    for name in ("f32", "f64"):
        scale = getattr(lib, f"mce_cpu_scale_{name}")
        scale.restype = None
        scale.argtypes = [_ptr, _i64, _i64, _i64, _ptr]
        exp = getattr(lib, f"mce_cpu_exp_{name}")
        exp.restype = None
        exp.argtypes = [_ptr, _ptr, _i64]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled module, or None when it is disabled or cannot build.

    The first call compiles (about a second) or loads from the cache; a
    failure is remembered (see :func:`status`) and not retried.
    """
    if os.environ.get(ENV, "1") == "0":
        return None
    key = os.environ.get(CACHE_ENV, "")
    with _lock:
        if key in _loaded:
            return _loaded[key]
        if key in _why_not:
            return None
        try:
            _loaded[key] = _build()
        except Exception as exc:  # no compiler, no cache folder, bad .so
            _why_not[key] = f"{type(exc).__name__}: {exc}"
            return None
        return _loaded[key]


def status() -> str:
    """One line: whether the NumPy backend uses the compiled kernels."""
    if os.environ.get(ENV, "1") == "0":
        return f"pure NumPy ({ENV}=0)"
    if library() is not None:
        return "compiled CPU kernels (" + " ".join(FLAGS[:2]) + ")"
    key = os.environ.get(CACHE_ENV, "")
    return "pure NumPy (CPU kernels unavailable: " + _why_not[key] + ")"


_SUFFIXES = {
    "float32": "f32",
    "float64": "f64",
    "float16": "f16",
    "bfloat16": "bf16",
}


def suffix(dtype: Any) -> str | None:
    """Function suffix (``"f32"`` ...) of a logits dtype, or None."""
    return _SUFFIXES.get(np.dtype(dtype).name)


def rows_ok(a: np.ndarray) -> bool:
    """Whether ``a`` is 2-D with unit column stride (rows may be strided)."""
    return (
        a.ndim == 2
        and (a.shape[1] <= 1 or a.strides[1] == a.itemsize)
        and a.strides[0] % a.itemsize == 0
        and a.strides[0] >= 0
    )
