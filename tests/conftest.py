"""Shared test machinery: kernel cache, MPI awareness, tolerances.

The suite runs in a plain process (tests marked ``mpi`` are skipped) and
under an MPI launcher (``mpiexec -n 2 python -m pytest``). Under MPI a
failure on any rank prints its report and aborts the whole job at once, so
a rank left waiting in a collective cannot hang the run; only rank 0
prints the normal report.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

ml_dtypes: Any
try:
    import ml_dtypes
except ImportError:  # pragma: no cover - optional
    ml_dtypes = None

CACHE_ENV = "ARCFACE_CE_CACHE_DIR"
EMULATE_ENV = "ARCFACE_CE_EMULATE"
CPU_KERNELS_ENV = "ARCFACE_CE_CPU_KERNELS"

_SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value:
            return int(value)
    return default


# Known without importing mpi4py: a plain process never touches MPI.
WORLD_SIZE = _env_int(_SIZE_ENV, 1)
WORLD_RANK = _env_int(_RANK_ENV, 0)
UNDER_MPI = WORLD_SIZE > 1


# ---------------------------------------------------------------- dtypes

FLOAT_DTYPES: list[np.dtype] = [np.dtype(np.float16)]
if ml_dtypes is not None:
    FLOAT_DTYPES.append(np.dtype(ml_dtypes.bfloat16))
FLOAT_DTYPES += [np.dtype(np.float32), np.dtype(np.float64)]

# (rtol, atol) per logits dtype. rtol covers the rounding of the output to
# the dtype; atol is per unit of ``scale`` (a logit error of one unit of
# the cosine shows up ``scale`` times in the loss), see ``tolerances``.
TOLERANCE: dict[str, tuple[float, float]] = {
    "float16": (2e-3, 1e-4),
    "bfloat16": (1.6e-2, 1e-4),
    "float32": (1e-5, 5e-7),
    "float64": (1e-12, 1e-13),
}


def dtype_name(dtype: Any) -> str:
    """Short name of a NumPy (or ml_dtypes) dtype: 'float16', 'bfloat16'."""
    return np.dtype(dtype).name


def tolerances(
    dtype: Any, scale: float, grad_scale: float = 1.0
) -> dict[str, tuple[float, float]]:
    """(rtol, atol) for the loss, the softmax and the gradient.

    Parameters
    ----------
    dtype : dtype
        Dtype of the logits.
    scale : float
        The loss's ``scale``; errors of the scaled logits grow with it.
    grad_scale : float
        Largest upstream gradient per row (``1/N`` for 'mean').
    """
    rtol, atol = TOLERANCE[dtype_name(dtype)]
    z_err = atol * max(scale, 1.0)
    return {
        "loss": (rtol, z_err),
        # d p / d z = p (1 - p) <= 1/4
        "softmax": (rtol, 0.25 * z_err + 1e-300),
        "grad": (rtol, grad_scale * max(scale, 1.0) * 0.5 * z_err),
    }


def to_numpy(a: Any) -> np.ndarray:
    """Host float64 copy of a NumPy or CuPy array (or scalar)."""
    if hasattr(a, "get") and not isinstance(a, np.ndarray):
        a = a.get()
    return np.asarray(a).astype(np.float64)


def assert_close(
    actual: Any,
    expected: Any,
    rtol: float,
    atol: float,
    what: str,
) -> None:
    """Check ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    NaN must match NaN and infinities must match exactly. On failure the
    message names ``what``, the number of bad entries and the worst index
    with its actual and expected values.
    """
    a = to_numpy(actual)
    e = to_numpy(expected)
    if a.shape != e.shape:
        raise AssertionError(
            f"{what}: shape {a.shape} != expected shape {e.shape}"
        )
    if a.size == 0:
        return
    with np.errstate(invalid="ignore", over="ignore"):
        limit = atol + rtol * np.abs(e)
        err = np.abs(a - e)
        same_special = (np.isnan(a) & np.isnan(e)) | (np.isinf(e) & (a == e))
        bad = ~same_special & ~(err <= limit)
        if not bad.any():
            return
        excess = np.where(bad, err / limit, 0.0)
        excess = np.where(np.isnan(excess), np.inf, excess)
    worst = np.unravel_index(int(np.argmax(excess)), a.shape)
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {a.size} entries differ "
        f"(rtol={rtol:g}, atol={atol:g}); worst at index "
        f"{tuple(int(i) for i in worst)}: actual {a[worst]!r}, "
        f"expected {e[worst]!r}, |diff| {err[worst]!r}"
    )


# ---------------------------------------------------------------- backends


def have_cxx_compiler() -> bool:
    """Whether a C++ compiler for the kernel emulator is on PATH."""
    names = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    return any(name and shutil.which(name) for name in names)


def emulator_skip_reason() -> str | None:
    """None when the emulated backend can run, else why not."""
    try:
        importlib.import_module("arcface_ce._emulator")
    except ImportError as exc:
        return f"arcface_ce._emulator cannot be imported: {exc}"
    if not have_cxx_compiler():
        return "no C++ compiler found for the kernel emulator"
    return None


def backend_params(*cases: Any) -> list[Any]:
    """``pytest.param`` list for a test parametrized on ``backend``.

    Each case is ``(backend, *values)``; emulated cases get the
    ``emulated`` marker so that ``-m "not emulated"`` drops them.
    """
    out = []
    for case in cases:
        marks = [pytest.mark.emulated] if case[0] == "emulated" else []
        out.append(pytest.param(*case, marks=marks))
    return out


@pytest.fixture(autouse=True)
def _plain_numpy_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts on the NumPy backend unless it asks otherwise."""
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    monkeypatch.delenv(CPU_KERNELS_ENV, raising=False)
    # A contributor's shell may set these (the README shows them); tests
    # that need them set them themselves.
    monkeypatch.delenv("ARCFACE_CE_EMU_ORDER", raising=False)


