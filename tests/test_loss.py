"""Single-process tests of the loss, its softmax and its gradient.

Every numeric check compares against the float64 reference of
``reference.py`` computed from the same (rounded) inputs. All calls pass
``group=False`` except the tests of ``group=None`` in a plain process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from conftest import (
    FLOAT_DTYPES,
    UNDER_MPI,
    assert_close,
    backend_params,
    tolerances,
)
from reference import margin_ce_reference

import arcface_ce
from arcface_ce import margin_cross_entropy, margin_cross_entropy_and_grad

REDUCTIONS = ["mean", "sum", None, "none"]

# (margin1, margin2, margin3): each margin alone and combined.
ARCFACE = (1.0, 0.5, 0.0)
COSFACE = (1.0, 0.0, 0.35)
SPHEREFACE = (1.35, 0.0, 0.0)
COMBINED = (0.9, 0.4, 0.15)
PLAIN = (1.0, 0.0, 0.0)
MARGINS = [ARCFACE, COSFACE, SPHEREFACE, COMBINED, PLAIN]
MARGIN_IDS = ["arcface", "cosface", "sphereface", "combined", "plain"]

DTYPE_IDS = [dt.name for dt in FLOAT_DTYPES]
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def make_inputs(
    seed: int,
    n: int,
    c: int,
    dtype: Any = np.float64,
    label_dtype: Any = np.int64,
    label_col: bool = False,
    bound: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine-like logits in [-bound, bound] and valid labels."""
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-bound, bound, size=(n, c)).astype(dtype)
    label = rng.integers(0, c, size=n).astype(label_dtype)
    if label_col:
        label = label[:, None]
    return logits, label


def loss_shape(n: int, reduction: str | None) -> tuple[int, ...]:
    return (n, 1) if reduction in (None, "none") else ()


def upstream_scale(
    n: int, reduction: str | None, grad_loss: Any = None
) -> float:
    """Largest per-row upstream gradient, for the gradient tolerance."""
    g = 1.0 if grad_loss is None else float(np.max(np.abs(grad_loss)))
    if reduction == "mean":
        return g / max(n, 1)
    return g


def check_output_type(out: Any, dtype: Any, shape: tuple[int, ...]) -> None:
    assert isinstance(out, np.ndarray), f"expected ndarray, got {type(out)}"
    assert out.dtype == np.dtype(dtype), f"dtype {out.dtype} != {dtype}"
    assert out.shape == shape, f"shape {out.shape} != {shape}"


def assert_finite(a: np.ndarray, what: str) -> None:
    a64 = np.asarray(a).astype(np.float64)
    bad = ~np.isfinite(a64)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} non-finite entries, first at "
        f"{np.argwhere(bad)[:8].tolist()}: {a64[bad][:8]}"
    )


def check_forward(
    logits: np.ndarray,
    label: np.ndarray,
    margins: tuple[float, float, float] = ARCFACE,
    scale: float = 64.0,
    reduction: str | None = "mean",
) -> None:
    """Loss and softmax against the reference, types and shapes."""
    m1, m2, m3 = margins
    ref = margin_ce_reference(
        logits, label, m1, m2, m3, scale, reduction=reduction
    )
    loss, softmax = margin_cross_entropy(
        logits,
        label,
        margin1=m1,
        margin2=m2,
        margin3=m3,
        scale=scale,
        group=False,
        return_softmax=True,
        reduction=reduction,
    )
    tol = tolerances(logits.dtype, scale)
    check_output_type(loss, logits.dtype, ref.loss.shape)
    check_output_type(softmax, logits.dtype, logits.shape)
    assert_close(loss, ref.loss, *tol["loss"], what="loss")
    assert_close(softmax, ref.softmax, *tol["softmax"], what="softmax")


def check_gradient(
    logits: np.ndarray,
    label: np.ndarray,
    margins: tuple[float, float, float] = ARCFACE,
    scale: float = 64.0,
    reduction: str | None = "mean",
    grad_loss: Any = None,
) -> None:
    """``margin_cross_entropy_and_grad`` against the analytic reference."""
    m1, m2, m3 = margins
    ref = margin_ce_reference(
        logits, label, m1, m2, m3, scale, reduction, grad_loss
    )
    loss, grad = margin_cross_entropy_and_grad(
        logits,
        label,
        margin1=m1,
        margin2=m2,
        margin3=m3,
        scale=scale,
        group=False,
        reduction=reduction,
        grad_loss=grad_loss,
    )
    g = upstream_scale(logits.shape[0], reduction, grad_loss)
    tol = tolerances(logits.dtype, scale, g)
    check_output_type(loss, logits.dtype, ref.loss.shape)
    check_output_type(grad, logits.dtype, logits.shape)
    assert_close(loss, ref.loss, *tol["loss"], what="loss of _and_grad")
    assert_close(grad, ref.grad, *tol["grad"], what="grad_logits")


