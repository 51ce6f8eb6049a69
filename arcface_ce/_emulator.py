"""Run the project's CUDA kernels on the CPU, for machines without a GPU.

The same ``.cu`` source that CuPy compiles with NVRTC is compiled here by
the host C++ compiler (``g++ -O2 -std=c++17``) against
``kernels/emu/cuda_emu.h``, which provides the CUDA built-ins, and is
launched through :mod:`ctypes` with CuPy's ``RawKernel`` calling convention.
:class:`EmulatedModule` mirrors the part of ``cupy.RawModule`` the project
uses, :class:`EmulatedKernel` the part of ``cupy.RawKernel``.

How a module is built:

1. ``extern __shared__ T name[];`` is rewritten into a constant pointer to a
   static buffer (dynamic shared memory); the rest of the source is kept.
2. One ``extern "C"`` launch wrapper per name expression is appended; it
   takes ``&(expression)`` and unpacks the array of argument pointers with
   a parameter pack, so no kernel signature is written by hand. A second
   wrapper reports the parameter types, which lets :class:`EmulatedKernel`
   reject arguments that would be misread (CuPy does not check them).
3. The fiber scheduler (``kernels/emu/fiber.cpp``) is included in the same
   translation unit; the compiler gets ``-DARCFACE_CE_EMULATE=1``,
   ``-include cuda_emu.h`` and the ``kernels/emu`` folder first on the
   include path (it holds stand-ins for ``cuda_fp16.h`` and friends).
4. The shared object is cached under a hash of the source, the options,
   the contents of the include folders' headers, the emulation sources and
   the compiler version. It is written under a temporary name and renamed,
   so processes compiling the same key at once (MPI ranks) do not clash.

Cache folder: the ``cache_dir`` argument, else ``$ARCFACE_CE_CACHE_DIR``,
else ``~/.cache/arcface_ce``. Compiler: ``$CXX``, else ``g++``.

Thread order: the fibers of a block run in forward (0..n-1) or reverse
order between barriers, chosen per launch (``order=``) or by
``$ARCFACE_CE_EMU_ORDER`` (``forward`` by default). A kernel whose result
depends on it has a race.
"""

from __future__ import annotations

import ctypes
import hashlib
import numbers
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EmulatedKernel", "EmulatedModule", "emulation_dir"]

#: Default limit of dynamic shared memory per launch, in bytes (CUDA's
#: default without the opt-in attribute).
DEFAULT_MAX_DYNAMIC_SHARED = 48 * 1024
#: Largest value :attr:`EmulatedKernel.max_dynamic_shared_size_bytes` takes
#: (the static buffer in fiber.h).
MAX_DYNAMIC_SHARED = 227 * 1024

_MAX_THREADS = 1024
_MAX_PARAMS = 256
_ERR_LEN = 2048
_ORDERS = {"forward": 0, "reverse": 1}
_HEADER_SUFFIXES = (".h", ".hpp", ".cuh", ".inc", ".inl", ".cu", ".cpp")
_EMU_SOURCES = (
    "cuda_emu.h",
    "fiber.h",
    "fiber.cpp",
    "cuda_fp16.h",
    "cuda_bf16.h",
    "cuda_runtime.h",
)

# Parameter kinds reported by the generated signature wrapper; the values
# are arcface_emu::ParamKind in cuda_emu.h.
_KIND_OTHER = 0
_KIND_SIGNED = 1
_KIND_UNSIGNED = 2
_KIND_FLOAT = 3
_KIND_BOOL = 4
_KIND_POINTER = 5
_KIND_HALF = 6
_KIND_BFLOAT16 = 7

_EXTERN_SHARED = re.compile(
    r"\bextern\s+__shared__\s+([^;\[\]{}()]*(?:\([^;()]*\)[^;\[\]{}()]*)*?)"
    r"\s*\b([A-Za-z_]\w*)\s*\[\s*\]\s*;"
)
_ALIGN_SPEC = re.compile(
    r"\b(?:__align__|alignas)\s*\((?:[^()]|\([^()]*\))*\)"
)

