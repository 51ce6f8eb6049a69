"""GPU run, when CuPy sees a device.

Compared: the package on CuPy arrays, the PyTorch CUDA composite (when
``torch.cuda.is_available()``), and a device-to-device copy of the
logits as the bandwidth reference.  Inputs are generated on the device
(no host round trip).  Peak device memory of one call:

- package: bytes held by a fresh CuPy memory pool after the call, the
  returned arrays still alive (pool rounding included: an upper bound);
- torch: ``torch.cuda.max_memory_allocated`` above what was allocated
  before the call.

Cells whose inputs would not fit six times in free device memory are
skipped with a note.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

from .grid import Grid, gate, phases_of
from .impls import Impl, PackageImpl, TorchImpl
from .reference import dtype_from_name
from .report import Row, make_row
from .timing import Stats, time_calls


def gpu_available() -> tuple[Any, str]:
    """``(cupy, "")`` when CuPy sees a device, else ``(None, reason)``."""
    try:
        import cupy
    except ImportError:
        return None, "cupy not installed"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return None, f"no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return None, "no CUDA device"
    return cupy, ""


def device_name(cupy: Any) -> str:
    """Name of the current device."""
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props.get("name", b"?")
    return name.decode() if isinstance(name, bytes) else str(name)


def run_gpu(
    grid: Grid,
    cupy: Any,
    module: ModuleType | None,
    torch: ModuleType | None,
    say: Callable[[str], None],
) -> list[Row]:
    """Check, then time the GPU implementations over the grid."""
    impls: list[Impl] = []
    if module is not None:
        impls.append(PackageImpl(module, group=False, xp=cupy))
    else:
        say("package not importable: nothing of ours to time on the GPU")
    if torch is not None and torch.cuda.is_available():
        impls.append(TorchImpl(torch, "cuda"))
    else:
        say("torch CUDA not available: torch-cuda skipped")

    def sync() -> None:
        cupy.cuda.Device().synchronize()

    rows: list[Row] = []
    for dtype_name in grid.dtypes:
        dtype = dtype_from_name(dtype_name)
        ok = gate(impls, dtype_name, say, grid.margins)
        for n in grid.Ns:
            for c in grid.Cs:
                need = 6 * n * c * dtype.itemsize
                free = cupy.cuda.runtime.memGetInfo()[0]
                free += cupy.get_default_memory_pool().free_bytes()
                if need > free:
                    say(
                        f"gpu {dtype_name} N={n} C={c}: skipped, needs "
                        f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} free"
                    )
                    continue
                x, label = _device_input(
                    cupy, n, c, dtype, grid.seed, grid.data
                )
                buf = cupy.empty_like(x)
                stats = Stats.of(
                    time_calls(
                        partial(cupy.copyto, buf, x),
                        grid.plan,
                        sync,
                    )
                )
                del buf
                row = make_row(
                    "gpu",
                    "copy",
                    "copy",
                    dtype_name,
                    n,
                    c,
                    dtype.itemsize,
                    stats,
                )
                rows.append(row)
                say(_line(row))
                for impl in ok:
                    try:
                        rows += _time_impl(
                            grid,
                            cupy,
                            torch,
                            impl,
                            x,
                            label,
                            sync,
                            dtype_name,
                            n,
                            c,
                            dtype.itemsize,
                            say,
                        )
                    except Exception as exc:  # e.g. out of memory
                        say(
                            f"  gpu {impl.name} {dtype_name} N={n} C={c}: "
                            f"failed ({type(exc).__name__}: {exc}), skipped"
                        )
                    finally:
                        impl.release()
                del x, label
                cupy.get_default_memory_pool().free_all_blocks()
                if torch is not None and torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return rows


def _time_impl(
    grid: Grid,
    cupy: Any,
    torch: ModuleType | None,
    impl: Impl,
    x: Any,
    label: Any,
    sync: Callable[[], None],
    dtype_name: str,
    n: int,
    c: int,
    itemsize: int,
    say: Callable[[str], None],
) -> list[Row]:
    """Both phases of one implementation on one device input."""
    rows = []
    impl.setup(x, label)
    for phase, fn in phases_of(impl):
        times = time_calls(partial(fn, grid.margins), grid.plan, sync)
        dev_bytes = _device_peak(
            cupy, torch, impl, partial(fn, grid.margins), sync
        )
        row = make_row(
            "gpu",
            impl.name,
            phase,
            dtype_name,
            n,
            c,
            itemsize,
            Stats.of(times),
            device_bytes=dev_bytes,
        )
        rows.append(row)
        say(_line(row))
    return rows


def _device_input(
    cupy: Any, n: int, c: int, dtype: Any, seed: int, data: str
) -> tuple[Any, Any]:
    """Cosines (as in ``grid.make_timing_input``) and labels, on the device.

    bfloat16 logits are returned as their uint16 bit patterns (CuPy has
    no bfloat16; the package reads uint16 arrays as bfloat16).
    """
    rng = cupy.random.default_rng(seed)
    label = rng.integers(0, c, size=n, dtype=cupy.int64)
    gen = cupy.float64 if dtype == cupy.float64 else cupy.float32
    if data == "uniform":
        x = rng.random((n, c), dtype=gen)
        x *= 1.8
        x -= 0.9
    else:
        x = rng.standard_normal((n, c), dtype=gen)
        x *= 0.1
        cupy.clip(x, -1.0, 1.0, out=x)
        x[cupy.arange(n), label] = 0.2 + 0.6 * rng.random(n, dtype=gen)
    if dtype.name == "bfloat16":
        # round to nearest even on the upper 16 bits of the float32
        bits = x.view(cupy.uint32)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).astype(cupy.uint16), label
    if x.dtype != dtype:
        x = x.astype(dtype)
    return x, label


def _device_peak(
    cupy: Any,
    torch: ModuleType | None,
    impl: Impl,
    call: Callable[[], Any],
    sync: Callable[[], None],
) -> float:
    """Peak device bytes of one call (see the module docstring)."""
    try:
        if isinstance(impl, TorchImpl) and torch is not None:
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = call()
            sync()
            peak = torch.cuda.max_memory_allocated() - base
            del out
            return float(peak)
        pool = cupy.cuda.MemoryPool()
        with cupy.cuda.using_allocator(pool.malloc):
            out = call()
            sync()
        held = pool.total_bytes()
        del out
        pool.free_all_blocks()
        return float(held)
    except Exception:  # a measurement, never a reason to stop the run
        return math.nan


def _line(r: Row) -> str:
    return (
        f"  gpu {r.impl:10} {r.phase:9} {r.dtype:8} N={r.N} C={r.C}: "
        f"median {r.median_s * 1e3:.4f} ms "
        f"(IQR {r.q25_s * 1e3:.4f}-{r.q75_s * 1e3:.4f}, n={r.repeats}), "
        f"{r.gbps_effective:.0f} GB/s effective"
    )