# ------------------------------------------------------------ the example

SPEC_LOGITS = np.array(
    [
        [0.85204151, -0.55557678, 0.04994566, 0.71986042],
        [-0.20198586, -0.35270476, -0.55182702, 0.09749021],
    ]
)
SPEC_LABEL = np.array([2, 3])
SPEC_LOSS = np.array([[82.37059615], [12.13448407]])
SPEC_SOFTMAX = np.array(
    [
        [0.99978819, 0.0, 0.0, 0.00021181],
        [0.99992995, 0.00006468, 0.0, 0.00000537],
    ]
)


def test_reference_matches_spec_example() -> None:
    # The reference itself must reproduce the contract's worked example.
    ref = margin_ce_reference(SPEC_LOGITS, SPEC_LABEL, reduction=None)
    assert_close(ref.loss, SPEC_LOSS, 1e-8, 0.0, "reference loss")
    assert_close(ref.softmax, SPEC_SOFTMAX, 0.0, 5e-9, "reference softmax")


def test_spec_worked_example(backend: str) -> None:
    loss, softmax = margin_cross_entropy(
        SPEC_LOGITS,
        SPEC_LABEL,
        group=False,
        return_softmax=True,
        reduction=None,
    )
    check_output_type(loss, np.float64, (2, 1))
    check_output_type(softmax, np.float64, (2, 4))
    assert_close(loss, SPEC_LOSS, 1e-8, 0.0, "loss")
    assert_close(softmax, SPEC_SOFTMAX, 0.0, 5e-9, "softmax")


def test_spec_worked_example_defaults() -> None:
    # Same numbers through the defaults: reduction='mean', no softmax.
    loss = margin_cross_entropy(SPEC_LOGITS, SPEC_LABEL, group=False)
    check_output_type(loss, np.float64, ())
    assert_close(loss, SPEC_LOSS.mean(), 1e-8, 0.0, "mean loss")


# ------------------------------------------------------- random inputs


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_random_inputs(backend: str, dtype: Any, reduction: Any) -> None:
    logits, label = make_inputs(11, 12, 67, dtype)
    check_forward(logits, label, reduction=reduction)
    # Without the softmax the loss is the same.
    loss = margin_cross_entropy(
        logits, label, group=False, reduction=reduction
    )
    with_softmax, _ = margin_cross_entropy(
        logits, label, group=False, reduction=reduction, return_softmax=True
    )
    assert_close(loss, with_softmax, 0.0, 0.0, "loss with/without softmax")


@pytest.mark.parametrize("label_col", [False, True], ids=["N", "N1"])
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_label_forms(backend: str, label_dtype: Any, label_col: bool) -> None:
    logits, label = make_inputs(12, 10, 33, np.float32, label_dtype, label_col)
    for reduction in ("none", "mean"):
        check_forward(logits, label, reduction=reduction)
    check_gradient(logits, label, reduction="sum")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("label_col", [False, True], ids=["23", "231"])
def test_leading_dims(label_col: bool, reduction: str) -> None:
    rng = np.random.default_rng(13)
    logits = rng.uniform(-1, 1, size=(2, 3, 19))
    label = rng.integers(0, 19, size=(2, 3, 1) if label_col else (2, 3))
    ref = margin_ce_reference(logits, label, reduction=reduction)
    loss, softmax = margin_cross_entropy(
        logits, label, group=False, return_softmax=True, reduction=reduction
    )
    # Leading dims are flattened into N: a per-row loss is [N, 1].
    check_output_type(loss, np.float64, loss_shape(6, reduction))
    check_output_type(softmax, np.float64, (2, 3, 19))
    tol = tolerances(np.float64, 64.0, 1.0)
    assert_close(loss, ref.loss, *tol["loss"], what="loss")
    assert_close(softmax, ref.softmax, *tol["softmax"], what="softmax")
    loss2, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction=reduction
    )
    check_output_type(grad, np.float64, (2, 3, 19))
    assert_close(loss2, ref.loss, *tol["loss"], what="loss of _and_grad")
    assert_close(grad, ref.grad, *tol["grad"], what="grad_logits")