# Shared objects loaded by this process, by cache key; one lock guards the
# table and the compilations (compiling twice the same key is harmless but
# wasteful).
_LIBRARIES: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()
_COMPILER_IDS: dict[str, str] = {}


def emulation_dir() -> Path:
    """Return the folder holding ``cuda_emu.h`` and the fiber scheduler.

    Returns
    -------
    pathlib.Path
        ``kernels/emu`` of a source checkout, or ``arcface_ce/kernels/emu``
        of an installed package.
    """
    here = Path(__file__).resolve().parent
    for candidate in (
        here / "kernels" / "emu",
        here.parent / "kernels" / "emu",
    ):
        if (candidate / "cuda_emu.h").is_file():
            return candidate
    raise FileNotFoundError(
        "cuda_emu.h not found next to arcface_ce: the kernels/emu folder "
        "is missing from this installation"
    )


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ARCFACE_CE_CACHE_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "arcface_ce"


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def _compiler_id(cxx: str) -> str:
    """First line of ``cxx --version`` (part of the cache key)."""
    if cxx not in _COMPILER_IDS:
        try:
            words = shlex.split(cxx)
        except ValueError as exc:
            raise RuntimeError(
                f"CXX={cxx!r} cannot be parsed: {exc}"
            ) from None
        if not words or shutil.which(words[0]) is None:
            raise RuntimeError(
                f"C++ compiler {cxx!r} not found: install g++ or set CXX"
            )
        out = subprocess.run(
            [*words, "--version"], capture_output=True, text=True, check=False
        )
        lines = out.stdout.strip().splitlines()
        _COMPILER_IDS[cxx] = lines[0] if lines else cxx
    return _COMPILER_IDS[cxx]


def _parse_options(
    options: Sequence[str],
) -> tuple[list[str], list[str]]:
    """Split NVRTC-style options into ``-D`` defines and ``-I`` folders.

    ``-D NAME=VAL``, ``-DNAME=VAL``, ``--define-macro=NAME=VAL``, ``-I dir``,
    ``-Idir`` and ``--include-path=dir`` are honoured, a value may be the
    next item; everything else (``--std=c++17``, ``-arch=...``) is ignored.
    """
    tokens: list[str] = []
    for opt in options:
        if not isinstance(opt, str):
            raise TypeError(f"options must be strings, got {opt!r}")
        tokens.extend(shlex.split(opt))
    defines: list[str] = []
    includes: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        for flag, long_flag, dest in (
            ("-D", "--define-macro", defines),
            ("-I", "--include-path", includes),
        ):
            if tok in (flag, long_flag):
                if i + 1 >= len(tokens):
                    raise ValueError(f"option {tok} needs a value")
                dest.append(tokens[i + 1])
                i += 1
                break
            if tok.startswith(long_flag + "="):
                dest.append(tok[len(long_flag) + 1 :])
                break
            if tok.startswith(flag):
                dest.append(tok[len(flag) :])
                break
        i += 1
    return defines, includes


def _rewrite_extern_shared(code: str) -> str:
    """Turn ``extern __shared__ T name[];`` into a pointer declaration."""

    def repl(match: re.Match[str]) -> str:
        ctype = _ALIGN_SPEC.sub(" ", match.group(1)).strip()
        name = match.group(2)
        newlines = "\n" * match.group(0).count("\n")
        return (
            f"{ctype}* const {name} = reinterpret_cast<{ctype}*>("
            f"::arcface_emu::g_dynamic_shared);{newlines}"
        )

    return _EXTERN_SHARED.sub(repl, code)


def _wrappers(name_expressions: Sequence[str]) -> str:
    export = 'extern "C" __attribute__((visibility("default")))'
    parts = ['\n#line 1 "<emulator launch wrappers>"\n']
    for i, expr in enumerate(name_expressions):
        parts.append(
            f"{export} int arcface_emu_launch_{i}(\n"
            "    const unsigned int* dims, void** args,\n"
            "    unsigned long long shared_bytes, int order, char* err,\n"
            "    unsigned long long err_len) {\n"
            f"  return ::arcface_emu::launch(&({expr}), dims, args,\n"
            "                               shared_bytes, order, err,\n"
            "                               err_len);\n"
            "}\n"
            f"{export} int arcface_emu_signature_{i}(long long* out,\n"
            "                                          int cap) {\n"
            f"  return ::arcface_emu::signature(&({expr}), out, cap);\n"
            "}\n"
        )
    parts.append('#include "fiber.cpp"\n')
    return "".join(parts)


