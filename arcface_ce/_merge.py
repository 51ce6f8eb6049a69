"""Merging per-rank row statistics into the loss and the write factors.

This is the arithmetic half of the distributed protocol; the transport half
is in :mod:`arcface_ce._comm`. It is written against an array module ``xp``
(NumPy or CuPy) and uses no communication, so it is unit-tested without MPI.

Protocol
--------
1. Every rank r reduces its own columns of row i to four numbers
   (``STATS_WIDTH``): a shift ``m_r``, the sum of exponentials of its
   non-target scaled logits relative to that shift ``s_r``, the
   margin-adjusted scaled target logit ``z_t`` if it owns the target
   column (else 0) and an ownership flag ``o_r``.
2. One all-gather gives every rank the ``[R, N, 4]`` stack.
3. Every rank evaluates the same expressions below on the same stack, in
   rank order, so every rank gets identical bits:

   - ``owners = sum_r o_r`` (must be exactly 1; 0 means a bad label),
   - ``z_t = sum_r o_r * target_r``,
   - ``M = max(max_r m_r, z_t)``, the global shift (>= every logit),
   - ``S_other = sum_r s_r * exp(m_r - M)``,
   - ``S = S_other + exp(z_t - M)``, the softmax denominator.

The loss ``log S + M - z_t`` is evaluated as ``softplus(log S_other + M -
z_t)``: the same number, but exact for a confident row whose loss is far
below float32 resolution of ``log S``. For the same reason the target's
gradient uses ``1 - p_t = S_other / S`` instead of subtracting from 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

STATS_WIDTH = 4
SHIFT, SUMEXP, TARGET, OWNED = range(STATS_WIDTH)


@dataclass
class MergedStats:
    """Per-row results of the merge, float64 arrays of shape ``[N]``."""

    shift: Any  # M_i, global shift
    denom: Any  # S_i, softmax denominator relative to M_i
    other: Any  # S_other_i, non-target part of S_i
    target: Any  # z_t, margin-adjusted scaled target logit
    owners: Any  # number of ranks that own the target of row i
    loss: Any  # per-row loss, float64


def _softplus(xp: Any, d: Any) -> Any:
    # log(1 + e^d) without overflow for large d or cancellation for small.
    pos = xp.maximum(d, 0.0)
    return pos + xp.log1p(xp.exp(-xp.abs(d)))


def merge_row_stats(stats: Any, xp: Any = np) -> MergedStats:
    """Combine the gathered per-rank statistics of every row.

    Parameters
    ----------
    stats : (R, N, 4) float64 array
        Row statistics of each of the ``R`` ranks, in rank order.
    xp : module
        Array module of ``stats`` (NumPy or CuPy).

    Returns
    -------
    MergedStats
        Global shift, denominators, target logits, owner counts and the
        per-row loss.
    """
    shift = stats[:, :, SHIFT]
    sumexp = stats[:, :, SUMEXP]
    owned = stats[:, :, OWNED]
    owners = owned.sum(axis=0)
    target = (stats[:, :, TARGET] * owned).sum(axis=0)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        big = xp.maximum(shift.max(axis=0), target)
        # A rank without non-target columns reports (-inf, 0): its term is
        # 0, not 0 * exp(-inf + inf). A NaN sum (NaN logits) stays NaN.
        terms = xp.where(sumexp == 0, 0.0, sumexp * xp.exp(shift - big))
        other = terms.sum(axis=0)
        denom = other + xp.exp(target - big)
        loss = _softplus(xp, xp.log(other) + big - target)
    return MergedStats(big, denom, other, target, owners, loss)


def write_factors(
    merged: MergedStats, scale: float, grad_rows: Any | None, xp: Any = np
) -> tuple[Any, Any]:
    """Per-row factors ``(row_a, row_t)`` of the write pass.

    Parameters
    ----------
    merged : MergedStats
        Result of :func:`merge_row_stats`.
    scale : float
        The logit scale ``s``.
    grad_rows : (N,) float64 array or None
        Upstream gradient per row; ``None`` asks for the softmax.
    xp : module
        Array module.

    Returns
    -------
    row_a, row_t : (N,) float64 arrays
        Off-target outputs are ``row_a * exp(z - M)``; the target output is
        ``row_t`` (times ``dtarget/dx`` for the gradient).
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        inv = 1.0 / merged.denom
        p_target = xp.exp(merged.target - merged.shift) * inv
        if grad_rows is None:
            return inv, p_target
        gs = grad_rows * scale
        # dL/dz_t = p_t - 1 = -S_other / S, free of cancellation.
        return gs * inv, -gs * (merged.other * inv)