# -------------------------------------------------------- awkward shapes


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend: str, reduction: Any) -> None:
    logits = np.zeros((0, 7), dtype=np.float32)
    label = np.zeros(0, dtype=np.int64)
    loss, softmax = margin_cross_entropy(
        logits, label, group=False, return_softmax=True, reduction=reduction
    )
    check_output_type(loss, np.float32, loss_shape(0, reduction))
    check_output_type(softmax, np.float32, (0, 7))
    if reduction == "mean":
        assert np.isnan(loss), f"mean of no rows should be NaN, got {loss}"
    elif reduction == "sum":
        assert loss == 0.0, f"sum of no rows should be 0, got {loss}"
    loss2, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction=reduction
    )
    check_output_type(loss2, np.float32, loss_shape(0, reduction))
    check_output_type(grad, np.float32, (0, 7))
    assert_close(loss2, loss, 0.0, 0.0, "loss of _and_grad")


AWKWARD_C = [1, 7, 255, 257, 1025, 4099]


@pytest.mark.parametrize(
    ("backend", "n", "c"),
    backend_params(
        *[("numpy", n, c) for n in (1, 5) for c in AWKWARD_C],
        ("emulated", 1, 1),
        ("emulated", 3, 7),
        ("emulated", 2, 257),
        ("emulated", 1, 1025),
        ("emulated", 3, 4099),
    ),
    indirect=["backend"],
)
def test_awkward_class_counts(backend: str, n: int, c: int) -> None:
    for k, dtype in enumerate((np.float32, np.float64)):
        logits, label = make_inputs(100 + c + k, n, c, dtype)
        check_forward(logits, label, reduction="none")
        check_gradient(logits, label, reduction="mean")


def test_single_class_is_zero_loss() -> None:
    logits, label = make_inputs(3, 4, 1)
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="none"
    )
    assert_close(loss, np.zeros((4, 1)), 0.0, 0.0, "loss with one class")
    assert_close(grad, np.zeros((4, 1)), 0.0, 0.0, "grad with one class")


# ------------------------------------------------------------- the clamp

EDGE_TARGETS = [1.0, -1.0, "1+", "-1-"]