def _hash_folder(h: Any, folder: Path) -> None:
    """Feed the header-like files under `folder` into hash `h`."""
    if not folder.is_dir():
        h.update(f"missing:{folder}\n".encode())
        return
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(_HEADER_SUFFIXES):
                path = Path(root) / name
                h.update(f"{path.relative_to(folder)}\n".encode())
                h.update(path.read_bytes())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_cached(path: Path, build: Any) -> ctypes.CDLL:
    """Load the shared object ``path``, building it first unless it is the
    one a build left there.

    ``build()`` writes ``path``; a ``.sha256`` file beside it records its
    digest. A missing, truncated or foreign file (which ``dlopen`` may
    crash on rather than reject) fails the check and is rebuilt.
    """
    stamp = path.with_name(path.name + ".sha256")
    try:
        recorded = stamp.read_bytes().decode("ascii").strip()
        fresh = recorded != _digest(path)
    except (OSError, ValueError):  # missing, unreadable, not ASCII
        fresh = True
    if fresh:
        build()
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
        tmp.write_text(_digest(path) + "\n")
        os.replace(tmp, stamp)
    return ctypes.CDLL(str(path))


def _compile(
    source: str,
    flags: list[str],
    cxx: str,
    target: Path,
    what: str = "emulated CUDA module",
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix=".build-", dir=target.parent
    ) as tmp:
        src = Path(tmp) / "module.cpp"
        out = Path(tmp) / "module.so"
        src.write_text(source)
        cmd = [*shlex.split(cxx), *flags, "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{what} failed to compile:\n"
                + " ".join(shlex.quote(c) for c in cmd)
                + "\n"
                + proc.stdout
                + proc.stderr
            )
        # Keep the generated source beside the binary for debugging.
        os.replace(src, target.with_suffix(".cpp"))
        os.replace(out, target)


