"""The GPU backend driven through the backend protocol.

``row_stats`` then ``write`` are called directly, with NumPy arrays and the
kernels run by the CPU emulator, and with CuPy arrays on a real GPU when
one is present. Every result is compared with a float64 NumPy reference of
the protocol written below, from the protocol text only.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from conftest import assert_close, emulator_skip_reason

from arcface_ce import _gpu_backend, _kernels

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - in the test extra
    ml_dtypes = None

try:
    import cupy

    HAVE_GPU = bool(cupy.cuda.is_available())
except Exception:  # pragma: no cover - no CuPy or no driver
    cupy = None
    HAVE_GPU = False

ORDER_ENV = "ARCFACE_CE_EMU_ORDER"
ORDERS = ("forward", "reverse")
CHUNK = _kernels.CHUNK_SIZE
THETA_EPS = 1e-6  # theta kept this far from 0 and pi in dtdx

DTYPES = ["float16", "bfloat16", "float32", "float64"]
LABEL_DTYPES = ["int32", "int64"]

# Error of a statistic computed in the accumulate type, relative to the
# float64 reference from the same inputs: (rtol, atol per unit of scale).
STATS_TOL = {"float32": (4e-6, 1e-6), "float64": (1e-13, 1e-14)}
# Rounding of the written output to the logits dtype, on top of the
# accumulate error: rtol, and the smallest subnormal as an absolute floor.
OUT_RTOL = {
    "float16": 1e-3,
    "bfloat16": 8e-3,
    "float32": 2e-5,
    "float64": 1e-12,
}
OUT_TINY = {
    "float16": 6e-8,
    "bfloat16": 1e-37,
    "float32": 1e-37,
    "float64": 1e-300,
}

MARGINS = [
    (1.0, 0.5, 0.0, 64.0),  # ArcFace
    (1.35, 0.0, 0.0, 30.0),  # SphereFace
    (1.0, 0.0, 0.35, 64.0),  # CosFace: no angular term, dtdx == 1
    (0.9, 0.4, 0.15, 16.0),  # all three
]


def acc_eps_of(dtype: str) -> float:
    return float(np.finfo(np.dtype(acc_name(dtype))).eps)


def acc_name(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("ml_dtypes is needed for bfloat16")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# ---------------------------------------------------------------- setup


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("kernel_cache")
    _kernels.set_cache_dir(path)
    yield path
    _kernels.set_cache_dir(None)


@pytest.fixture(
    params=[
        pytest.param("emulated", marks=pytest.mark.emulated),
        "cupy",
    ]
)
def device(request: pytest.FixtureRequest, kernel_cache: Any) -> str:
    """'emulated' (NumPy + CPU emulation) or 'cupy' (real GPU)."""
    if request.param == "emulated":
        reason = emulator_skip_reason()
        if reason is not None:
            pytest.skip(reason)
    elif not HAVE_GPU:
        pytest.skip("no CUDA device with CuPy")
    return request.param


@pytest.fixture(params=ORDERS)
def order(request: pytest.FixtureRequest, monkeypatch: Any) -> str:
    """Thread order of the emulator (no effect on a real GPU)."""
    monkeypatch.setenv(ORDER_ENV, request.param)
    return request.param


def make_backend(device: str) -> _gpu_backend.GpuBackend:
    if device == "cupy":
        return _gpu_backend.GpuBackend(cupy, emulate=False)
    return _gpu_backend.GpuBackend(np, emulate=True)


def to_device(device: str, a: np.ndarray) -> Any:
    if device != "cupy":
        return np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        a = a.view(np.uint16)  # CuPy has no bfloat16 dtype
    return cupy.ascontiguousarray(cupy.asarray(a))


def to_host(device: str, a: Any, dtype: np.dtype) -> np.ndarray:
    if device == "cupy":
        a = cupy.asnumpy(a)
        if dtype.name == "bfloat16":
            a = a.view(dtype)
    return np.asarray(a)


def make_inputs(
    n: int, c: int, dtype: str, label_dtype: str, class_start: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cosines in [-1, 1] and labels: owned, beyond the shard, negative."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(n, c)).astype(np_dtype(dtype))
    label = class_start + rng.integers(0, max(c, 1), size=n)
    kinds = np.arange(n) % 4
    label = np.where(
        kinds == 1, class_start + c + rng.integers(0, 9, n), label
    )
    label = np.where(kinds == 2, -1 - rng.integers(0, 5, n), label)
    return x, label.astype(label_dtype)


# ---------------------------------------------------------------- reference


def ref_target(x: np.ndarray, m1: float, m2: float, m3: float) -> Any:
    c = np.clip(x, -1.0, 1.0)
    return np.cos(m1 * np.arccos(c) + m2) - m3


def ref_theta(x: Any) -> Any:
    theta = np.arccos(np.clip(x, -1.0, 1.0))
    return np.clip(theta, THETA_EPS, np.pi - THETA_EPS)


def ref_dtdx(x: Any, m1: float, m2: float) -> Any:
    if m1 == 1.0 and m2 == 0.0:
        return np.ones_like(x)
    theta = ref_theta(x)
    return m1 * np.sin(m1 * theta + m2) / np.sin(theta)


def ref_row_stats(
    x: np.ndarray,
    label: np.ndarray,
    class_start: int,
    m1: float,
    m2: float,
    m3: float,
    scale: float,
) -> np.ndarray:
    """Float64 stats [N, 4] of the protocol, row by row."""
    x = x.astype(np.float64)
    n, c = x.shape
    stats = np.zeros((n, 4))
    for i in range(n):
        yl = int(label[i]) - class_start
        owned = 0 <= yl < c
        z = scale * x[i]
        keep = np.ones(c, dtype=bool)
        if owned:
            keep[yl] = False
            stats[i, 2] = scale * ref_target(x[i, yl], m1, m2, m3)
            stats[i, 3] = 1.0
        if keep.any():
            stats[i, 0] = z[keep].max()
            stats[i, 1] = np.exp(z[keep] - stats[i, 0]).sum()
        else:
            stats[i, 0] = -np.inf
    return stats


def ref_write(
    x: np.ndarray,
    label: np.ndarray,
    class_start: int,
    row_max: np.ndarray,
    row_a: np.ndarray,
    row_t: np.ndarray,
    apply_dt: bool,
    m1: float,
    m2: float,
    scale: float,
) -> np.ndarray:
    big = float(np.finfo(x.dtype).max)
    x = x.astype(np.float64)
    n, c = x.shape
    out = row_a[:, None] * np.exp(scale * x - row_max[:, None])
    for i in range(n):
        yl = int(label[i]) - class_start
        if 0 <= yl < c:
            factor = ref_dtdx(x[i, yl], m1, m2) if apply_dt else 1.0
            # Saturates at the largest finite value of the output dtype.
            out[i, yl] = np.clip(row_t[i] * factor, -big, big)
    return out


# ---------------------------------------------------------------- checks


def check_stats(got: Any, want: np.ndarray, dtype: str, scale: float):
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    rtol, atol = STATS_TOL[acc_name(dtype)]
    assert_close(got[:, 0], want[:, 0], rtol, atol * scale, "shift")
    # d sumexp / d z = sumexp: a logit error is a relative error.
    assert_close(got[:, 1], want[:, 1], rtol + atol * scale, 0.0, "sumexp")
    assert_close(got[:, 2], want[:, 2], rtol, atol * scale, "target")
    np.testing.assert_array_equal(got[:, 3], want[:, 3], "owned")


def run_row_stats(
    device: str,
    x: np.ndarray,
    label: np.ndarray,
    class_start: int,
    margins: tuple[float, float, float, float],
) -> np.ndarray:
    backend = make_backend(device)
    stats, _ = backend.row_stats(
        to_device(device, x),
        to_device(device, label),
        class_start,
        *margins,
        None,
    )
    return to_host(device, stats, np.dtype(np.float64))


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("n", [0, 1, 7])
@pytest.mark.parametrize("c", [1, 5, 33, 1000, CHUNK + 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_stats_shapes_and_dtypes(device, order, n, c, dtype):
    label_dtype = LABEL_DTYPES[(n + c) % 2]
    class_start = 3 * c
    x, label = make_inputs(n, c, dtype, label_dtype, class_start, seed=c + n)
    m1, m2, m3, scale = MARGINS[(n + c) % len(MARGINS)]
    got = run_row_stats(device, x, label, class_start, (m1, m2, m3, scale))
    want = ref_row_stats(x, label, class_start, m1, m2, m3, scale)
    check_stats(got, want, dtype, scale)


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margins", MARGINS)
def test_row_stats_margins(device, dtype, label_dtype, margins):
    x, label = make_inputs(6, 40, dtype, label_dtype, 0, seed=11)
    # The target of row 0 at exactly 1 and row 4 at exactly -1.
    x[0, label[0]] = 1.0
    x[4, label[4]] = -1.0
    got = run_row_stats(device, x, label, 0, margins)
    want = ref_row_stats(x, label, 0, *margins)
    check_stats(got, want, dtype, margins[3])


@pytest.mark.parametrize("c", [5, 2 * CHUNK + 3])
def test_row_stats_chunk_path(device, order, monkeypatch, c):
    """Several chunks per row, and short rows forced through chunks."""
    monkeypatch.setattr(_gpu_backend, "WARP_ROW_MAX", 0)
    x, label = make_inputs(5, c, "float32", "int64", 2, seed=3)
    got = run_row_stats(device, x, label, 2, MARGINS[0])
    want = ref_row_stats(x, label, 2, *MARGINS[0])
    check_stats(got, want, "float32", MARGINS[0][3])


@pytest.mark.parametrize("c", [40, 2 * CHUNK + 3])
def test_row_stats_grid_stride(device, order, monkeypatch, c):
    """Fewer blocks than (chunk, row) pairs: every kernel loops."""
    monkeypatch.setattr(_gpu_backend, "MAX_BLOCKS", 1)
    monkeypatch.setattr(_gpu_backend, "MAX_GRID_X", 2)
    monkeypatch.setattr(_gpu_backend, "MAX_GRID_Y", 3)
    n = 2 * _kernels.NUM_WARPS + 3 if c < CHUNK else 7
    x, label = make_inputs(n, c, "float32", "int32", 1, seed=c)
    got = run_row_stats(device, x, label, 1, MARGINS[3])
    want = ref_row_stats(x, label, 1, *MARGINS[3])
    check_stats(got, want, "float32", MARGINS[3][3])


@pytest.mark.parametrize("force_chunks", [False, True])
def test_row_stats_without_columns(device, monkeypatch, force_chunks):
    """C == 0, and C == 1 with the target owned: no non-target column."""
    if force_chunks:
        monkeypatch.setattr(_gpu_backend, "WARP_ROW_MAX", -1)
    x, label = make_inputs(3, 0, "float32", "int32", 0, seed=1)
    got = run_row_stats(device, x, label, 0, MARGINS[0])
    want = np.zeros((3, 4))
    want[:, 0] = -np.inf
    np.testing.assert_array_equal(got, want)

    x = np.full((2, 1), 0.5, dtype=np.float32)
    label = np.array([7, 8], dtype=np.int64)  # row 0 owned at class_start 7
    got = run_row_stats(device, x, label, 7, (1.0, 0.0, 0.0, 2.0))
    np.testing.assert_array_equal(got[0], [-np.inf, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(got[1], [1.0, 1.0, 0.0, 0.0])


def test_cosine_above_one_is_clamped(device):
    x = np.array([[np.nextafter(np.float32(1), np.float32(2)), 0.25]])
    x = x.astype(np.float32)
    label = np.array([0], dtype=np.int32)
    got = run_row_stats(device, x, label, 0, MARGINS[0])
    want_target = 64.0 * np.cos(0.5)
    assert np.isfinite(got[0, 2]), got
    assert_close(got[0, 2], want_target, 1e-6, 64e-7, "clamped target")


def test_row_stats_is_deterministic(device, monkeypatch):
    x, label = make_inputs(3, CHUNK + 700, "float16", "int32", 0, seed=5)
    runs = []
    for name in ORDERS:
        monkeypatch.setenv(ORDER_ENV, name)
        runs.append(run_row_stats(device, x, label, 0, MARGINS[1]))
        runs.append(run_row_stats(device, x, label, 0, MARGINS[1]))
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)


@pytest.mark.parametrize("apply_dt", [False, True])
@pytest.mark.parametrize(("n", "c"), [(0, 5), (1, 1), (7, 33), (3, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_write(device, order, dtype, n, c, apply_dt):
    label_dtype = LABEL_DTYPES[c % 2]
    class_start = 5
    x, label = make_inputs(n, c, dtype, label_dtype, class_start, seed=c)
    if n:
        x[0, 0] = 1.0  # |x| = 1 at a target: dtdx stays finite
        label[0] = class_start
    m1, m2, m3, scale = MARGINS[c % len(MARGINS)]
    rng = np.random.default_rng(n + c)
    x64 = x.astype(np.float64)
    z_max = scale * (x64.max(axis=1) if c else np.zeros(n))
    row_max = z_max + rng.uniform(0.0, 3.0, n)  # >= every z of the row
    row_a = rng.uniform(0.1, 2.0, n)
    row_t = rng.uniform(-2.0, 0.5, n)
    out = to_device(device, np.empty_like(x))
    make_backend(device).write(
        out,
        to_device(device, x),
        to_device(device, label),
        class_start,
        to_device(device, row_max),
        to_device(device, row_a),
        to_device(device, row_t),
        apply_dt,
        m1,
        m2,
        m3,
        scale,
        None,
    )
    got = to_host(device, out, x.dtype)
    assert got.dtype == x.dtype and got.shape == x.shape
    want = ref_write(
        x, label, class_start, row_max, row_a, row_t, apply_dt, m1, m2, scale
    )
    # Exponent error of the accumulate type grows with |z - row_max|.
    arg = np.abs(scale * x64 - row_max[:, None]) if n else np.zeros((0, c))
    acc_eps = acc_eps_of(dtype)
    rtol = OUT_RTOL[dtype] + STATS_TOL[acc_name(dtype)][1] * float(
        arg.max(initial=0.0)
    )
    atol = OUT_TINY[dtype] * 4.0
    what = f"write {dtype} apply_dt={apply_dt}"
    target = np.zeros(x.shape, dtype=bool)
    for i in range(n):
        yl = int(label[i]) - class_start
        if not 0 <= yl < c:
            continue
        target[i, yl] = True
        t_atol = 0.0
        if apply_dt:
            # Rounding of theta (relative) moves dtdx by about
            # d(dtdx)/dtheta * eps * theta; the sines add a few ulp.
            theta = float(ref_theta(x64[i, yl]))
            slope = abs(float(ref_dtdx(x64[i, yl], m1, m2)))
            cond = m1 * (m1 + slope) * theta / np.sin(theta) + slope
            t_atol = abs(row_t[i]) * 8.0 * acc_eps * cond
        assert_close(
            got[i, yl], want[i, yl], rtol, atol + t_atol, f"{what} target {i}"
        )
    assert_close(
        np.where(target, 0.0, got), np.where(target, 0.0, want), rtol, atol,
        what,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_target_at_the_pole(device, dtype):
    """|x| = 1: SphereFace tends to m1^2; ArcFace saturates float16."""
    x = np.array([[1.0, 0.5], [0.5, -1.0]]).astype(np_dtype(dtype))
    label = np.array([0, 1], dtype=np.int32)
    row_t = np.array([-1.0, -1.0])
    ones = np.ones(2)
    got = {}
    for name, margins in (("sphere", MARGINS[1]), ("arc", MARGINS[0])):
        out = to_device(device, np.empty_like(x))
        make_backend(device).write(
            out, to_device(device, x), to_device(device, label), 0,
            to_device(device, 64.0 * ones), to_device(device, ones),
            to_device(device, row_t), True, *margins, None,
        )  # fmt: skip
        got[name] = to_host(device, out, x.dtype).astype(np.float64)
    m1 = MARGINS[1][0]
    # x = 1: m1 sin(m1 t) / sin(t) -> m1^2; x = -1: -> -m1 sin(m1 pi)/0,
    # kept finite by the angle clamp.
    assert_close(got["sphere"][0, 0], -m1 * m1, OUT_RTOL[dtype], 0.0, "m1^2")
    assert np.isfinite(got["sphere"][1, 1]), got["sphere"]
    big = float(np.finfo(x.dtype).max)
    arc = -np.sin(THETA_EPS + 0.5) / np.sin(THETA_EPS)  # about -4.8e5
    want = max(arc, -big)
    assert_close(got["arc"][0, 0], want, OUT_RTOL[dtype], 0.0, "arc pole")


def test_write_large_grid_stride(device, monkeypatch):
    """More elements than threads: the grid-stride (row, col) stepping."""
    monkeypatch.setattr(_gpu_backend, "MAX_BLOCKS", 3)
    n, c = 5, 1001  # stride 768 is not a multiple of C
    x, label = make_inputs(n, c, "float64", "int64", 0, seed=9)
    row_max = 64.0 * np.ones(n)
    row_a = np.full(n, 0.5)
    row_t = np.full(n, -0.25)
    out = to_device(device, np.empty_like(x))
    make_backend(device).write(
        out, to_device(device, x), to_device(device, label), 0,
        to_device(device, row_max), to_device(device, row_a),
        to_device(device, row_t), True, *MARGINS[0], None,
    )  # fmt: skip
    want = ref_write(
        x, label, 0, row_max, row_a, row_t, True, *MARGINS[0][:2], 64.0
    )
    got = to_host(device, out, x.dtype)
    assert_close(got, want, 1e-12, 1e-300, "write float64 grid-stride")


@pytest.mark.slow
def test_indices_past_2_31_on_gpu(kernel_cache):
    """N * C > 2**31 on a real GPU (6 GiB of float16), checked in closed
    form: zeros everywhere except one 0.5 per row at a known column."""
    if not HAVE_GPU:
        pytest.skip("no CUDA device with CuPy")
    n, c, scale = 3, 2**30 + 7, 16.0
    hot = np.array([5, c // 2, c - 3])  # row 2 starts past 2**31
    label = np.array([c - 1, 0, c - 3], dtype=np.int64)  # row 2: hot
    x = cupy.zeros((n, c), dtype=np.float16)
    x[cupy.arange(n), cupy.asarray(hot)] = 0.5
    backend = make_backend("cupy")
    lab = cupy.asarray(label)
    stats = cupy.asnumpy(
        backend.row_stats(x, lab, 0, 1.0, 0.0, 0.0, scale, None)[0]
    )
    # Rows 0, 1: target x = 0, non-target max 0.5 and C - 2 zeros.
    # Row 2: the hot column is the target; every non-target is 0.
    far = np.exp(-0.5 * scale)
    want = np.array(
        [
            [0.5 * scale, 1.0 + (c - 2) * far, 0.0, 1.0],
            [0.5 * scale, 1.0 + (c - 2) * far, 0.0, 1.0],
            [0.0, c - 1.0, 0.5 * scale, 1.0],
        ]
    )
    assert_close(stats, want, 1e-3, 1e-6, "stats past 2**31")
    out = cupy.empty_like(x)
    ones = cupy.ones(n)
    backend.write(
        out, x, lab, 0, cupy.full(n, 0.5 * scale), ones, -ones, False,
        1.0, 0.0, 0.0, scale, None,
    )  # fmt: skip
    got = cupy.asnumpy(out[:, [0, c - 4, c - 3, c - 1]]).astype(np.float64)
    want_out = np.full((n, 4), far)
    want_out[0, 3] = want_out[1, 0] = want_out[2, 2] = -1.0  # targets
    assert_close(got, want_out, 2e-3, 1e-7, "write past 2**31")


def test_backend_rejects_mismatched_module():
    with pytest.raises(ValueError, match="emulate=True needs numpy"):
        _gpu_backend.GpuBackend(np, emulate=False)


def test_kernel_cache_dir_follows_setting(tmp_path):
    old = _kernels.cache_dir()
    _kernels.set_cache_dir(tmp_path)
    try:
        assert _kernels.cache_dir() == os.fspath(tmp_path)
    finally:
        _kernels.set_cache_dir(old)
