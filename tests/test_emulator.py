"""Tests of the CPU emulation of CUDA kernels (arcface_ce._emulator).

The toy kernels live in tests/emu_kernels/. Every numeric test runs in
both thread orders and compares against a float64 NumPy reference computed
here; the modules are compiled into a temporary cache folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arcface_ce._emulator import EmulatedKernel, EmulatedModule

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "g++") is None,
    reason="the CUDA emulation needs a C++ compiler",
)

KERNELS = Path(__file__).resolve().parent / "emu_kernels"
REPO = Path(__file__).resolve().parent.parent
ORDERS = ("forward", "reverse")
FLOAT_TYPES = ("float", "double", "__half", "__nv_bfloat16")

REDUCE_EXPRS = [
    "row_sum",
    "row_sum_warps",
    *(f"row_sum_t<{t}>" for t in FLOAT_TYPES),
    *(f"scale_tail<{t}>" for t in FLOAT_TYPES),
]
CONVERT_EXPRS = [
    "float_to_half",
    "double_to_half",
    "half_to_float",
    "float_to_bf16",
    "double_to_bf16",
    "bf16_to_float",
]
SYNC_EXPRS = [
    "shift_right",
    "shuffles",
    "shuffle_wide",
    "atomics",
    "coords",
    "read_unwritten_shared",
    "early_exit",
    "half_warp_shuffle",
    "partial_mask",
    "mixed_collectives",
    "trap_in_block_3",
]


def _bfloat16() -> Any:
    return pytest.importorskip("ml_dtypes").bfloat16


def _dtype(name: str) -> Any:
    return {
        "float": np.float32,
        "double": np.float64,
        "__half": np.float16,
        "__nv_bfloat16": _bfloat16(),
    }[name]


def assert_close(
    actual: Any, expected: Any, rtol: float, atol: float, what: str
) -> None:
    """Fail naming the worst element when |actual - expected| is too big."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = np.abs(a - e)
    bound = atol + rtol * np.abs(e)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0.0, 0.0, err / bound)
    ratio[np.isnan(ratio)] = np.inf  # NaN on either side
    if a.size and not (ratio <= 1.0).all():
        worst = np.unravel_index(int(np.argmax(ratio)), a.shape)
        bad = int((ratio > 1.0).sum())
        pytest.fail(
            f"{what}: {bad} of {a.size} elements outside rtol={rtol} "
            f"atol={atol}; worst at {worst}: got {a[worst]!r}, expected "
            f"{e[worst]!r}"
        )


def assert_same_bits(actual: Any, expected: Any, what: str) -> None:
    """Equal bit patterns, except that any NaN matches any NaN."""
    a = np.asarray(actual)
    e = np.asarray(expected)
    a_nan = np.isnan(a.astype(np.float32))
    e_nan = np.isnan(e.astype(np.float32))
    uint = np.dtype(f"u{a.dtype.itemsize}")
    same = (a.view(uint) == e.view(uint)) | (a_nan & e_nan)
    if not same.all():
        i = int(np.argmin(same))
        pytest.fail(
            f"{what}: {int((~same).sum())} of {a.size} differ; first at "
            f"{i}: got {a[i]!r} (0x{int(a.view(uint)[i]):x}), expected "
            f"{e[i]!r} (0x{int(e.view(uint)[i]):x})"
        )


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emu_cache")


def _module(
    name: str, exprs: list[str], cache: Path, **kw: Any
) -> EmulatedModule:
    code = (KERNELS / name).read_text()
    return EmulatedModule(code, name_expressions=exprs, cache_dir=cache, **kw)


@pytest.fixture(scope="module")
def reduce_mod(cache: Path) -> EmulatedModule:
    return _module("reduce.cu", REDUCE_EXPRS, cache)


@pytest.fixture(scope="module")
def convert_mod(cache: Path) -> EmulatedModule:
    return _module("convert.cu", CONVERT_EXPRS, cache)