class EmulatedModule:
    """CPU stand-in for ``cupy.RawModule(code=..., name_expressions=...)``.

    Parameters
    ----------
    code : str
        Full CUDA source text, as given to ``cupy.RawModule``.
    name_expressions : sequence of str
        C++ expressions naming the kernels to launch, e.g.
        ``"mce_write<float, long long>"`` or ``"my_extern_c_kernel"``.
    options : sequence of str, optional
        NVRTC-style options. ``-D NAME=VAL`` / ``-DNAME=VAL`` and
        ``-I dir`` are honoured, the rest is ignored.
    include_dirs : sequence of path-like, optional
        More folders for ``#include "..."``.
    cache_dir : path-like, optional
        Folder of compiled modules; default ``$ARCFACE_CE_CACHE_DIR`` or
        ``~/.cache/arcface_ce``.

    Notes
    -----
    Compilation happens on the first :meth:`get_function`, once per process
    and cache key. The cache key covers the code, the options, the header
    files (any of ``.h .hpp .cuh .inc .inl .cu .cpp``) under the include
    folders, the emulation sources and the compiler version; a header
    included by another path is not covered.
    """

    def __init__(
        self,
        code: str,
        *,
        name_expressions: Sequence[str],
        options: Sequence[str] = (),
        include_dirs: Sequence[str | os.PathLike[str]] = (),
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if isinstance(name_expressions, str):
            raise TypeError(
                "name_expressions must be a sequence of str, not a str"
            )
        exprs = list(dict.fromkeys(name_expressions))
        if not exprs or not all(isinstance(e, str) and e for e in exprs):
            raise ValueError(
                "name_expressions must be a non-empty sequence of "
                f"non-empty str, got {name_expressions!r}"
            )
        self.code = code
        self.name_expressions = tuple(exprs)
        self.options = tuple(options)
        defines, includes = _parse_options(self.options)
        self._defines = defines
        self._include_dirs: list[str] = [
            os.fspath(d) for d in (*includes, *include_dirs)
        ]
        self._cache_dir = _cache_dir(cache_dir)
        self._lib: ctypes.CDLL | None = None
        self._kernels: dict[str, EmulatedKernel] = {}

    def _flags(self, emu: Path) -> list[str]:
        flags = [
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-fno-strict-aliasing",
            "-fvisibility=hidden",
            "-DARCFACE_CE_EMULATE=1",
            "-I",
            str(emu),
        ]
        for d in self._include_dirs:
            flags += ["-I", d]
        for d in self._defines:
            flags.append("-D" + d)
        flags += ["-include", "cuda_emu.h"]
        return flags

    def _source(self) -> str:
        return (
            '#line 1 "<kernel source>"\n'
            + _rewrite_extern_shared(self.code)
            + _wrappers(self.name_expressions)
        )

    def _cache_key(self, source: str, flags: list[str], cxx: str) -> str:
        h = hashlib.sha256()
        h.update(source.encode())
        h.update("\0".join(flags).encode())
        h.update(cxx.encode())  # with its arguments, e.g. "g++ -O0"
        h.update(_compiler_id(cxx).encode())
        emu = emulation_dir()
        for name in _EMU_SOURCES:
            h.update(name.encode())
            h.update((emu / name).read_bytes())
        for d in self._include_dirs:
            _hash_folder(h, Path(d))
        return h.hexdigest()[:40]

    def _library(self) -> ctypes.CDLL:
        if self._lib is not None:
            return self._lib
        cxx = _compiler()
        flags = self._flags(emulation_dir())
        source = self._source()
        key = self._cache_key(source, flags, cxx)
        with _LOCK:
            lib = _LIBRARIES.get(key)
            if lib is None:
                path = self._cache_dir / f"emu-{key}.so"
                lib = load_cached(
                    path, lambda: _compile(source, flags, cxx, path)
                )
                _LIBRARIES[key] = lib
        self._lib = lib
        return lib

    def get_function(self, name_expression: str) -> EmulatedKernel:
        """Return the kernel named by one of the name expressions.

        Parameters
        ----------
        name_expression : str
            Exactly as listed in ``name_expressions``.

        Returns
        -------
        EmulatedKernel

        Raises
        ------
        KeyError
            If `name_expression` is not one of ``name_expressions``.
        RuntimeError
            If the module does not compile (the message holds the compiler
            output).
        """
        if name_expression not in self.name_expressions:
            raise KeyError(
                f"{name_expression!r} is not among the name expressions "
                f"{list(self.name_expressions)}"
            )
        kernel = self._kernels.get(name_expression)
        if kernel is None:
            lib = self._library()
            index = self.name_expressions.index(name_expression)
            kernel = EmulatedKernel(lib, index, name_expression)
            self._kernels[name_expression] = kernel
        return kernel


class _Param:
    """One kernel parameter as reported by the signature wrapper."""

    __slots__ = ("kind", "size", "pointee_kind", "pointee_size")

    def __init__(self, kind: int, size: int, pkind: int, psize: int):
        self.kind = kind
        self.size = size
        self.pointee_kind = pkind
        self.pointee_size = psize

    def describe(self) -> str:
        if self.kind == _KIND_POINTER:
            return "pointer to " + _describe(
                self.pointee_kind, self.pointee_size
            )
        return _describe(self.kind, self.size)

    def accepts_dtype(self, dtype: np.dtype[Any]) -> bool:
        """Whether an array of `dtype` may be passed to this pointer."""
        kind, size = self.pointee_kind, self.pointee_size
        if kind == _KIND_OTHER:
            return True
        if kind in (_KIND_HALF, _KIND_BFLOAT16):
            wanted = "float16" if kind == _KIND_HALF else "bfloat16"
            return dtype.name in (wanted, "uint16", "int16")
        return _scalar_matches(kind, size, dtype)


def _describe(kind: int, size: int) -> str:
    names = {
        _KIND_SIGNED: f"int{8 * size}",
        _KIND_UNSIGNED: f"uint{8 * size}",
        _KIND_FLOAT: f"float{8 * size}",
        _KIND_BOOL: "bool",
        _KIND_HALF: "float16 (__half)",
        _KIND_BFLOAT16: "bfloat16 (__nv_bfloat16)",
        _KIND_POINTER: "pointer",
    }
    if kind in names:
        return names[kind]
    return f"{size}-byte struct" if size else "void"


def _scalar_matches(kind: int, size: int, dtype: np.dtype[Any]) -> bool:
    if dtype.itemsize != size:
        return False
    if kind == _KIND_HALF:
        return dtype.name == "float16"
    if kind == _KIND_BFLOAT16:
        return dtype.name == "bfloat16"
    letter = {
        _KIND_SIGNED: "i",
        _KIND_UNSIGNED: "u",
        _KIND_FLOAT: "f",
        _KIND_BOOL: "b",
        _KIND_OTHER: "V",
    }.get(kind)
    return dtype.kind == letter and dtype.name != "bfloat16"


def _dims(value: Any, what: str) -> tuple[int, int, int]:
    items = value if isinstance(value, tuple | list) else (value,)
    if not 1 <= len(items) <= 3 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool)
        for v in items
    ):
        raise TypeError(
            f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}"
        )
    dims = [int(v) for v in items] + [1] * (3 - len(items))
    if min(dims) < 1:
        raise ValueError(f"{what} dimensions must be positive, got {value!r}")
    return dims[0], dims[1], dims[2]


