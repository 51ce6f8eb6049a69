"""Minimal ctypes bindings to NVRTC, used to compile-check the kernels.

CuPy's own compiler entry points need a GPU to pick the architecture. These
bindings call ``libnvrtc`` directly, so the CUDA source in ``kernels/`` can
be compiled to real cubins (``ptxas`` included) on a machine without a GPU.

The library is looked up in the ``nvidia-cuda-nvrtc-cu12`` wheel first
(``nvidia/cuda_nvrtc/lib``), then through the system loader. The CUDA
headers the kernels include (``cuda_fp16.h``, ``cuda_bf16.h``) come from the
``nvidia-cuda-runtime-cu12`` wheel (``nvidia/cuda_runtime/include``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

LIBRARY_NAME = "libnvrtc.so.12"
NVRTC_SUCCESS = 0


class NVRTCError(RuntimeError):
    """An NVRTC call failed; the message holds the compile log if any."""


@dataclass
class CompileResult:
    """Output of :func:`compile_program`.

    Attributes
    ----------
    cubin : bytes
        The compiled binary (empty when compiling for a virtual arch).
    log : str
        The compiler log (warnings), possibly empty.
    lowered_names : dict of str to str
        Mangled symbol of every name expression.
    """

    cubin: bytes
    log: str
    lowered_names: dict[str, str] = field(default_factory=dict)


def _wheel_dir(package: str, sub: str) -> str | None:
    # nvidia/* wheels are namespace packages without __init__.py.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, sub)
        if os.path.isdir(path):
            return path
    return None


@cache
def load_library() -> ctypes.CDLL:
    """Load ``libnvrtc`` and declare the functions used here.

    Returns
    -------
    ctypes.CDLL
        The loaded library.

    Raises
    ------
    OSError
        If neither the wheel nor the system loader provides the library.
    """
    candidates = []
    lib_dir = _wheel_dir("nvidia.cuda_nvrtc", "lib")
    if lib_dir is not None:
        candidates.append(os.path.join(lib_dir, LIBRARY_NAME))
    candidates.append(LIBRARY_NAME)
    errors = []
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
            break
        except OSError as exc:
            errors.append(str(exc))
    else:
        raise OSError("cannot load libnvrtc: " + "; ".join(errors))

    p_char = ctypes.c_char_p
    pp_char = ctypes.POINTER(ctypes.c_char_p)
    prog = ctypes.c_void_p
    p_prog = ctypes.POINTER(ctypes.c_void_p)
    p_size = ctypes.POINTER(ctypes.c_size_t)
    signatures = {
        "nvrtcVersion": [ctypes.POINTER(ctypes.c_int)] * 2,
        "nvrtcCreateProgram": [
            p_prog, p_char, p_char, ctypes.c_int, pp_char, pp_char,
        ],
        "nvrtcAddNameExpression": [prog, p_char],
        "nvrtcCompileProgram": [prog, ctypes.c_int, pp_char],
        "nvrtcGetProgramLogSize": [prog, p_size],
        "nvrtcGetProgramLog": [prog, ctypes.c_char_p],
        "nvrtcGetCUBINSize": [prog, p_size],
        "nvrtcGetCUBIN": [prog, ctypes.c_char_p],
        "nvrtcGetLoweredName": [prog, p_char, pp_char],
        "nvrtcDestroyProgram": [p_prog],
    }  # fmt: skip
    for name, argtypes in signatures.items():
        func = getattr(lib, name)
        func.argtypes = argtypes
        func.restype = ctypes.c_int
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _check(lib: ctypes.CDLL, result: int, what: str, log: str = "") -> None:
    if result != NVRTC_SUCCESS:
        message = lib.nvrtcGetErrorString(result).decode()
        detail = f"\n{log}" if log else ""
        raise NVRTCError(f"{what} failed: {message}{detail}")


def version() -> tuple[int, int]:
    """Return the ``(major, minor)`` version of the loaded NVRTC."""
    lib = load_library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(
        lib,
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)),
        "nvrtcVersion",
    )
    return major.value, minor.value


def include_dirs() -> list[str]:
    """Return the CUDA header folders of the installed wheels (maybe none).

    Returns
    -------
    list of str
        ``nvidia/cuda_runtime/include`` if the runtime wheel is installed.
    """
    found = _wheel_dir("nvidia.cuda_runtime", "include")
    return [] if found is None else [found]


def _c_strings(items: Sequence[str]) -> ctypes.Array[ctypes.c_char_p]:
    array = (ctypes.c_char_p * max(len(items), 1))()
    for i, item in enumerate(items):
        array[i] = item.encode()
    return array


def compile_program(
    source: str,
    name: str,
    options: Sequence[str],
    name_expressions: Sequence[str] = (),
) -> CompileResult:
    """Compile CUDA C++ source with NVRTC.

    Parameters
    ----------
    source : str
        The CUDA C++ translation unit.
    name : str
        File name used in diagnostics.
    options : sequence of str
        NVRTC options, e.g. ``["--gpu-architecture=sm_90", "-I..."]``.
        A real architecture (``sm_XX``) yields a cubin.
    name_expressions : sequence of str
        Template instantiations to emit, e.g. ``"kern<float, int>"``.

    Returns
    -------
    CompileResult
        The cubin, the log and the lowered (mangled) name of every
        name expression.

    Raises
    ------
    NVRTCError
        If compilation fails (the log is in the message) or a lowered name
        is missing.
    """
    lib = load_library()
    prog = ctypes.c_void_p()
    _check(
        lib,
        lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), name.encode(), 0, None, None
        ),
        "nvrtcCreateProgram",
    )
    try:
        for expr in name_expressions:
            _check(
                lib,
                lib.nvrtcAddNameExpression(prog, expr.encode()),
                f"nvrtcAddNameExpression({expr!r})",
            )
        status = lib.nvrtcCompileProgram(
            prog, len(options), _c_strings(list(options))
        )
        size = ctypes.c_size_t()
        _check(
            lib,
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)),
            "nvrtcGetProgramLogSize",
        )
        buffer = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetProgramLog(prog, buffer), "nvrtcGetProgramLog")
        log = buffer.value.decode(errors="replace")
        _check(lib, status, "nvrtcCompileProgram", log)

        _check(
            lib,
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)),
            "nvrtcGetCUBINSize",
        )
        cubin = ctypes.create_string_buffer(size.value)
        if size.value:
            _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")

        lowered = {}
        for expr in name_expressions:
            symbol = ctypes.c_char_p()
            _check(
                lib,
                lib.nvrtcGetLoweredName(
                    prog, expr.encode(), ctypes.byref(symbol)
                ),
                f"nvrtcGetLoweredName({expr!r})",
            )
            if not symbol.value:
                raise NVRTCError(f"no lowered name for {expr!r}")
            lowered[expr] = symbol.value.decode()
        return CompileResult(cubin.raw[: size.value], log, lowered)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