@pytest.fixture(scope="module")
def sync_mod(cache: Path) -> EmulatedModule:
    return _module("sync.cu", SYNC_EXPRS, cache)


@pytest.fixture(params=ORDERS)
def order(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---------------------------------------------------------------------------
# Reductions: shared memory, __syncthreads, warp shuffles.
# ---------------------------------------------------------------------------


def _row_sum_case(
    kernel: EmulatedKernel, n_rows: int, n_cols: int, block: int, order: str
) -> None:
    rng = np.random.default_rng(n_rows * 7919 + n_cols)
    x = rng.uniform(-1.0, 1.0, (n_rows, n_cols)).astype(np.float32)
    out = np.full(n_rows, np.nan, np.float32)
    grid = min(n_rows, 7)  # fewer blocks than rows: grid-stride over rows
    args = (x, np.int64(n_rows), np.int64(n_cols), out)
    kernel(grid, block, args, order=order)
    expected = x.astype(np.float64).sum(axis=1)
    scale = np.abs(x).astype(np.float64).sum(axis=1).max() + 1.0
    assert_close(out, expected, 0.0, 4e-7 * scale, kernel.name)


@pytest.mark.parametrize(
    ("n_rows", "n_cols", "block"),
    [
        (1, 1, 32),
        (3, 37, 100),
        (64, 1000, 256),
        (10, 300, 33),
        (5, 4099, 1024),
    ],
)
def test_row_sum_any_block_size(
    reduce_mod: EmulatedModule,
    n_rows: int,
    n_cols: int,
    block: int,
    order: str,
) -> None:
    kernel = reduce_mod.get_function("row_sum")
    _row_sum_case(kernel, n_rows, n_cols, block, order)


@pytest.mark.parametrize(
    ("n_rows", "n_cols", "block"), [(64, 1000, 256), (9, 77, 64)]
)
def test_row_sum_warp_shuffles(
    reduce_mod: EmulatedModule,
    n_rows: int,
    n_cols: int,
    block: int,
    order: str,
) -> None:
    kernel = reduce_mod.get_function("row_sum_warps")
    _row_sum_case(kernel, n_rows, n_cols, block, order)


def test_partial_warp_shuffle_reads_missing_lane(
    reduce_mod: EmulatedModule,
) -> None:
    # 100 threads: warp 3 has 4 lanes, and xor 16 reads lane 16 or more.
    kernel = reduce_mod.get_function("row_sum_warps")
    x = np.ones((2, 10), np.float32)
    out = np.zeros(2, np.float32)
    with pytest.raises(
        RuntimeError,
        match=r"row_sum_warps: block \(0, 0, 0\): thread \(96, 0, 0\): "
        r"__shfl_xor_sync reads lane 16 of warp 3, which has only 4 lanes",
    ):
        kernel(1, 100, (x, np.int64(2), np.int64(10), out))


# Tolerance relative to the exact result: one unit in the last place of the
# output type (the kernel accumulates in double and rounds once).
ROUNDING_RTOL = {
    "float": 2.0**-23,
    "double": 1e-13,
    "__half": 2.0**-10,
    "__nv_bfloat16": 2.0**-7,
}


@pytest.mark.parametrize("ctype", FLOAT_TYPES)
def test_template_row_sum(
    reduce_mod: EmulatedModule, ctype: str, order: str
) -> None:
    dtype = _dtype(ctype)
    n_rows, n_cols, scale = 37, 301, 0.5
    rng = np.random.default_rng(5)
    x = rng.uniform(-2.0, 2.0, (n_rows, n_cols)).astype(dtype)
    out = np.full(n_rows, np.nan, dtype)
    block = (32, 4)  # 4 rows per block; the last block is partly idle
    grid = -(-n_rows // block[1])
    kernel = reduce_mod.get_function(f"row_sum_t<{ctype}>")
    args = (x, np.int64(n_rows), np.int64(n_cols), np.float32(scale), out)
    kernel(grid, block, args, shared_mem=32 * 4 * 8, order=order)
    expected = x.astype(np.float64).sum(axis=1) * scale
    assert_close(out, expected, ROUNDING_RTOL[ctype], 1e-30, kernel.name)


# The kernel computes float(x) * a in float32 and rounds to T.
TAIL_RTOL = {
    "float": 2.0**-23,
    "double": 2.0**-23,
    "__half": 2.0**-10 + 2.0**-23,
    "__nv_bfloat16": 2.0**-7 + 2.0**-23,
}


@pytest.mark.parametrize("ctype", FLOAT_TYPES)
def test_grid_stride_64bit_indices(
    reduce_mod: EmulatedModule, ctype: str, order: str
) -> None:
    dtype = _dtype(ctype)
    first = 2**31 + 5  # indices past 2**31 without allocating that much
    count = 1000
    rng = np.random.default_rng(11)
    x = rng.uniform(-3.0, 3.0, count).astype(dtype)
    y = np.full(count, np.nan, dtype)
    a = 1.75
    kernel = reduce_mod.get_function(f"scale_tail<{ctype}>")
    args = (x, np.int64(first), np.int64(first + count), np.float32(a), y)
    kernel(3, 64, args, order=order)  # 192 threads stride over 1000
    expected = x.astype(np.float64) * a
    assert_close(y, expected, TAIL_RTOL[ctype], 1e-30, kernel.name)


def test_launches_from_several_threads(reduce_mod: EmulatedModule) -> None:
    # Launches of one module from two OS threads (the GIL is released
    # during a launch) are serialised and both give correct results.
    kernel = reduce_mod.get_function("row_sum_warps")
    errors: list[BaseException] = []

    def work(order: str) -> None:
        try:
            for _ in range(5):
                _row_sum_case(kernel, 16, 700, 128, order)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(o,)) for o in ORDERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_ucontext_backend(cache: Path, order: str) -> None:
    mod = _module(
        "reduce.cu", ["row_sum"], cache, options=["-DARCFACE_EMU_UCONTEXT"]
    )
    _row_sum_case(mod.get_function("row_sum"), 6, 500, 128, order)


# ---------------------------------------------------------------------------
# 16-bit conversions against NumPy (float16) and ml_dtypes (bfloat16).
# ---------------------------------------------------------------------------


def _launch_elementwise(
    kernel: EmulatedKernel, x: np.ndarray, outs: list[np.ndarray], order: str
) -> None:
    n = x.size
    kernel(-(-n // 256), 256, (x, np.int64(n), *outs), order=order)


def _float_grid(values: np.ndarray) -> np.ndarray:
    """float32 test points from the finite values of a 16-bit format.

    The values themselves, the midpoints of neighbours (ties), one float
    ulp either side of each midpoint, their negatives, special values and
    random bit patterns.
    """
    finite = np.unique(np.abs(values[np.isfinite(values)]).astype(np.float64))
    mids = (finite[:-1] + finite[1:]) / 2  # exact in float32
    mids32 = mids.astype(np.float32)
    up = np.nextafter(mids32, np.float32(np.inf))
    down = np.nextafter(mids32, np.float32(0))
    top = finite[-1]
    top_ulp = finite[-1] - finite[-2]
    specials64 = [0.0, np.inf, top + top_ulp / 2, top + top_ulp, 1e-45, 1e30]
    with np.errstate(over="ignore"):  # past float32's range: inf
        specials = np.array(specials64, np.float32)
    nans = np.array(
        [0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7FA00000], np.uint32
    ).view(np.float32)
    rng = np.random.default_rng(3)
    random_bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64)
    grid = np.concatenate(
        [finite.astype(np.float32), mids32, up, down, specials]
    )
    return np.concatenate(
        [
            grid,
            -grid,
            nans,
            -nans,
            random_bits.astype(np.uint32).view(np.float32),
        ]
    )


def test_half_to_float_all_patterns(
    convert_mod: EmulatedModule, order: str
) -> None:
    x = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    a = np.zeros(x.size, np.float32)
    b = np.zeros(x.size, np.float32)
    _launch_elementwise(
        convert_mod.get_function("half_to_float"), x, [a, b], order
    )
    expected = x.astype(np.float32)
    assert_same_bits(a, expected, "__half2float")
    assert_same_bits(b, expected, "static_cast<float>(__half)")


def test_bf16_to_float_all_patterns(
    convert_mod: EmulatedModule, order: str
) -> None:
    bf16 = _bfloat16()
    x = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(bf16)
    a = np.zeros(x.size, np.float32)
    b = np.zeros(x.size, np.float32)
    _launch_elementwise(
        convert_mod.get_function("bf16_to_float"), x, [a, b], order
    )
    expected = x.astype(np.float32)
    assert_same_bits(a, expected, "__bfloat162float")
    assert_same_bits(b, expected, "float(__nv_bfloat16)")


def test_float_to_half_round_to_nearest_even(
    convert_mod: EmulatedModule, order: str
) -> None:
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    x = _float_grid(halves.view(np.float16).astype(np.float32))
    outs = [np.zeros(x.size, np.float16) for _ in range(3)]
    _launch_elementwise(
        convert_mod.get_function("float_to_half"), x, outs, order
    )
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    for out, what in zip(
        outs, ["__float2half", "__float2half_rn", "__half(float)"], strict=True
    ):
        assert_same_bits(out, expected, what)


def test_float_to_bf16_round_to_nearest_even(
    convert_mod: EmulatedModule, order: str
) -> None:
    bf16 = _bfloat16()
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    x = _float_grid(patterns.view(bf16).astype(np.float32))
    outs = [np.zeros(x.size, bf16) for _ in range(3)]
    _launch_elementwise(
        convert_mod.get_function("float_to_bf16"), x, outs, order
    )
    with np.errstate(invalid="ignore"):  # ml_dtypes warns on NaN input
        expected = x.astype(bf16)
    whats = ["__float2bfloat16", "__float2bfloat16_rn", "__nv_bfloat16(f)"]
    for out, what in zip(outs, whats, strict=True):
        assert_same_bits(out, expected, what)


def _double_grid(values: np.ndarray) -> np.ndarray:
    """Doubles just off the ties of a 16-bit format (single rounding)."""
    finite = np.unique(np.abs(values[np.isfinite(values)]).astype(np.float64))
    mids = (finite[:-1] + finite[1:]) / 2
    off = mids * 2.0**-40  # lost if the conversion went through float32
    rng = np.random.default_rng(4)
    grid = np.concatenate([mids, mids + off, mids - off, finite])
    grid = np.concatenate([grid, -grid, [np.inf, -np.inf, np.nan, 1e300]])
    return np.concatenate([grid, rng.standard_normal(50_000) * 1000.0])


def test_double_to_half_single_rounding(
    convert_mod: EmulatedModule, order: str
) -> None:
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    x = _double_grid(halves.view(np.float16))
    outs = [np.zeros(x.size, np.float16) for _ in range(2)]
    _launch_elementwise(
        convert_mod.get_function("double_to_half"), x, outs, order
    )
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    assert_same_bits(outs[0], expected, "__double2half")
    assert_same_bits(outs[1], expected, "static_cast<__half>(double)")


def test_double_to_bf16_single_rounding(
    convert_mod: EmulatedModule, order: str
) -> None:
    bf16 = _bfloat16()
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    x = _double_grid(patterns.view(bf16))
    outs = [np.zeros(x.size, bf16) for _ in range(2)]
    _launch_elementwise(
        convert_mod.get_function("double_to_bf16"), x, outs, order
    )
    with np.errstate(invalid="ignore", over="ignore"):
        expected = x.astype(bf16)
    assert_same_bits(outs[0], expected, "__double2bfloat16")
    assert_same_bits(outs[1], expected, "static_cast<__nv_bfloat16>(double)")


# ---------------------------------------------------------------------------
# Barriers, warp collectives, atomics, geometry.
# ---------------------------------------------------------------------------


def test_fibers_interleave_at_barriers(sync_mod: EmulatedModule) -> None:
    kernel = sync_mod.get_function("shift_right")
    x = np.arange(1.0, 129.0, dtype=np.float32)
    expected = np.concatenate([x[:1], x[:-1]])
    results = {}
    for use_barrier in (1, 0):
        for order in ORDERS:
            out = np.zeros_like(x)
            kernel(1, x.size, (x, np.int32(use_barrier), out), order=order)
            results[use_barrier, order] = out
    for order in ORDERS:
        assert_close(results[1, order], expected, 0.0, 0.0, order)
    # Without the barrier each fiber runs to its end before the next one
    # starts: forward order reads neighbours already written, reverse order
    # reads shared memory not written yet (poisoned with NaN).
    assert_close(results[0, "forward"], expected, 0.0, 0.0, "forward")
    assert np.isnan(results[0, "reverse"][1:]).all()


def _shuffle_model(n: int) -> np.ndarray:
    """CUDA/PTX shuffle semantics for v = 100 + t, written out per lane."""
    out = np.zeros((11, n), np.int64)
    for t in range(n):
        lane = t % 32
        base = t - lane

        def value(src_lane: int, _base: int = base) -> int:
            return 100 + _base + src_lane

        def seg(width: int, _lane: int = lane) -> tuple[int, int]:
            start = _lane - _lane % width
            return start, start + width - 1

        out[0, t] = value(5)
        start, _ = seg(8)
        out[1, t] = value(start + (3 + t) % 8)
        out[2, t] = value(lane - 3) if lane >= 3 else value(lane)
        start, _ = seg(8)
        out[3, t] = value(lane - 2) if lane - 2 >= start else value(lane)
        out[4, t] = value(lane + 5) if lane + 5 <= 31 else value(lane)
        _, end = seg(16)
        out[5, t] = value(lane + 3) if lane + 3 <= end else value(lane)
        out[6, t] = value(lane ^ 1)
        _, end = seg(8)
        out[7, t] = value(lane ^ 12) if (lane ^ 12) <= end else value(lane)
        warp = range(base, min(base + 32, n))
        out[8, t] = sum(1 << (u - base) for u in warp if u % 3 == 0)
        out[9, t] = any(u == 40 for u in warp) + 2 * all(u < 40 for u in warp)
        out[10, t] = sum(1 for u in range(n) if u % 5 == 0)
    return out.astype(np.int32)


def test_shuffle_vote_semantics(sync_mod: EmulatedModule, order: str) -> None:
    n = 64
    out = np.zeros((11, n), np.int32)
    sync_mod.get_function("shuffles")(1, n, (out,), order=order)
    expected = _shuffle_model(n)
    for row in range(11):
        assert_close(out[row], expected[row], 0.0, 0.0, f"case {row}")


def test_shuffle_wide_types(sync_mod: EmulatedModule, order: str) -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal(32)
    y = rng.integers(-(2**62), 2**62, 32, dtype=np.int64)
    z = rng.integers(0, 2**16, 32, dtype=np.uint64).astype(np.uint16)
    xo, yo, zo = np.zeros_like(x), np.zeros_like(y), np.zeros_like(z)
    sync_mod.get_function("shuffle_wide")(
        1, 32, (x, y, z, xo, yo, zo), order=order
    )
    lanes = np.arange(32)
    np.testing.assert_array_equal(xo, x[lanes ^ 7])
    np.testing.assert_array_equal(yo, y[np.minimum(lanes + 1, 31)])
    np.testing.assert_array_equal(zo, np.full(32, z[31]))


def test_atomics(sync_mod: EmulatedModule, order: str) -> None:
    n = 1000
    rng = np.random.default_rng(9)
    x = rng.uniform(0.0, 1.0, n).astype(np.float32)
    fsum = np.zeros(1, np.float32)
    acc = np.array([0, -(2**31), 2**31 - 1, 0, 0, 0, 0, 0], np.int32)
    acc[6] = np.float32(-1.0).view(np.int32)
    sync_mod.get_function("atomics")(
        8, 128, (x, np.int64(n), fsum, acc), order=order
    )
    i = np.arange(n)
    v = i % 1000 - 500
    assert_close(fsum, [x.astype(np.float64).sum()], 1e-5, 0.0, "fsum")
    bits = np.bitwise_or.reduce(1 << (i % 31))
    expected = [n, v.max(), v.min(), bits, 2 * n, 7]
    np.testing.assert_array_equal(acc[:6], expected)
    assert acc[6:7].view(np.float32)[0] == x.max()


def test_launch_geometry_3d(sync_mod: EmulatedModule, order: str) -> None:
    grid, block = (2, 3, 2), (4, 2, 3)
    total = int(np.prod(grid) * np.prod(block))
    out = np.zeros((total, 6), np.uint32)
    sync_mod.get_function("coords")(grid, block, (out,), order=order)
    # Row = linear block id * block volume + linear thread id, x fastest.
    bz, by, bx, tz, ty, tx = np.indices(grid[::-1] + block[::-1]).reshape(
        6, -1
    )
    expected = np.stack([tx, ty, tz, bx, by, bz], axis=1)
    np.testing.assert_array_equal(out, expected)


def test_shared_memory_is_poisoned(sync_mod: EmulatedModule) -> None:
    out = np.zeros(64, np.float32)
    sync_mod.get_function("read_unwritten_shared")(3, 64, (out,))
    assert (out.view(np.uint32) == 0xFFFFFFFF).all()


# ---------------------------------------------------------------------------
# Mistakes reported as Python errors, never a hang.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "early_exit",
            r"early_exit: block \(0, 0, 0\): deadlock: 63 of 64 threads "
            r"wait at __syncthreads, 1 have returned",
        ),
        (
            "half_warp_shuffle",
            r"block \(0, 0, 0\): deadlock: .*warp 0: 16 of 32 lanes wait at "
            r"__shfl_down_sync \(warp barrier\), 16 returned",
        ),
        ("partial_mask", r"mask 0x0000ffff: partial-mask warp collectives"),
        (
            "mixed_collectives",
            r"lanes of warp 0 met different warp collectives \("
            r"(__shfl_xor_sync and __syncwarp|__syncwarp and __shfl_xor_sync)",
        ),
        (
            "trap_in_block_3",
            r"block \(3, 0, 0\): thread \(7, 0, 0\): __trap\(\) called",
        ),
    ],
)
def test_errors_raise(
    sync_mod: EmulatedModule, name: str, message: str, order: str
) -> None:
    out = np.zeros(64, np.float32)
    with pytest.raises(RuntimeError, match=message):
        sync_mod.get_function(name)(4, 64, (out,), order=order)
    # The abandoned fibers do not disturb the next launch.
    x = np.arange(64, dtype=np.float32)
    sync_mod.get_function("shift_right")(1, 64, (x, np.int32(1), out))
    assert_close(out[1:], x[:-1], 0.0, 0.0, "after the error")