def _order_code(order: str | None) -> int:
    if order is None:
        order = os.environ.get("ARCFACE_CE_EMU_ORDER") or "forward"
        source = "ARCFACE_CE_EMU_ORDER"
    else:
        source = "order"
    if order not in _ORDERS:
        raise ValueError(
            f"{source} must be 'forward' or 'reverse', got {order!r}"
        )
    return _ORDERS[order]


class EmulatedKernel:
    """CPU stand-in for ``cupy.RawKernel``; obtain it from a module.

    Attributes
    ----------
    name : str
        The name expression.
    max_dynamic_shared_size_bytes : int
        Limit on ``shared_mem`` (48 KiB by default, at most 227 KiB), as the
        attribute of the same name of ``cupy.RawKernel``.
    """

    def __init__(self, lib: ctypes.CDLL, index: int, name: str) -> None:
        self.name = name
        self.max_dynamic_shared_size_bytes = DEFAULT_MAX_DYNAMIC_SHARED
        self._launch = getattr(lib, f"arcface_emu_launch_{index}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_ulonglong,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_ulonglong,
        ]
        sig = getattr(lib, f"arcface_emu_signature_{index}")
        sig.restype = ctypes.c_int
        sig.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.c_int]
        buf = (ctypes.c_longlong * (4 * _MAX_PARAMS))()
        n = sig(buf, _MAX_PARAMS)
        if n > _MAX_PARAMS:
            raise RuntimeError(f"{name}: more than {_MAX_PARAMS} parameters")
        self.params = tuple(
            _Param(*(int(v) for v in buf[4 * i : 4 * i + 4])) for i in range(n)
        )

    def _convert(self, i: int, arg: Any, param: _Param) -> ctypes._CData:
        where = f"{self.name}: argument {i}"
        if isinstance(arg, np.ndarray):
            if param.kind != _KIND_POINTER:
                raise TypeError(
                    f"{where}: the kernel expects a {param.describe()} "
                    "by value, got an array"
                )
            if not arg.flags.c_contiguous:
                raise ValueError(f"{where}: array must be C-contiguous")
            if not param.accepts_dtype(arg.dtype):
                raise TypeError(
                    f"{where}: the kernel expects a {param.describe()}, "
                    f"got a {arg.dtype} array"
                )
            return ctypes.c_void_p(arg.ctypes.data)
        if isinstance(arg, np.generic):
            if param.kind == _KIND_POINTER:
                raise TypeError(
                    f"{where}: the kernel expects a {param.describe()} "
                    f"(an array), got a {arg.dtype} scalar"
                )
            if not _scalar_matches(param.kind, param.size, arg.dtype):
                raise TypeError(
                    f"{where}: the kernel expects a {param.describe()}, "
                    f"got {arg.dtype}"
                )
            raw = arg.tobytes()
            # 8-byte aligned storage, whatever the size.
            box = (ctypes.c_uint64 * max(1, -(-len(raw) // 8)))()
            ctypes.memmove(box, raw, len(raw))
            return box
        if isinstance(arg, bool | int | float | complex):
            raise TypeError(
                f"{where}: Python {type(arg).__name__} has no fixed width; "
                f"pass a NumPy scalar (the kernel expects a "
                f"{param.describe()})"
            )
        raise TypeError(
            f"{where}: expected a NumPy array or scalar, got "
            f"{type(arg).__name__}"
        )

    def __call__(
        self,
        grid: int | tuple[int, ...],
        block: int | tuple[int, ...],
        args: tuple[Any, ...] | list[Any],
        *,
        shared_mem: int = 0,
        order: str | None = None,
    ) -> None:
        """Launch the kernel and wait for it.

        Parameters
        ----------
        grid, block : int or tuple of 1 to 3 ints
            Launch geometry, as for CuPy.
        args : tuple or list
            NumPy arrays (C-contiguous; passed as a pointer to their data)
            and NumPy scalars (passed by value with their exact width).
            Each must match the kernel parameter: pointee dtype for arrays
            (float16 or uint16 for ``__half*``, likewise bfloat16), kind
            and width for scalars.
        shared_mem : int, optional
            Bytes of dynamic shared memory.
        order : {'forward', 'reverse'}, optional
            Thread order within a block; default ``$ARCFACE_CE_EMU_ORDER``
            or ``'forward'``.

        Raises
        ------
        TypeError
            For a Python int/float argument, or one that does not match its
            parameter, or a wrong number of arguments.
        ValueError
            For a bad launch geometry, order, shared memory size, or a
            non-contiguous array.
        RuntimeError
            If the kernel deadlocks at a barrier, meets mismatched warp
            collectives, or calls ``__trap()``; the message names the
            kernel, the block and the barrier.
        """
        gx, gy, gz = _dims(grid, "grid")
        bx, by, bz = _dims(block, "block")
        if bx * by * bz > _MAX_THREADS or bz > 64:
            raise ValueError(
                f"block {block!r} exceeds 1024 threads or 64 in z"
            )
        if gx >= 2**31 or gy >= 2**16 or gz >= 2**16:
            raise ValueError(f"grid {grid!r} exceeds CUDA's limits")
        if not isinstance(shared_mem, numbers.Integral) or isinstance(
            shared_mem, bool
        ):
            raise TypeError(f"shared_mem must be an int, got {shared_mem!r}")
        limit = min(
            int(self.max_dynamic_shared_size_bytes), MAX_DYNAMIC_SHARED
        )
        if not 0 <= shared_mem <= limit:
            raise ValueError(
                f"shared_mem must be in [0, {limit}], got {shared_mem}"
            )
        code = _order_code(order)
        if not isinstance(args, tuple | list):
            raise TypeError(
                f"args must be a tuple or list, got {type(args).__name__}"
            )
        if len(args) != len(self.params):
            raise TypeError(
                f"{self.name} takes {len(self.params)} arguments, got "
                f"{len(args)}"
            )
        boxes = [
            self._convert(i, a, p)
            for i, (a, p) in enumerate(zip(args, self.params, strict=True))
        ]
        pointers = (ctypes.c_void_p * max(1, len(boxes)))(
            *(ctypes.addressof(b) for b in boxes)
        )
        dims = (ctypes.c_uint * 6)(gx, gy, gz, bx, by, bz)
        err = ctypes.create_string_buffer(_ERR_LEN)
        rc = self._launch(dims, pointers, int(shared_mem), code, err, _ERR_LEN)
        if rc != 0:
            message = err.value.decode(errors="replace")
            raise RuntimeError(f"{self.name}: {message}")
