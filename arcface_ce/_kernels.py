"""The CUDA kernels: source, instantiations, compile options and cache.

The kernels live in ``kernels/margin_ce.cu`` as C++ templates over the
logits type and the label type. They are instantiated through NVRTC name
expressions generated here from ONE list of supported dtypes
(:data:`LOGITS_TYPES` x :data:`LABEL_TYPES`), and compiled with ONE list of
options (:func:`compile_options`) whether the module is a real
``cupy.RawModule`` or the CPU emulation of ``arcface_ce._emulator``.

Modules are built lazily, on the first launch, and kept per device (per
process for the emulation). Compile-time constants (``BLOCK_SIZE``,
``CHUNK_SIZE``) are passed as ``-D`` options so the Python side that sizes
the launches and the device side always agree.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SOURCE_FILE = "margin_ce.cu"

#: Threads per block of every kernel.
BLOCK_SIZE = 256
#: Columns reduced by one block of ``mce_row_stats_chunk``.
CHUNK_SIZE = 4096
#: Warps per block, i.e. rows per block of ``mce_row_stats_warp``.
NUM_WARPS = BLOCK_SIZE // 32

#: Supported logits dtypes (NumPy name) and their CUDA type.
LOGITS_TYPES: dict[str, str] = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}
#: Supported label dtypes (NumPy name) and their CUDA type.
LABEL_TYPES: dict[str, str] = {
    "int32": "int",
    "int64": "long long",
}
#: Kernel templates of ``margin_ce.cu``, each instantiated for every pair.
KERNELS = (
    "mce_row_stats_warp",
    "mce_row_stats_chunk",
    "mce_row_stats_combine",
    "mce_write",
)

_lock = threading.Lock()
_modules: dict[tuple[Any, ...], Any] = {}
_cache_dir: str | None = None

#: Environment variable naming the on-disk cache of emulated modules.
CACHE_ENV = "ARCFACE_CE_CACHE_DIR"


def kernel_dir() -> Path:
    """Return the folder holding the CUDA sources.

    Installed, it is the ``arcface_ce/kernels`` package; in a source
    checkout, the ``kernels`` folder beside the ``arcface_ce`` package.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / SOURCE_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"{SOURCE_FILE} not found in {here / 'kernels'} or "
        f"{here.parent / 'kernels'}"
    )


def kernel_source() -> str:
    """Return the text of ``margin_ce.cu``."""
    return (kernel_dir() / SOURCE_FILE).read_text()


def logits_type_name(dtype: Any) -> str:
    """Return the key of :data:`LOGITS_TYPES` for a logits dtype.

    ``uint16`` is read as bfloat16 bit patterns (CuPy has no bfloat16
    dtype, so bfloat16 device arrays travel as ``uint16`` views).

    Raises
    ------
    TypeError
        If the dtype is not supported.
    """
    # A name is taken as is: "bfloat16" needs ml_dtypes to be a NumPy dtype.
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name == "uint16":
        name = "bfloat16"
    if name not in LOGITS_TYPES:
        raise TypeError(
            f"logits dtype must be one of {sorted(LOGITS_TYPES)}, got {name}"
        )
    return name


def label_type_name(dtype: Any) -> str:
    """Return the key of :data:`LABEL_TYPES` for a label dtype.

    Raises
    ------
    TypeError
        If the dtype is not supported.
    """
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in LABEL_TYPES:
        raise TypeError(
            f"label dtype must be one of {sorted(LABEL_TYPES)}, got {name}"
        )
    return name


def name_expression(kernel: str, logits_dtype: Any, label_dtype: Any) -> str:
    """Return the NVRTC name expression of one instantiation.

    Examples
    --------
    >>> name_expression("mce_write", "float16", "int64")
    'mce_write<__half, long long>'
    """
    t = LOGITS_TYPES[logits_type_name(logits_dtype)]
    lab = LABEL_TYPES[label_type_name(label_dtype)]
    return f"{kernel}<{t}, {lab}>"


def name_expressions() -> list[str]:
    """Return every name expression, for all kernels and dtype pairs."""
    return [
        name_expression(kernel, t, lab)
        for kernel in KERNELS
        for t in LOGITS_TYPES
        for lab in LABEL_TYPES
    ]


def compile_options() -> tuple[str, ...]:
    """Return the compile options used for every build (no architecture).

    The NVRTC compile test uses the same tuple plus an architecture and
    the include folder of the CUDA headers.
    """
    return (
        "-std=c++17",
        f"-DBLOCK_SIZE={BLOCK_SIZE}",
        f"-DCHUNK_SIZE={CHUNK_SIZE}",
    )


def set_cache_dir(path: str | os.PathLike[str] | None) -> None:
    """Set the on-disk cache folder of emulated modules, drop loaded ones.

    Tests point it at a temporary folder so a stale binary cannot hide an
    edit of the source. ``None`` falls back to ``$ARCFACE_CE_CACHE_DIR``,
    then to the emulator's default. CuPy's own disk cache follows
    ``CUPY_CACHE_DIR``.
    """
    global _cache_dir
    with _lock:
        _cache_dir = None if path is None else os.fspath(path)
        _modules.clear()


def cache_dir() -> str | None:
    """Return the cache folder for emulated modules (None: default)."""
    return _cache_dir or os.environ.get(CACHE_ENV) or None


def _build(xp: Any, emulate: bool) -> Any:
    source = kernel_source()
    options = compile_options()
    expressions = name_expressions()
    if emulate:
        from arcface_ce._emulator import EmulatedModule

        return EmulatedModule(
            source,
            name_expressions=expressions,
            options=list(options),
            include_dirs=[],
            cache_dir=cache_dir(),
        )
    return xp.RawModule(
        code=source, options=options, name_expressions=expressions
    )


def get_module(xp: Any, emulate: bool) -> Any:
    """Return the compiled module for the current device, building it once.

    Parameters
    ----------
    xp : module
        ``cupy`` for real kernels; ``numpy`` with ``emulate=True``.
    emulate : bool
        Use the CPU emulation instead of ``cupy.RawModule``.
    """
    if emulate:
        key: tuple[Any, ...] = ("emulate", cache_dir())
    else:
        key = ("cuda", xp.cuda.Device().id)
    with _lock:
        module = _modules.get(key)
        if module is None:
            module = _build(xp, emulate)
            _modules[key] = module
        return module


def get_kernel(
    xp: Any, emulate: bool, kernel: str, logits_dtype: Any, label_dtype: Any
) -> Callable[..., Any]:
    """Return a launchable kernel ``f(grid, block, args)``.

    Parameters
    ----------
    xp : module
        ``cupy`` or ``numpy`` (the latter with ``emulate=True``).
    emulate : bool
        Use the CPU emulation.
    kernel : str
        One of :data:`KERNELS`.
    logits_dtype, label_dtype : dtype
        Select the template instantiation.
    """
    module = get_module(xp, emulate)
    return module.get_function(
        name_expression(kernel, logits_dtype, label_dtype)
    )
