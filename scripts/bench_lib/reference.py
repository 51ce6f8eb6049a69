"""Float64 reference of the margin softmax cross entropy, and the gate.

Every implementation is run on a small input first and compared with
:func:`reference_loss_and_grad`; one that disagrees is not timed.  The
reference follows the formulas of the loss contract directly, one row at a
time conceptually, with no attempt at speed:

    theta_i = arccos(clip(x[i, y_i], -1, 1))
    z_ij    = scale * x_ij                                  (j != y_i)
    z_iy    = scale * (cos(margin1 * theta_i + margin2) - margin3)
    loss_i  = logsumexp_j(z_ij) - z_iy
    dL/dx_ij = g_i * scale * p_ij                           (j != y_i)
    dL/dx_iy = g_i * scale * (p_iy - 1) * dtarget/dx
    dtarget/dx = margin1 * sin(margin1 * theta_i + margin2) / sin(theta_i)

with p the softmax of z and g_i = 1 / N for the mean reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Largest accepted error per logits dtype, for the loss (relative to
# max(|loss|, 1)) and for the gradient (max abs error relative to the
# largest reference entry).  About four units of the output rounding.
TOLERANCE = {
    "float64": 1e-9,
    "float32": 1e-4,
    "float16": 2e-3,
    "bfloat16": 1.6e-2,
}

# Margin settings checked before timing: ArcFace defaults, and a
# combined SphereFace/ArcFace/CosFace setting whose target derivative is
# not 1 in both factors.
CHECK_MARGINS = (
    (1.0, 0.5, 0.0, 64.0),
    (1.2, 0.3, 0.1, 32.0),
)


def check_settings(extra: Sequence[Margins] = ()) -> list[Margins]:
    """:data:`CHECK_MARGINS` and the run's own settings, without repeats."""
    out = [Margins(*t) for t in CHECK_MARGINS]
    for m in extra:
        if m not in out:
            out.append(m)
    return out


@dataclass(frozen=True)
class Margins:
    """Margin parameters of one call (names as in the public API)."""

    margin1: float = 1.0
    margin2: float = 0.5
    margin3: float = 0.0
    scale: float = 64.0

    def tag(self) -> str:
        """Short text of the setting, e.g. ``m=(1.0,0.5,0.0) s=64.0``."""
        return (
            f"m=({self.margin1},{self.margin2},{self.margin3}) s={self.scale}"
        )

    def as_kwargs(self) -> dict[str, float]:
        """Return the parameters as keyword arguments of the API."""
        return {
            "margin1": self.margin1,
            "margin2": self.margin2,
            "margin3": self.margin3,
            "scale": self.scale,
        }


