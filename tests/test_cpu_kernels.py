"""The compiled CPU kernels of the NumPy backend, and ``out=``.

The NumPy backend runs float32/float64 logits through
``kernels/margin_ce_cpu.cpp`` when a C++ compiler is available, and its
ufunc code otherwise (``ARCFACE_CE_CPU_KERNELS=0``). Both are held to the
float64 reference here on shapes that reach the kernels' edges: several
row blocks spread over threads, rows longer than one 1024-element chunk
and not a multiple of 16, strided rows, in-place output, logits whose
exponentials would underflow, NaN.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FLOAT_DTYPES, assert_close, tolerances
from reference import margin_ce_reference

from arcface_ce import (
    _cpu_kernels,
    margin_cross_entropy,
    margin_cross_entropy_and_grad,
)
from arcface_ce._numpy_backend import KERNEL_BLOCK_BYTES

MARGINS = {"margin1": 1.0, "margin2": 0.5, "margin3": 0.0, "scale": 64.0}


def make(n: int, c: int, dtype: Any, seed: int, spread: float = 0.9):
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-spread, spread, (n, c)).astype(dtype)
    label = rng.integers(0, c, n)
    return logits, label


def check(logits, label, loss, grad, reduction="mean", **margins) -> None:
    kw = {**MARGINS, **margins}
    ref = margin_ce_reference(logits, label, reduction=reduction, **kw)
    n = max(1, label.size)
    tol = tolerances(
        logits.dtype, kw["scale"], 1.0 / n if reduction == "mean" else 1.0
    )
    assert_close(loss, ref.loss, *tol["loss"], "loss")
    assert_close(grad, ref.grad, *tol["grad"], "grad")


def need_kernels() -> Any:
    lib = _cpu_kernels.library()
    if lib is None:
        pytest.skip(_cpu_kernels.status())
    return lib


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exponential_accuracy(dtype: Any) -> None:
    """The kernels' exp() over its whole clamped range [floor, 0]."""
    lib = need_kernels()
    floor = -87.0 if dtype == np.float32 else -700.0
    x = np.concatenate(
        [np.linspace(floor, 0.0, 200_001), [floor, 0.0, -1e-30, -0.5]]
    ).astype(dtype)
    y = np.empty_like(x)
    fn = getattr(lib, "mce_cpu_exp_" + _cpu_kernels.suffix(x.dtype))
    fn(x.ctypes.data, y.ctypes.data, x.size)
    exact = np.exp(x.astype(np.float64))
    rel = np.abs(y.astype(np.float64) - exact) / exact
    eps = np.finfo(dtype).eps
    assert rel.max() <= 4 * eps, f"worst relative error {rel.max():.3g}"
    # Results are normal numbers down to the floor.
    assert y.min() >= np.finfo(dtype).tiny


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exponential_propagates_nan(dtype: Any) -> None:
    lib = need_kernels()
    x = np.array([np.nan, -1.0], dtype=dtype)
    y = np.empty_like(x)
    fn = getattr(lib, "mce_cpu_exp_" + _cpu_kernels.suffix(x.dtype))
    fn(x.ctypes.data, y.ctypes.data, x.size)
    assert np.isnan(y[0]) and y[1] == pytest.approx(np.exp(-1.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("n", "c"),
    [(1, 1), (3, 15), (5, 1023), (4, 1025), (7, 3001), (2, 17)],
)
def test_row_edges(backend: str, dtype: Any, n: int, c: int) -> None:
    logits, label = make(n, c, dtype, seed=n * 7919 + c)
    loss, grad = margin_cross_entropy_and_grad(logits, label, group=False)
    check(logits, label, loss, grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_blocks_over_threads(
    backend: str, dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More rows than one kernel block holds: blocks run on the pool
    (forced even where ARCFACE_CE_NUM_THREADS=1 or one core)."""
    monkeypatch.setenv("ARCFACE_CE_NUM_THREADS", "2")
    c = 3001
    n = 3 * KERNEL_BLOCK_BYTES // (c * np.dtype(dtype).itemsize) + 5
    logits, label = make(n, c, dtype, seed=11)
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="none"
    )
    check(logits, label, loss, grad, reduction="none")
    loss2, soft = margin_cross_entropy(
        logits, label, group=False, reduction="none", return_softmax=True
    )
    ref = margin_ce_reference(logits, label, reduction="none", **MARGINS)
    tol = tolerances(dtype, 64.0)
    assert_close(soft, ref.softmax, *tol["softmax"], "softmax")
    assert_close(loss2, loss, 0.0, 0.0, "loss with and without softmax")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strided_rows(backend: str, dtype: Any) -> None:
    """Every other row of a larger array: rows strided, columns not."""
    big, _ = make(24, 1500, dtype, seed=5)
    logits = big[::2, 100:1300]
    label = np.random.default_rng(6).integers(0, logits.shape[1], 12)
    loss, grad = margin_cross_entropy_and_grad(logits, label, group=False)
    check(np.ascontiguousarray(logits), label, loss, grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_argument(backend: str, dtype: Any) -> None:
    logits, label = make(9, 2050, dtype, seed=8)
    out = np.full_like(logits, 7.0)
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, out=out
    )
    assert grad.base is out or grad is out or np.shares_memory(grad, out)
    check(logits, label, loss, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_in_place(backend: str, dtype: Any) -> None:
    """``out=logits``: the gradient replaces the logits."""
    logits, label = make(6, 1100, dtype, seed=9)
    keep = logits.copy()
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, out=logits
    )
    assert np.shares_memory(grad, logits)
    check(keep, label, loss, grad)


def test_wide_range_logits(backend: str) -> None:
    """Logits far outside [-1, 1]: clamped exponentials stay normal and
    the result still matches the reference (nothing subnormal leaks)."""
    logits, label = make(8, 2000, np.float32, seed=10, spread=3.0)
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, margin2=0.0, scale=64.0
    )
    check(logits, label, loss, grad, margin2=0.0)


def test_nan_logit_gives_nan_row(backend: str) -> None:
    logits, label = make(3, 50, np.float32, seed=12)
    logits[1, (label[1] + 1) % 50] = np.nan
    loss = margin_cross_entropy(logits, label, group=False, reduction="none")
    rows = np.asarray(loss).reshape(-1)
    assert np.isnan(rows[1]) and np.isfinite(rows[[0, 2]]).all()


def test_compiled_and_pure_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    need_kernels()
    logits, label = make(40, 4097, np.float32, seed=13)
    fast = margin_cross_entropy_and_grad(logits, label, group=False)
    monkeypatch.setenv(_cpu_kernels.ENV, "0")
    assert _cpu_kernels.library() is None
    assert _cpu_kernels.status().startswith("pure NumPy")
    pure = margin_cross_entropy_and_grad(logits, label, group=False)
    assert_close(fast[0], pure[0], 1e-6, 0.0, "loss")
    assert_close(fast[1], pure[1], 1e-5, 1e-12, "grad")


def test_no_compiler_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A missing compiler disables the kernels; results stay right."""
    monkeypatch.setenv("ARCFACE_CE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert _cpu_kernels.library() is None
    assert "unavailable" in _cpu_kernels.status()
    logits, label = make(5, 300, np.float32, seed=14)
    loss, grad = margin_cross_entropy_and_grad(logits, label, group=False)
    check(logits, label, loss, grad)


def test_library_functions_release_the_gil() -> None:
    """ctypes.CDLL (not PyDLL) calls drop the GIL: threads overlap."""
    lib = need_kernels()
    assert isinstance(lib, ctypes.CDLL)
    assert not isinstance(lib, ctypes.PyDLL)


def _conversions(lib: Any, name: str) -> tuple[Any, Any]:
    return (
        getattr(lib, f"mce_cpu_widen_{name}"),
        getattr(lib, f"mce_cpu_narrow_{name}"),
    )


def _sixteen_bit(name: str) -> Any:
    if name == "f16":
        return np.dtype(np.float16)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("name", ["f16", "bf16"])
def test_widen_every_16_bit_pattern(name: str) -> None:
    """16 -> 32 bits, all 65536 patterns, against NumPy / ml_dtypes."""
    lib = need_kernels()
    dtype = _sixteen_bit(name)
    bits = np.arange(1 << 16, dtype=np.uint16)
    widen, _ = _conversions(lib, name)
    got = np.empty(bits.size, dtype=np.float32)
    widen(bits.ctypes.data, got.ctypes.data, bits.size)
    want = bits.view(dtype).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(
        got.view(np.uint32)[~nan], want.view(np.uint32)[~nan]
    )


@pytest.mark.parametrize("name", ["f16", "bf16"])
def test_narrow_rounds_to_nearest_even(name: str) -> None:
    """32 -> 16 bits on every 16-bit value, the midpoints between
    neighbours (ties), their neighbours, overflow, NaN and random floats."""
    lib = need_kernels()
    dtype = _sixteen_bit(name)
    rng = np.random.default_rng(15)
    with np.errstate(invalid="ignore", over="ignore"):
        # (casts of signalling NaN patterns and of overflowing values)
        wide = np.arange(1 << 16, dtype=np.uint16).view(dtype)
        wide = wide.astype(np.float32)
        finite = np.unique(wide[np.isfinite(wide)])
        mids = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(
            np.float32
        )
        ulp = np.spacing(mids)
        randoms = rng.standard_normal(100_000) * 10.0 ** rng.integers(
            -9, 5, 100_000
        )
        special = [np.inf, -np.inf, np.nan, 1e30, -1e30, 65519.0, 65520.0]
        x = np.concatenate(
            [wide, mids, mids + ulp, mids - ulp, special, randoms]
        ).astype(np.float32)
        want = x.astype(dtype)  # NumPy / ml_dtypes round to nearest even
    _, narrow = _conversions(lib, name)
    got = np.empty(x.size, dtype=np.uint16)
    narrow(x.ctypes.data, got.ctypes.data, x.size)
    nan = np.isnan(x)
    assert np.isnan(got.view(dtype)[nan].astype(np.float32)).all()
    want_bits = want.view(np.uint16)[~nan]
    bad = np.flatnonzero(got[~nan] != want_bits)
    assert bad.size == 0, (
        f"{bad.size} values differ, first: {x[~nan][bad[:5]]!r} -> "
        f"{got[~nan][bad[:5]]!r}, expected {want_bits[bad[:5]]!r}"
    )


@pytest.mark.parametrize("value", [np.inf, 5e37], ids=["inf", "overflow"])
def test_infinite_off_target_logit_gives_nan_row(
    backend: str, value: float
) -> None:
    """+inf, or a float32 logit whose scaled value overflows: the row's
    loss is infinite, so its loss and gradient are NaN on every backend
    (never a small finite number); the other rows are untouched."""
    logits, label = make(3, 40, np.float32, seed=16)
    logits[1, (label[1] + 3) % 40] = value
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="none"
    )
    rows = np.asarray(loss).reshape(-1)
    assert np.isnan(rows[1]) and np.isnan(grad[1]).all()
    keep = [0, 2]
    ref = margin_ce_reference(
        logits[keep], label[keep], reduction="none", **MARGINS
    )
    tol = tolerances(np.float32, 64.0)
    assert_close(rows[keep], ref.rows, *tol["loss"], "other rows' loss")
    assert_close(grad[keep], ref.grad, *tol["grad"], "other rows' grad")


def test_infinite_target_logit_is_clamped(backend: str) -> None:
    """The target is clamped to a cosine before use, so +inf there is
    x = 1: a finite loss, equal to the reference's at x = 1."""
    logits, label = make(3, 40, np.float32, seed=17)
    logits[1, label[1]] = np.inf
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="none"
    )
    clamped = logits.copy()
    clamped[1, label[1]] = 1.0
    ref = margin_ce_reference(clamped, label, reduction="none", **MARGINS)
    tol = tolerances(np.float32, 64.0)
    assert_close(loss, ref.loss, *tol["loss"], "loss")
    off = np.ones(logits.shape, dtype=bool)
    off[np.arange(3), label] = False
    assert_close(grad[off], ref.grad[off], *tol["grad"], "off-target grad")
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [64.0, 10_000.0])
def test_target_far_above_the_rest(backend: str, dtype: Any, scale: float):
    """The raw target is the row maximum but its margin logit is far below
    it: the shift must come from the other logits, or the clamped terms
    would dominate the sum (loss ~ 2000 instead of ~ 0)."""
    logits = np.array([[0.95, -0.5, -0.5, -0.5], [0.1, 0.2, 0.3, 0.4]])
    logits = logits.astype(dtype)
    label = np.array([0, 2])
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, scale=scale, reduction="none"
    )
    check(logits, label, loss, grad, reduction="none", scale=scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_no_finite_off_target_logit(backend: str, dtype: Any) -> None:
    """A row whose other logits are all -inf has loss 0 and gradient 0."""
    logits, label = make(3, 20, dtype, seed=18)
    keep = logits[1, label[1]]
    logits[1] = -np.inf
    logits[1, label[1]] = keep
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="none"
    )
    assert loss[1, 0] == 0 and (grad[1] == 0).all()
    # (the reference is not written for -inf rows: check the others)
    keep_rows = [0, 2]
    check(
        logits[keep_rows],
        label[keep_rows],
        loss[keep_rows],
        grad[keep_rows],
        reduction="none",
    )


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["compiled", "pure"])
def test_long_row_sum_accuracy(
    monkeypatch: pytest.MonkeyPatch, kernels: str
) -> None:
    """16M classes in one float32 row: the sum of exponentials must not
    lose digits with C (float32 BLAS accumulation was 10 ulp off here)."""
    monkeypatch.setenv(_cpu_kernels.ENV, kernels)
    rng = np.random.default_rng(19)
    logits = rng.uniform(-0.05, 0.05, (1, 1 << 24)).astype(np.float32)
    label = np.array([3])
    loss = margin_cross_entropy(logits, label, group=False)
    ref = float(margin_ce_reference(logits, label, **MARGINS).loss)
    ulp = float(np.spacing(np.float32(ref)))
    assert abs(float(loss) - ref) <= 2 * ulp, (float(loss), ref, ulp)