def edge_inputs(dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Targets at exactly +-1 and one rounding step outside [-1, 1]."""
    one = np.ones((), dtype=dtype)
    one_up = (one.astype(np.float64) + np.finfo(dtype).eps).astype(dtype)
    logits, label = make_inputs(21, 6, 9, dtype, bound=0.95)
    values = [one, -one, one_up, -one_up, one_up, one]
    for i, v in enumerate(values):
        logits[i, label[i]] = v
    # Off-target entries outside [-1, 1] are only scaled, never clamped.
    logits[0, (label[0] + 1) % 9] = one_up
    logits[1, (label[1] + 2) % 9] = -one_up
    return logits, label


@pytest.mark.parametrize("margins", MARGINS, ids=MARGIN_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_clamp_at_unit_cosine(backend: str, dtype: Any, margins: Any) -> None:
    logits, label = edge_inputs(dtype)
    check_forward(logits, label, margins, reduction="none")
    m1, m2, m3 = margins
    ref = margin_ce_reference(logits, label, m1, m2, m3, reduction="none")
    loss, grad = margin_cross_entropy_and_grad(
        logits,
        label,
        margin1=m1,
        margin2=m2,
        margin3=m3,
        group=False,
        reduction="none",
    )
    grad64 = grad.astype(np.float64)
    assert_finite(loss, "loss")
    assert_finite(grad, "grad")
    tol = tolerances(dtype, 64.0, 1.0)
    # Where dtarget/dx is defined the gradient must be the analytic one;
    # at the pole (|x| = 1 with margin2 != 0 or margin1 != 1) any finite
    # value is accepted.
    defined = np.isfinite(ref.grad)
    assert_close(
        np.where(defined, grad64, 0.0),
        np.where(defined, ref.grad, 0.0),
        *tol["grad"],
        what="grad where defined",
    )
    if margins == PLAIN or margins == COSFACE:
        assert defined.all()


# --------------------------------------------------------------- margins


@pytest.mark.parametrize("scale", [1.0, 30.0, 64.0])
@pytest.mark.parametrize("margins", MARGINS, ids=MARGIN_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_margins_and_scales(dtype: Any, margins: Any, scale: float) -> None:
    logits, label = make_inputs(31, 9, 50, dtype, bound=0.999)
    check_forward(logits, label, margins, scale, reduction="none")
    check_gradient(logits, label, margins, scale, reduction="mean")


@pytest.mark.parametrize("margins", [COMBINED], ids=["combined"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_margins_low_precision(backend: str, dtype: Any, margins: Any) -> None:
    logits, label = make_inputs(32, 8, 40, dtype, bound=0.999)
    check_forward(logits, label, margins, 30.0, reduction="none")
    check_gradient(logits, label, margins, 30.0, reduction="sum")


# -------------------------------------------------------------- gradient


def grad_loss_value(kind: str, n: int, reduction: Any) -> Any:
    rng = np.random.default_rng(41)
    if kind == "default":
        return None
    if reduction in ("mean", "sum"):
        return 0.7 if kind == "given" else np.array(-1.3)
    w = rng.uniform(-2.0, 2.0, size=n)
    return w if kind == "given" else w[:, None]


GRAD_KINDS = ["default", "given", "given_array"]


@pytest.mark.parametrize("kind", GRAD_KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_gradient_analytic(dtype: Any, reduction: Any, kind: str) -> None:
    logits, label = make_inputs(51, 11, 29, dtype, bound=0.999)
    grad_loss = grad_loss_value(kind, 11, reduction)
    check_gradient(logits, label, COMBINED, 64.0, reduction, grad_loss)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_gradient_emulated(backend: str, dtype: Any, reduction: Any) -> None:
    logits, label = make_inputs(52, 5, 21, dtype, bound=0.999)
    grad_loss = grad_loss_value("given", 5, reduction)
    check_gradient(logits, label, ARCFACE, 64.0, reduction, grad_loss)


def reduced_loss(
    logits: np.ndarray,
    label: np.ndarray,
    margins: tuple[float, float, float],
    scale: float,
    reduction: Any,
    grad_loss: Any,
) -> float:
    """``sum(grad_loss * loss)``: the function whose gradient is tested."""
    m1, m2, m3 = margins
    loss = margin_cross_entropy(
        logits,
        label,
        margin1=m1,
        margin2=m2,
        margin3=m3,
        scale=scale,
        group=False,
        reduction=reduction,
    )
    g = 1.0 if grad_loss is None else np.asarray(grad_loss, np.float64)
    if reduction in (None, "none"):
        return float(np.sum(np.reshape(g, -1) * loss.reshape(-1)))
    return float(g * loss)


@pytest.mark.parametrize("kind", GRAD_KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margins", MARGINS, ids=MARGIN_IDS)
def test_gradient_finite_differences(
    margins: Any, reduction: Any, kind: str
) -> None:
    scale = 8.0
    logits, label = make_inputs(61, 3, 5, np.float64, bound=0.9)
    grad_loss = grad_loss_value(kind, 3, reduction)
    _, grad = margin_cross_entropy_and_grad(
        logits,
        label,
        margin1=margins[0],
        margin2=margins[1],
        margin3=margins[2],
        scale=scale,
        group=False,
        reduction=reduction,
        grad_loss=grad_loss,
    )
    h = 1e-6
    numeric = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        up = logits.copy()
        down = logits.copy()
        up[idx] += h
        down[idx] -= h
        f_up = reduced_loss(up, label, margins, scale, reduction, grad_loss)
        f_dn = reduced_loss(down, label, margins, scale, reduction, grad_loss)
        numeric[idx] = (f_up - f_dn) / (2 * h)
    assert_close(grad, numeric, 1e-6, 1e-6 * scale, "grad vs central FD")


def test_gradient_finite_differences_large_scale() -> None:
    logits, label = make_inputs(62, 2, 6, np.float64, bound=0.9)
    _, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="sum"
    )
    h = 1e-6
    numeric = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        up = logits.copy()
        down = logits.copy()
        up[idx] += h
        down[idx] -= h
        f_up = reduced_loss(up, label, ARCFACE, 64.0, "sum", None)
        f_dn = reduced_loss(down, label, ARCFACE, 64.0, "sum", None)
        numeric[idx] = (f_up - f_dn) / (2 * h)
    assert_close(grad, numeric, 1e-5, 1e-4, "grad vs central FD")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_and_grad_loss_equals_loss(dtype: Any, reduction: Any) -> None:
    logits, label = make_inputs(71, 7, 45, dtype)
    loss = margin_cross_entropy(
        logits, label, group=False, reduction=reduction
    )
    loss2, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction=reduction
    )
    check_output_type(loss2, dtype, loss_shape(7, reduction))
    check_output_type(grad, dtype, (7, 45))
    assert loss.tobytes() == loss2.tobytes(), (
        f"loss {loss.ravel()} != loss of _and_grad {loss2.ravel()}"
    )


# -------------------------------------------------- float16 statistics


@pytest.mark.parametrize(
    ("backend", "reduction"),
    backend_params(("numpy", "none"), ("numpy", "mean"), ("emulated", "none")),
    indirect=["backend"],
)
def test_float16_many_classes(backend: str, reduction: str) -> None:
    # 70,000 equal exp terms overflow a float16 sum (max 65504).
    n, c = 3, 70_000
    logits = np.ones((n, c), dtype=np.float16)
    label = np.array([0, 12_345, c - 1])
    ref = margin_ce_reference(logits, label, reduction=reduction)
    loss, softmax = margin_cross_entropy(
        logits, label, group=False, return_softmax=True, reduction=reduction
    )
    assert_finite(loss, "loss")
    tol = tolerances(np.float16, 64.0)
    assert_close(loss, ref.loss, *tol["loss"], what="loss")
    assert_close(softmax, ref.softmax, *tol["softmax"], what="softmax")
    loss2, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction=reduction
    )
    assert_close(loss2, ref.loss, *tol["loss"], what="loss of _and_grad")
    assert_finite(grad, "grad")
    # Off-target gradient entries are defined: check them too.
    off = np.ones((n, c), dtype=bool)
    off[np.arange(n), label] = False
    g = 1.0 / n if reduction == "mean" else 1.0
    gtol = tolerances(np.float16, 64.0, g)["grad"]
    assert_close(
        grad.astype(np.float64)[off],
        ref.grad[off],
        *gtol,
        what="off-target grad",
    )


# -------------------------------------------------------- group=None


@pytest.mark.skipif(UNDER_MPI, reason="group=None means the world here")
def test_group_none_single_process() -> None:
    logits, label = make_inputs(81, 4, 10, np.float32)
    loss_none = margin_cross_entropy(logits, label, reduction="none")
    loss_false = margin_cross_entropy(
        logits, label, group=False, reduction="none"
    )
    assert_close(loss_none, loss_false, 0.0, 0.0, "group=None vs False")


@pytest.mark.skipif(UNDER_MPI, reason="group=None means the world here")
def test_group_none_needs_no_mpi() -> None:
    # A fresh interpreter without launcher variables must not load mpi4py.
    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "import arcface_ce\n"
        "x = np.array([[0.5, -0.2, 0.1], [0.3, 0.9, -0.4]])\n"
        "loss = arcface_ce.margin_cross_entropy(\n"
        "    x, np.array([0, 1]), reduction='none')\n"
        "print(json.dumps({'loss': loss.ravel().tolist(),\n"
        "                  'mpi': 'mpi4py' in sys.modules}))\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mpi"] is False, "group=None imported mpi4py"
    ref = margin_ce_reference(
        np.array([[0.5, -0.2, 0.1], [0.3, 0.9, -0.4]]),
        np.array([0, 1]),
        reduction="none",
    )
    tol = tolerances(np.float64, 64.0)["loss"]
    assert_close(np.array(out["loss"]), ref.rows, *tol, "loss")


def test_label_error_is_exported() -> None:
    assert issubclass(arcface_ce.LabelError, IndexError)
    assert issubclass(arcface_ce.LabelError, ValueError)


# ------------------------------------------------------------------ CuPy


def _cupy_or_skip() -> Any:
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("cupy finds no GPU")
    except Exception as exc:  # CUDARuntimeError without a driver
        pytest.skip(f"cupy finds no GPU: {exc}")
    return cupy


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_cupy_in_cupy_out(dtype: Any, reduction: str) -> None:
    cupy = _cupy_or_skip()
    logits, label = make_inputs(91, 16, 1031, dtype, bound=0.999)
    ref = margin_ce_reference(logits, label, reduction=reduction)
    d_logits = cupy.asarray(logits)
    d_label = cupy.asarray(label)
    loss, softmax = margin_cross_entropy(
        d_logits,
        d_label,
        group=False,
        return_softmax=True,
        reduction=reduction,
    )
    loss2, grad = margin_cross_entropy_and_grad(
        d_logits, d_label, group=False, reduction=reduction
    )
    for name, out, shape in (
        ("loss", loss, ref.loss.shape),
        ("softmax", softmax, logits.shape),
        ("grad", grad, logits.shape),
    ):
        assert isinstance(out, cupy.ndarray), f"{name}: {type(out)}"
        assert out.dtype == logits.dtype, f"{name}: {out.dtype}"
        assert out.shape == shape, f"{name}: {out.shape}"
    g = upstream_scale(16, reduction)
    tol = tolerances(dtype, 64.0, g)
    assert_close(loss, ref.loss, *tol["loss"], what="loss")
    assert_close(loss2, ref.loss, *tol["loss"], what="loss of _and_grad")
    assert_close(softmax, ref.softmax, *tol["softmax"], what="softmax")
    assert_close(grad, ref.grad, *tol["grad"], what="grad_logits")