def dtype_from_name(name: str) -> np.dtype:
    """Return the NumPy dtype named ``name`` (bfloat16 from ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in ("float16", "float32", "float64"):
        raise ValueError(
            f"dtype must be float16, bfloat16, float32 or float64, "
            f"got {name!r}"
        )
    return np.dtype(name)


def reference_loss_and_grad(
    logits: np.ndarray, label: np.ndarray, m: Margins
) -> tuple[float, np.ndarray]:
    """Mean loss and its gradient in float64, straight from the formulas.

    Parameters
    ----------
    logits : ndarray, shape (N, C), any float dtype
        Cosines of all classes (converted to float64 first).
    label : ndarray of int, shape (N,)
        Target class of each row.
    m : Margins
        Margin parameters.

    Returns
    -------
    loss : float
        Mean over rows of the per-row loss.
    grad : ndarray of float64, shape (N, C)
        Gradient of the mean loss with respect to ``logits``.
    """
    x = np.asarray(logits, dtype=np.float64)
    n = x.shape[0]
    rows = np.arange(n)
    cos_t = np.clip(x[rows, label], -1.0, 1.0)
    theta = np.arccos(cos_t)
    z = m.scale * x
    z[rows, label] = m.scale * (
        np.cos(m.margin1 * theta + m.margin2) - m.margin3
    )
    zmax = z.max(axis=1)
    e = np.exp(z - zmax[:, None])
    total = e.sum(axis=1)
    p = e / total[:, None]
    loss_rows = np.log(total) + zmax - z[rows, label]
    if m.margin1 == 1.0 and m.margin2 == 0.0:
        dtarget = np.ones(n)
    else:
        dtarget = (
            m.margin1 * np.sin(m.margin1 * theta + m.margin2) / np.sin(theta)
        )
    g = 1.0 / n
    grad = g * m.scale * p
    grad[rows, label] = g * m.scale * (p[rows, label] - 1.0) * dtarget
    return float(loss_rows.mean()), grad


def make_check_input(
    n: int, c: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Small float64 cosines in [-0.95, 0.95] and int64 labels.

    The cosines stay away from +-1, where the target derivative is
    infinite and each implementation is free to clamp differently.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.95, 0.95, size=(n, c))
    label = rng.integers(0, c, size=n, dtype=np.int64)
    return x, label


@dataclass
class CheckResult:
    """Outcome of comparing one implementation with the reference."""

    ok: bool
    detail: str


def compare(
    loss: float,
    grad: np.ndarray | None,
    ref_loss: float,
    ref_grad: np.ndarray,
    dtype_name: str,
) -> CheckResult:
    """Compare a loss (and optionally a gradient) with the reference.

    The gradient error is ``max|grad - ref| / max|ref|``; on failure the
    detail names the worst (row, column) and both values.
    """
    tol = TOLERANCE[dtype_name]
    loss_err = abs(float(loss) - ref_loss) / max(abs(ref_loss), 1.0)
    parts = [f"loss_err={loss_err:.2e}"]
    ok = bool(np.isfinite(loss_err) and loss_err <= tol)
    if not ok:
        parts.append(f"(loss {float(loss)!r} vs reference {ref_loss!r})")
    if grad is not None:
        g = np.asarray(grad, dtype=np.float64)
        if g.shape != ref_grad.shape:
            return CheckResult(
                False,
                f"gradient shape {g.shape}, expected {ref_grad.shape}",
            )
        diff = np.abs(g - ref_grad)
        diff[~np.isfinite(diff)] = np.inf
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
        grad_err = float(diff[worst]) / float(np.abs(ref_grad).max())
        parts.append(f"grad_err={grad_err:.2e}")
        if not grad_err <= tol:
            ok = False
            parts.append(
                f"(worst at {tuple(int(i) for i in worst)}: "
                f"{g[worst]!r} vs reference {ref_grad[worst]!r})"
            )
    parts.append(f"tol={tol:.1e}")
    return CheckResult(ok, " ".join(parts))


def check_implementation(
    forward: Callable[[np.ndarray, np.ndarray, Margins], float] | None,
    forward_grad: (
        Callable[[np.ndarray, np.ndarray, Margins], tuple[float, np.ndarray]]
        | None
    ),
    dtype_name: str,
    n: int = 7,
    c: int = 37,
    seed: int = 12345,
    extra: Sequence[Margins] = (),
) -> CheckResult:
    """Run an implementation on small inputs and compare with float64.

    Parameters
    ----------
    forward, forward_grad : callable or None
        ``forward(logits, label, margins) -> loss`` and
        ``forward_grad(logits, label, margins) -> (loss, grad)`` taking
        NumPy inputs of the checked dtype and returning NumPy results.
        Either may be None (not provided by the implementation).
    dtype_name : str
        Logits dtype to check.
    n, c, seed : int
        Shape and seed of the small input (odd sizes on purpose).

    Returns
    -------
    CheckResult
        ``ok`` is False as soon as one setting fails or raises.
    """
    dtype = dtype_from_name(dtype_name)
    x64, label = make_check_input(n, c, seed)
    x = x64.astype(dtype)
    worst: dict[str, float | None] = {"loss_err": 0.0, "grad_err": None}
    for m in check_settings(extra):
        ref_loss, ref_grad = reference_loss_and_grad(x, label, m)
        tag = m.tag()
        for name, fn in (("fwd", forward), ("fwd+grad", forward_grad)):
            if fn is None:
                continue
            try:
                out: Any = fn(x.copy(), label.copy(), m)
            except Exception as exc:  # any failure refuses the timing
                return CheckResult(
                    False, f"{tag} {name} raised {type(exc).__name__}: {exc}"
                )
            if name == "fwd":
                res = compare(float(out), None, ref_loss, ref_grad, dtype_name)
            else:
                loss, grad = out
                res = compare(
                    float(loss), grad, ref_loss, ref_grad, dtype_name
                )
            if not res.ok:
                return CheckResult(False, f"{tag} {name}: {res.detail}")
            for key, val in _errors(res.detail).items():
                worst[key] = max(worst[key] or 0.0, val)
    if forward is None and forward_grad is None:
        return CheckResult(False, "nothing to check")
    text = " ".join(f"{k}={v:.2e}" for k, v in worst.items() if v is not None)
    return CheckResult(True, f"worst {text} tol={TOLERANCE[dtype_name]:.1e}")


def _errors(detail: str) -> dict[str, float]:
    """The ``loss_err=`` / ``grad_err=`` values of a compare() detail."""
    out = {}
    for tok in detail.split():
        key, _, val = tok.partition("=")
        if key in ("loss_err", "grad_err"):
            out[key] = float(val)
    return out