@pytest.mark.parametrize(
    "dtype", FLOAT_DTYPES, ids=[dt.name for dt in FLOAT_DTYPES]
)
@pytest.mark.parametrize("offset", [0, 1, 3], ids=["aligned", "off1", "off3"])
@pytest.mark.parametrize("c", [8, 16, 24, 40, 4096, 4104])
def test_vector_paths(backend: str, dtype: Any, offset: int, c: int) -> None:
    """Row lengths that are whole 16-byte vectors for every dtype (the
    CUDA kernels' vector loads and stores), with the arrays starting on a
    16-byte boundary or 1 or 3 elements past one (unaligned head, scalar
    write), forward, softmax, gradient and in place."""
    n = 5
    rng = np.random.default_rng(c * 10 + offset)
    buf = np.empty(n * c + offset + 8, dtype=dtype)
    base = (-buf.ctypes.data % 16) // buf.itemsize  # first aligned element
    logits = buf[base + offset : base + offset + n * c].reshape(n, c)
    logits[...] = rng.uniform(-0.9, 0.9, (n, c)).astype(dtype)
    label = rng.integers(0, c, n)
    label[0] = c - 1  # a target in the last vector
    ref = margin_ce_reference(logits, label, reduction="sum", **MARGINS)
    tol = tolerances(dtype, 64.0)
    loss, soft = margin_cross_entropy(
        logits, label, group=False, reduction="sum", return_softmax=True
    )
    assert_close(loss, ref.loss, *tol["loss"], "loss")
    assert_close(soft, ref.softmax, *tol["softmax"], "softmax")
    out_buf = np.empty_like(buf)
    out = out_buf[base + offset : base + offset + n * c].reshape(n, c)
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="sum", out=out
    )
    assert_close(grad, ref.grad, *tol["grad"], "grad")
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="sum", out=logits
    )
    assert_close(grad, ref.grad, *tol["grad"], "grad in place")