@pytest.fixture(
    params=[
        "numpy",
        "numpy-pure",
        pytest.param("emulated", marks=pytest.mark.emulated),
        pytest.param("emulated-reverse", marks=pytest.mark.emulated),
    ]
)
def backend(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    _plain_numpy_backend: None,
) -> str:
    """The backend a test runs on.

    'numpy': the NumPy backend as users get it (compiled CPU kernels for
    float32/float64 where a compiler exists); 'numpy-pure': the same with
    ``ARCFACE_CE_CPU_KERNELS=0`` (ufunc code only); 'emulated': the CUDA
    kernels run on the CPU, their threads in forward order, and
    'emulated-reverse' in reverse order (a race shows in one of them).
    """
    name = request.param
    if name == "numpy-pure":
        monkeypatch.setenv(CPU_KERNELS_ENV, "0")
        return name
    if name == "emulated-reverse":
        monkeypatch.setenv("ARCFACE_CE_EMU_ORDER", "reverse")
        name = "emulated"
    if name == "emulated":
        reason = emulator_skip_reason()
        if reason is not None:
            pytest.skip(reason)
        monkeypatch.setenv(EMULATE_ENV, "1")
    elif name == "numpy":
        monkeypatch.delenv(EMULATE_ENV, raising=False)
        if os.environ.get("ARCFACE_CE_REQUIRE_KERNELS") == "1":
            from arcface_ce import _cpu_kernels

            if _cpu_kernels.library() is None:
                pytest.fail(_cpu_kernels.status())
    else:  # pragma: no cover - misuse of the fixture
        raise ValueError(f"unknown backend {name!r}")
    return name


# ---------------------------------------------------------------- hooks

_cache_dir: str | None = None
_old_cache_env: str | None = None


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    global _cache_dir, _old_cache_env
    config.addinivalue_line(
        "markers",
        "emulated: runs the CUDA kernels in the CPU emulator (slow)",
    )
    # A fresh kernel cache per rank: a stale binary cannot hide an edit.
    _old_cache_env = os.environ.get(CACHE_ENV)
    _cache_dir = tempfile.mkdtemp(prefix=f"arcface_ce_cache_r{WORLD_RANK}_")
    os.environ[CACHE_ENV] = _cache_dir
    if UNDER_MPI and WORLD_RANK > 0:
        # Only rank 0 prints the normal report; failures on other ranks
        # are printed by ``_abort_on_failure`` below.
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _cache_dir is not None:
        shutil.rmtree(_cache_dir, ignore_errors=True)
        if _old_cache_env is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = _old_cache_env


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if UNDER_MPI:
        return
    skip = pytest.mark.skip(reason="needs several MPI ranks (use mpiexec)")
    for item in items:
        if "mpi" in item.keywords:
            item.add_marker(skip)


def _abort_on_failure(report: Any) -> None:
    if not (UNDER_MPI and report.failed):
        return
    text = getattr(report, "longreprtext", "") or str(report.longrepr)
    sys.stderr.write(
        f"\n[rank {WORLD_RANK}/{WORLD_SIZE}] FAILED {report.nodeid}\n"
        f"{text}\n[rank {WORLD_RANK}] aborting all ranks\n"
    )
    sys.stderr.flush()
    sys.stdout.flush()
    if _cache_dir is not None:  # Abort skips pytest_unconfigure
        shutil.rmtree(_cache_dir, ignore_errors=True)
    from mpi4py import MPI

    MPI.COMM_WORLD.Abort(1)


# Skips that mean "the kernels were not compiled or not run here". With
# ARCFACE_CE_REQUIRE_KERNELS=1 (set by scripts/run_tests.sh, hence CI)
# they fail instead, so a missing compiler or NVRTC cannot turn the kernel
# tests into a silent green run.
_KERNEL_SKIPS = ("_emulator", "C++ compiler", "libnvrtc", "NVRTC")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get("ARCFACE_CE_REQUIRE_KERNELS") == "1"
        and any(key in str(report.longrepr) for key in _KERNEL_SKIPS)
    ):
        report.outcome = "failed"
        report.longrepr = (
            "kernel test skipped although ARCFACE_CE_REQUIRE_KERNELS=1: "
            f"{report.longrepr}"
        )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _abort_on_failure(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _abort_on_failure(report)


@pytest.fixture(scope="session")
def world() -> Iterator[Any]:
    """``MPI.COMM_WORLD``; the test is skipped in a single process."""
    if not UNDER_MPI:
        pytest.skip("needs several MPI ranks (use mpiexec)")
    from mpi4py import MPI

    yield MPI.COMM_WORLD