# ---------------------------------------------------------------------------
# Arguments and launch configuration.
# ---------------------------------------------------------------------------


def _bad_call(sync_mod: EmulatedModule, **overrides: Any) -> None:
    x = np.zeros(64, np.float32)
    call: dict[str, Any] = {
        "grid": 1,
        "block": 64,
        "args": (x, np.int32(1), np.zeros(64, np.float32)),
    }
    call.update(overrides)
    kernel = sync_mod.get_function("shift_right")
    kernel(call.pop("grid"), call.pop("block"), call.pop("args"), **call)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            {"args": (np.zeros(64, np.float32), 1, np.zeros(64, np.float32))},
            TypeError,
            r"argument 1: Python int has no fixed width",
        ),
        (
            {"args": (np.zeros(64), np.int32(1), np.zeros(64, np.float32))},
            TypeError,
            r"argument 0: the kernel expects a pointer to float32, got a "
            r"float64 array",
        ),
        (
            {
                "args": (
                    np.zeros(64, np.float32),
                    np.int64(1),
                    np.zeros(64, np.float32),
                )
            },
            TypeError,
            r"argument 1: the kernel expects a int32, got int64",
        ),
        (
            {
                "args": (
                    np.zeros(64, np.float32),
                    np.float32(1),
                    np.zeros(64, np.float32),
                )
            },
            TypeError,
            r"argument 1: the kernel expects a int32, got float32",
        ),
        (
            {
                "args": (
                    np.zeros(128, np.float32)[::2],
                    np.int32(1),
                    np.zeros(64, np.float32),
                )
            },
            ValueError,
            r"argument 0: array must be C-contiguous",
        ),
        (
            {"args": (np.float32(0), np.int32(1), np.zeros(64, np.float32))},
            TypeError,
            r"argument 0: the kernel expects a pointer to float32 \(an "
            r"array\), got a float32 scalar",
        ),
        (
            {
                "args": (
                    np.zeros(64, np.float32),
                    np.ones(1, np.int32),
                    np.zeros(64, np.float32),
                )
            },
            TypeError,
            r"argument 1: the kernel expects a int32 by value, got an array",
        ),
        (
            {"args": (np.zeros(64, np.float32), np.int32(1))},
            TypeError,
            r"shift_right takes 3 arguments, got 2",
        ),
        (
            {"args": [np.zeros(64, np.float32), np.int32(1), None]},
            TypeError,
            r"argument 2: expected a NumPy array or scalar, got NoneType",
        ),
        ({"order": "sideways"}, ValueError, r"order must be 'forward'"),
        ({"grid": 0}, ValueError, r"grid dimensions must be positive"),
        ({"grid": (1, 1, 1, 1)}, TypeError, r"grid must be an int or"),
        ({"block": 1.5}, TypeError, r"block must be an int or"),
        ({"block": (32, 33)}, ValueError, r"exceeds 1024 threads"),
        ({"grid": (1, 2**16)}, ValueError, r"exceeds CUDA's limits"),
        ({"shared_mem": 48 * 1024 + 1}, ValueError, r"shared_mem must be in"),
        ({"shared_mem": -1}, ValueError, r"shared_mem must be in"),
    ],
)
def test_bad_launch(
    sync_mod: EmulatedModule,
    overrides: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        _bad_call(sync_mod, **overrides)


def test_larger_dynamic_shared_after_opt_in(sync_mod: EmulatedModule) -> None:
    kernel = sync_mod.get_function("shift_right")
    kernel.max_dynamic_shared_size_bytes = 100 * 1024
    try:
        _bad_call(sync_mod, shared_mem=100 * 1024)
    finally:
        kernel.max_dynamic_shared_size_bytes = 48 * 1024


def test_order_from_environment(
    sync_mod: EmulatedModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = sync_mod.get_function("shift_right")
    x = np.arange(1.0, 65.0, dtype=np.float32)
    out = np.zeros_like(x)
    monkeypatch.setenv("ARCFACE_CE_EMU_ORDER", "reverse")
    kernel(1, 64, (x, np.int32(0), out))  # the race shows in reverse order
    assert np.isnan(out[1:]).all()
    monkeypatch.setenv("ARCFACE_CE_EMU_ORDER", "random")
    with pytest.raises(ValueError, match=r"ARCFACE_CE_EMU_ORDER must be"):
        kernel(1, 64, (x, np.int32(0), out))


def test_half_pointer_accepts_raw_uint16(
    convert_mod: EmulatedModule,
) -> None:
    x = np.array([1.0, -2.5, 65504.0], np.float16)
    a = np.zeros(3, np.float32)
    b = np.zeros(3, np.float32)
    kernel = convert_mod.get_function("half_to_float")
    kernel(1, 32, (x.view(np.uint16), np.int64(3), a, b))
    np.testing.assert_array_equal(a, x.astype(np.float32))
    with pytest.raises(TypeError, match=r"pointer to float16 \(__half\)"):
        kernel(1, 32, (x.astype(np.float32), np.int64(3), a, b))


def test_unknown_name_expression(sync_mod: EmulatedModule) -> None:
    with pytest.raises(KeyError, match=r"'nope' is not among"):
        sync_mod.get_function("nope")


# ---------------------------------------------------------------------------
# Options and the cache.
# ---------------------------------------------------------------------------

VALUE_KERNEL = textwrap.dedent(
    """
    #include "value.cuh"
    #ifndef VALUE
    #define VALUE 1
    #endif
    extern "C" __global__ void value(int* out) {  // [1] int32, out
      out[0] = VALUE + EXTRA;
    }
    """
)


def _value(mod: EmulatedModule) -> int:
    out = np.zeros(1, np.int32)
    mod.get_function("value")(1, 1, (out,))
    return int(out[0])


def test_options_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "value.cuh").write_text("#define EXTRA 0\n")
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("ARCFACE_CE_CACHE_DIR", str(cache_dir))

    def make(options: list[str], **kw: Any) -> EmulatedModule:
        return EmulatedModule(
            VALUE_KERNEL, name_expressions=["value"], options=options, **kw
        )

    ignored = ["--std=c++17", "-arch=sm_80", "--use_fast_math"]
    assert _value(make([*ignored, f"-I{inc}"])) == 1
    binaries = sorted(cache_dir.glob("emu-*.so"))
    assert len(binaries) == 1
    stamp = binaries[0].stat().st_mtime_ns
    # Same key: loaded from the cache, nothing rebuilt.
    assert _value(make([*ignored], include_dirs=[inc])) == 1
    assert _value(make([*ignored, "-I", str(inc)])) == 1
    assert binaries[0].stat().st_mtime_ns == stamp
    assert _value(make(["-D VALUE=7", f"-I{inc}"])) == 7
    assert _value(make(["-DVALUE=8", f"-I{inc}"])) == 8
    assert _value(make(["-D", "VALUE=9", f"--include-path={inc}"])) == 9
    assert len(list(cache_dir.glob("emu-*.so"))) == 4
    # Editing an included header changes the key: no stale binary.
    (inc / "value.cuh").write_text("#define EXTRA 100\n")
    assert _value(make([f"-I{inc}"])) == 101
    # An explicit cache_dir wins over the environment.
    other = tmp_path / "other"
    assert _value(make([f"-I{inc}", "-DVALUE=3"], cache_dir=other)) == 103
    assert len(list(other.glob("emu-*.so"))) == 1
    leftovers = [p for p in cache_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_compile_error_reports_compiler_output(tmp_path: Path) -> None:
    mod = EmulatedModule(
        'extern "C" __global__ void broken(int* out) { out[0] = oops; }',
        name_expressions=["broken"],
        cache_dir=tmp_path,
    )
    with pytest.raises(
        RuntimeError, match=r"(?s)failed to compile.*<kernel source>:1.*oops"
    ):
        mod.get_function("broken")


def test_concurrent_compiles_share_one_binary(tmp_path: Path) -> None:
    # Two processes (as two MPI ranks would) build the same key at once.
    script = textwrap.dedent(
        f"""
        import numpy as np
        from arcface_ce._emulator import EmulatedModule
        code = {VALUE_KERNEL!r}.replace('#include "value.cuh"',
                                        '#define EXTRA 5')
        mod = EmulatedModule(code, name_expressions=["value"],
                             cache_dir={str(tmp_path)!r})
        out = np.zeros(1, np.int32)
        mod.get_function("value")(1, 1, (out,))
        print(int(out[0]))
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert stdout.strip() == "6"
    assert len(list(tmp_path.glob("emu-*.so"))) == 1
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