_USE_KERNELS = """
import numpy as np
from arcface_ce import _cpu_kernels
lib = _cpu_kernels.library()
assert lib is not None, _cpu_kernels.status()
x = np.array([-1.0, 0.0], dtype=np.float32)
y = np.empty_like(x)
lib.mce_cpu_exp_f32(x.ctypes.data, y.ctypes.data, 2)
assert abs(y[0] - np.exp(-1.0)) < 1e-6 and y[1] == 1.0, y
print("ok")
"""


@pytest.mark.parametrize("damage", ["truncated", "foreign", "stamp"])
def test_damaged_cache_file_is_rebuilt(tmp_path: Any, damage: str) -> None:
    """A truncated or foreign file where the cached module should be
    (dlopen can die of SIGBUS on the first) is detected and rebuilt."""
    import _ctypes
    import os
    import subprocess
    import sys

    need_kernels()
    env = {**os.environ, "ARCFACE_CE_CACHE_DIR": str(tmp_path)}
    env.pop(_cpu_kernels.ENV, None)

    def run() -> None:
        proc = subprocess.run(
            [sys.executable, "-c", _USE_KERNELS],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0 and "ok" in proc.stdout, (
            proc.returncode,
            proc.stderr[-2000:],
        )

    run()  # builds the module into tmp_path
    (so,) = tmp_path.glob("cpu-*.so")
    if damage == "stamp":  # the digest file itself is garbage
        stamp = so.with_name(so.name + ".sha256")
        stamp.write_bytes(b"\xff\xfe not a digest")
        run()
        assert stamp.read_text().strip() != "", "stamp not rewritten"
        return
    if damage == "truncated":
        bad = so.read_bytes()[:5000]
    else:
        bad = Path(_ctypes.__file__).read_bytes()
    tmp = tmp_path / "replacement"
    tmp.write_bytes(bad)
    os.replace(tmp, so)  # a new file, as a crashed writer would leave
    run()
    assert so.read_bytes() != bad


def test_nan_only_off_target_logits(backend: str) -> None:
    """Off-target logits that are NaN (and -inf) only: still a NaN row
    (the max skips NaN, the row must not pass for one without mass)."""
    logits = np.array(
        [[np.nan, 0.5, -np.inf], [0.1, 0.5, 0.2]], dtype=np.float32
    )
    label = np.array([1, 1])
    loss, soft = margin_cross_entropy(
        logits, label, group=False, reduction="none", return_softmax=True
    )
    assert np.isnan(loss[0, 0]) and np.isnan(soft[0]).all()
    assert np.isfinite(loss[1, 0]) and np.isfinite(soft[1]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_target_gradient_at_the_poles(backend: str, dtype: Any) -> None:
    """At x = +-1 dtarget/dx is evaluated at theta clamped to
    [1e-6, pi - 1e-6] (documented); every backend gives that value."""
    logits = np.array([[1.0, 0.2, -0.3], [-1.0, 0.2, -0.3]], dtype=dtype)
    label = np.array([0, 0])
    m1, m2 = 1.0, 0.5
    _, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="sum", margin1=m1, margin2=m2
    )
    # p_t - 1 = -(sum of the other classes' softmax), without the
    # cancellation; the slope from the clamped angle.
    ref = margin_ce_reference(
        logits, label, reduction="sum", margin1=m1, margin2=m2
    )
    others = ref.softmax[:, 1:].sum(axis=1)
    theta = np.array([1e-6, np.pi - 1e-6])
    slope = m1 * np.sin(m1 * theta + m2) / np.sin(theta)
    want = -64.0 * others * slope
    assert_close(grad[:, 0], want, 1e-5, 1e-12, "target gradient at +-1")


@pytest.mark.parametrize(
    "dtype", FLOAT_DTYPES, ids=[dt.name for dt in FLOAT_DTYPES]
)
def test_masked_class_gets_exactly_zero(backend: str, dtype: Any) -> None:
    """A -inf logit (a masked class): softmax and gradient exactly 0 on
    every backend, not exp(floor) times something."""
    logits = np.array([[0.3, -np.inf, 0.1, 0.5], [-1.0, 0.2, 0.0, 0.1]])
    logits = logits.astype(dtype)
    label = np.array([0, 1])
    _, soft = margin_cross_entropy(
        logits, label, group=False, return_softmax=True
    )
    _, grad = margin_cross_entropy_and_grad(logits, label, group=False)
    assert soft[0, 1] == 0 and grad[0, 1] == 0


@pytest.mark.parametrize(
    "dtype", FLOAT_DTYPES, ids=[dt.name for dt in FLOAT_DTYPES]
)
def test_infinite_upstream_gradient(backend: str, dtype: Any) -> None:
    """grad_loss = inf: off-target entries inf (not NaN) on every path."""
    logits = np.array([[0.3, -0.2, 0.1, 0.5], [0.2, 0.1, -0.3, 0.4]])
    logits = logits.astype(dtype)
    label = np.array([0, 1])
    _, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, grad_loss=np.inf
    )
    off = np.ones(logits.shape, dtype=bool)
    off[[0, 1], label] = False
    g = grad.astype(np.float64)
    assert (g[off] == np.inf).all(), g


