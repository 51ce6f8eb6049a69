"""Dense float64 reference of the margin softmax cross-entropy.

Written from the contract only; it never imports the package under test.
Every quantity is computed in float64 from the (possibly low-precision)
logits exactly as the caller handed them in, so a comparison measures the
error of the implementation alone, not the rounding of its inputs.

For row ``i`` with target ``y`` and ``theta = arccos(clip(x_iy, -1, 1))``:

    z_ij = scale * x_ij                                 (j != y)
    z_iy = scale * (cos(margin1 * theta + margin2) - margin3)
    loss_i = logsumexp_j(z_ij) - z_iy
    p_ij = exp(z_ij - logsumexp_j(z_ij))

and the gradient of ``sum_i g_i * loss_i`` with respect to ``x``:

    off-target: g_i * scale * p_ij
    target:     g_i * scale * (p_iy - 1) * margin1 * sin(margin1 * theta
                + margin2) / sin(theta)

where the last factor is exactly 1 when ``margin1 == 1`` and
``margin2 == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Reference:
    """Reference results, all float64.

    Attributes
    ----------
    loss : ndarray
        Reduced loss: 0-d for ``'mean'``/``'sum'``, ``[N, 1]`` otherwise.
    rows : (N,) ndarray
        Per-row loss before the reduction.
    softmax : ndarray
        Softmax of the margin-adjusted, scaled logits, shape of ``logits``.
    grad : ndarray
        Gradient of the reduced loss times ``grad_loss`` with respect to
        ``logits``, shape of ``logits``. Entries where the target's
        derivative is undefined (``|x| == 1`` with a margin that makes
        ``dtarget/dx`` diverge) are NaN.
    """

    loss: np.ndarray
    rows: np.ndarray
    softmax: np.ndarray
    grad: np.ndarray


def flatten_inputs(
    logits: np.ndarray, label: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return logits as ``[N, C]`` float64 and label as ``[N]`` int64."""
    x = np.asarray(logits).astype(np.float64)
    n_classes = x.shape[-1]
    x = x.reshape(-1, n_classes)
    lab = np.asarray(label).astype(np.int64).reshape(-1)
    if lab.shape[0] != x.shape[0]:
        raise ValueError("reference: label and logits rows differ")
    return x, lab


def target_derivative(
    x_target: np.ndarray, margin1: float, margin2: float
) -> np.ndarray:
    """d/dx of ``cos(margin1 * arccos(x) + margin2)``, float64.

    NaN where it is undefined (``sin(theta) == 0`` with a margin that
    does not cancel the pole).
    """
    xc = np.clip(x_target, -1.0, 1.0)
    if margin1 == 1.0 and margin2 == 0.0:
        return np.ones_like(xc)
    theta = np.arccos(xc)
    sin_theta = np.sqrt(1.0 - xc * xc)
    numer = margin1 * np.sin(margin1 * theta + margin2)
    out = np.full_like(xc, np.nan)
    ok = sin_theta > 0.0
    out[ok] = numer[ok] / sin_theta[ok]
    return out


def margin_ce_reference(
    logits: np.ndarray,
    label: np.ndarray,
    margin1: float = 1.0,
    margin2: float = 0.5,
    margin3: float = 0.0,
    scale: float = 64.0,
    reduction: str | None = "mean",
    grad_loss: float | np.ndarray | None = None,
) -> Reference:
    """Compute loss, softmax and gradient densely in float64.

    Parameters
    ----------
    logits : (..., C) array
        Cosine logits of every class (all ranks concatenated).
    label : (...) or (..., 1) integer array
        Global class ids, assumed valid.
    margin1, margin2, margin3, scale : float
        Margin parameters as in the contract.
    reduction : {'mean', 'sum', 'none', None}
        How the per-row losses are reduced.
    grad_loss : float or (N,) or (N, 1) array, optional
        Upstream gradient of the reduced loss; 1 by default.

    Returns
    -------
    Reference
        Loss, per-row loss, softmax and gradient in float64.
    """
    x, lab = flatten_inputs(logits, label)
    n_rows = x.shape[0]
    rows = np.arange(n_rows)

    # 1. Margin on the target: clamp before arccos.
    x_t = x[rows, lab]
    theta = np.arccos(np.clip(x_t, -1.0, 1.0))
    target = np.cos(margin1 * theta + margin2) - margin3
    z = scale * x
    z[rows, lab] = scale * target

    # 2. loss_i = softplus(d_i), d_i = logsumexp over non-targets of
    #    (z_ij - z_iy); exact even when loss_i is far below 1e-16.
    diff = z - z[rows, lab][:, None]
    diff[rows, lab] = -np.inf
    if x.shape[1] > 1 and n_rows > 0:
        shift = diff.max(axis=1)
        d = shift + np.log(np.exp(diff - shift[:, None]).sum(axis=1))
    else:
        d = np.full(n_rows, -np.inf)
    per_row = np.maximum(d, 0.0) + np.log1p(np.exp(-np.abs(d)))

    # 3. Softmax: p_ij = exp(z_ij - z_iy - loss_i).
    z_t = z[rows, lab]
    softmax = np.exp(z - (z_t + per_row)[:, None])

    # 4. Reduction and upstream gradient per row.
    if reduction == "mean":
        loss = np.array(per_row.sum() / n_rows if n_rows else np.nan)
        g_scalar = 1.0 if grad_loss is None else float(grad_loss)
        g = np.full(n_rows, g_scalar / n_rows if n_rows else 0.0)
    elif reduction == "sum":
        loss = np.array(per_row.sum())
        g_scalar = 1.0 if grad_loss is None else float(grad_loss)
        g = np.full(n_rows, g_scalar)
    elif reduction in (None, "none"):
        loss = per_row[:, None].copy()
        if grad_loss is None:
            g = np.ones(n_rows)
        else:
            g = np.asarray(grad_loss, dtype=np.float64).reshape(-1)
    else:
        raise ValueError(f"reference: unknown reduction {reduction!r}")

    # 5. Gradient; 1 - p_iy = -expm1(-loss_i) avoids the cancellation.
    grad = g[:, None] * scale * softmax
    one_minus_p = -np.expm1(-per_row)
    dtdx = target_derivative(x_t, margin1, margin2)
    with np.errstate(invalid="ignore"):
        grad_t = -g * scale * one_minus_p * dtdx
    # A row whose loss is exactly 0 (a single class) has no gradient.
    grad_t[one_minus_p == 0.0] = 0.0
    grad[rows, lab] = grad_t

    shape = np.shape(logits)
    return Reference(
        loss=loss,
        rows=per_row,
        softmax=softmax.reshape(shape),
        grad=grad.reshape(shape),
    )