@pytest.mark.parametrize(
    "dtype", FLOAT_DTYPES, ids=[dt.name for dt in FLOAT_DTYPES]
)
def test_huge_off_target_logit_gradient(backend: str, dtype: Any) -> None:
    """A logit of 6e4 (float16's range, scaled: 3.8e6): its class takes
    all the mass, gradient 64 there, for 16-bit outputs too (computing
    scale * x - M in one float lost 10 % of it)."""
    logits = np.array([[0.3, 6e4, 0.1, 0.5]]).astype(dtype)
    label = np.array([0])
    _, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="sum"
    )
    ref = margin_ce_reference(logits, label, reduction="sum", **MARGINS)
    tol = tolerances(dtype, 64.0)
    assert_close(grad, ref.grad, *tol["grad"], "grad")


WIDE_DTYPES = [dt for dt in FLOAT_DTYPES if dt != np.float16]


@pytest.mark.parametrize(
    "dtype", WIDE_DTYPES, ids=[dt.name for dt in WIDE_DTYPES]
)
def test_tiny_upstream_gradient(backend: str, dtype: Any) -> None:
    """grad_loss = 1e-30: the rescaling factors are too small to multiply
    stored exponentials without subnormals, so the outputs are recomputed
    from the logits (the kernels' write pass for every dtype that can hold
    1e-30; float16 cannot)."""
    logits, label = make(6, 300, dtype, seed=27)
    _, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="sum", grad_loss=1e-30
    )
    ref = margin_ce_reference(
        logits, label, reduction="sum", grad_loss=1e-30, **MARGINS
    )
    rtol, _ = tolerances(dtype, 64.0)["grad"]
    assert_close(grad, ref.grad, rtol * 10, 1e-36, "grad")


@pytest.mark.parametrize("order", [">", "<"], ids=["big", "little"])
@pytest.mark.parametrize("kind", ["f2", "f4", "f8"])
def test_byte_order(backend: str, order: str, kind: str) -> None:
    """Logits stored big-endian (from a file) give the same results."""
    native, label = make(4, 37, np.dtype(kind), seed=28)
    logits = native.astype(np.dtype(order + kind))
    want = margin_cross_entropy_and_grad(native, label, group=False)
    got = margin_cross_entropy_and_grad(logits, label, group=False)
    assert_close(got[0], want[0], 0.0, 0.0, "loss")
    assert_close(got[1], want[1], 0.0, 0.0, "grad")
