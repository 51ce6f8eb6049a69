"""Public entry points: validation, backend choice, the three-step driver.

Whatever the backend, a call is

1. ``row_stats``: one pass over this rank's logits, four numbers per row
   (see :mod:`arcface_ce._merge`);
2. one collective that gathers those statistics from every rank (skipped
   without a communicator), merged identically on every rank;
3. ``write``: when a softmax or a gradient is asked for, one pass that
   writes it, with no further communication.

Backends (``xp`` is the array module of their arrays):

- :class:`arcface_ce._numpy_backend.NumpyBackend` for NumPy arrays;
- :class:`arcface_ce._gpu_backend.GpuBackend` for CuPy arrays (CUDA
  kernels), or for NumPy arrays when ``ARCFACE_CE_EMULATE=1``: the same
  kernel sources then run on the CPU through the emulation layer.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np

from . import _comm
from ._comm import LabelError
from ._merge import MergedStats, merge_row_stats, write_factors
from ._numpy_backend import NumpyBackend

_REDUCTIONS = ("mean", "sum", "none", None)
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_NUMPY_BACKEND = NumpyBackend()
_GPU_BACKENDS: dict[bool, Any] = {}


def _array_module(a: Any) -> Any:
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _bounds(a: Any) -> tuple[int, int]:
    """Byte range ``[start, end)`` of a C-contiguous NumPy or CuPy array."""
    if isinstance(a, np.ndarray):  # (a.data fails for ml_dtypes arrays)
        ptr = int(a.__array_interface__["data"][0])
    else:
        ptr = int(a.data.ptr)
    return ptr, ptr + a.nbytes


def _backend(xp: Any) -> Any:
    emulate = xp is np
    if emulate and os.environ.get("ARCFACE_CE_EMULATE", "0") in ("", "0"):
        return _NUMPY_BACKEND
    if emulate not in _GPU_BACKENDS:
        from ._gpu_backend import GpuBackend

        _GPU_BACKENDS[emulate] = GpuBackend(xp, emulate=emulate)
    return _GPU_BACKENDS[emulate]


def _real(name: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name}: expected a real number, got {type(value).__name__}"
        )
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        want = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return value


class _Call:
    """Validated, flattened arguments of one call (``[N, C]`` logits)."""

    def __init__(
        self,
        logits: Any,
        label: Any,
        margins: tuple[Any, Any, Any],
        scale: Any,
        reduction: Any,
    ) -> None:
        xp = _array_module(logits)
        if xp is np and not isinstance(logits, np.ndarray):
            logits = np.asarray(logits)
        if logits.ndim < 2:
            raise ValueError(
                "logits: expected at least 2 dims [N, C], got shape "
                f"{tuple(logits.shape)}"
            )
        if logits.dtype.name not in _FLOAT_NAMES:
            raise TypeError(
                "logits: expected dtype float16, bfloat16, float32 or "
                f"float64, got {logits.dtype.name}"
            )
        if _array_module(label) is not xp:
            label = xp.asarray(label.get() if xp is np else label)
        elif xp is np and not isinstance(label, np.ndarray):
            label = np.asarray(label)
        kind = label.dtype.kind
        if kind not in "iu" or label.dtype == np.bool_:
            raise TypeError(
                "label: expected an integer dtype (int32 and int64 are used "
                f"as they are, others converted), got {label.dtype.name}"
            )
        if label.dtype == np.uint64 and label.size:
            big = int(label.max())
            if big > np.iinfo(np.int64).max:
                row = int(xp.argmax(label.reshape(-1) == big))
                raise LabelError(
                    "label: expected class ids in [0, total_classes) (below "
                    "2**63 in any case), got "
                    f"{big} at row {row}"
                )
        lead = tuple(logits.shape[:-1])
        if tuple(label.shape) not in (lead, lead + (1,)):
            raise ValueError(
                f"label: expected shape {lead} or {lead + (1,)} to match "
                f"logits of shape {tuple(logits.shape)}, got "
                f"{tuple(label.shape)}"
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(
                "reduction: expected 'mean', 'sum', 'none' or None, got "
                f"{reduction!r}"
            )
        self.m1 = _real("margin1", margins[0])
        self.m2 = _real("margin2", margins[1])
        self.m3 = _real("margin3", margins[2])
        self.scale = _real("scale", scale, positive=True)
        self.xp = xp
        self.shape = tuple(logits.shape)
        self.n = math.prod(lead)
        self.c = logits.shape[-1]
        if not logits.dtype.isnative:  # e.g. '>f4' read from a file
            logits = logits.astype(logits.dtype.newbyteorder("="))
        self.logits = xp.ascontiguousarray(logits.reshape(self.n, self.c))
        if not getattr(self.logits.flags, "aligned", True):  # frombuffer+1
            self.logits = self.logits.copy()
        label = label.reshape(self.n)
        if label.dtype not in (np.int32, np.int64):
            label = label.astype(np.int64)
        self.label = xp.ascontiguousarray(label)
        self.reduction = "none" if reduction is None else reduction

    def output(self, out: Any) -> Any:
        """``out`` as a ``[N, C]`` view, or a fresh array."""
        if out is None:
            return self.xp.empty_like(self.logits)
        if not hasattr(out, "dtype") or _array_module(out) is not self.xp:
            raise TypeError(
                f"out: expected a {self.xp.__name__} array like logits, got "
                f"{type(out).__module__}.{type(out).__name__}"
            )
        if out.dtype != self.logits.dtype:
            raise TypeError(
                f"out: expected dtype {self.logits.dtype.str} (native byte "
                f"order), got {out.dtype.str}"
            )
        if not getattr(out.flags, "aligned", True):
            raise ValueError(
                "out: expected an array aligned to its element size, got a "
                "misaligned one"
            )
        if not getattr(out.flags, "writeable", True):
            raise ValueError(
                "out: expected a writeable array, got a read-only one"
            )
        if tuple(out.shape) != self.shape or not out.flags.c_contiguous:
            raise ValueError(
                f"out: expected a C-contiguous array of shape {self.shape}, "
                f"got shape {tuple(out.shape)}"
                + ("" if out.flags.c_contiguous else " (not contiguous)")
            )
        out = out.reshape(self.n, self.c)
        a0, a1 = _bounds(out)
        b0, b1 = _bounds(self.logits)
        if a0 < b1 and b0 < a1 and (a0, a1) != (b0, b1):
            raise ValueError(
                "out: expected logits itself (in place) or an array that "
                "does not overlap it, got one that partly overlaps logits"
            )
        return out

    def upstream(self, grad_loss: Any) -> Any:
        """Per-row upstream gradient ``g_i``, float64 ``[N]``."""
        xp, n = self.xp, self.n
        if grad_loss is None:
            g = xp.ones(n, dtype=np.float64)
            if self.reduction == "mean" and n:
                g = g / n
            return g
        dtype = getattr(grad_loss, "dtype", None)
        if dtype is None:
            dtype = np.asarray(grad_loss).dtype
        if dtype.kind not in "iuf" or isinstance(grad_loss, bool):
            raise TypeError(
                "grad_loss: expected a real number or array, got "
                f"{type(grad_loss).__name__} ({dtype.name})"
            )
        if self.reduction == "none" and np.ndim(grad_loss) > 0:
            g = xp.asarray(grad_loss, dtype=np.float64)
            if tuple(g.shape) not in ((n,), (n, 1)):
                raise ValueError(
                    f"grad_loss: expected shape ({n},) or ({n}, 1) for "
                    f"reduction='none', got {tuple(g.shape)}"
                )
            g = g.reshape(n)
        elif np.ndim(grad_loss) == 0:
            g = xp.full(n, float(grad_loss), dtype=np.float64)
        else:
            raise ValueError(
                "grad_loss: expected a scalar for reduction="
                f"{self.reduction!r}, got shape {np.shape(grad_loss)}"
            )
        if self.reduction == "mean" and n:
            g = g / n
        return g


def _forward(
    call: _Call | None,
    error: Exception | None,
    group: Any,
    out: Any,
    grad_rows: Any = None,
) -> tuple[_Call, MergedStats, Any, int]:
    """Steps 1-2: statistics, one collective, merge.

    Returns ``(call, merged, backend_state, class_start)``; raises on every
    rank if any rank found an error.
    """
    comm, group_error = _comm.resolve_group_agreed(group)
    if group_error is not None and error is None:
        call, error = None, group_error
    if comm is None:
        if call is None:
            raise error if error is not None else RuntimeError("no call")
        stats, state = _local_stats(call, out, grad_rows)
        gathered, start, total, sxp = stats[None], 0, call.c, call.xp
    else:
        states: dict[int, Any] = {}

        def compute(class_start: int, total: int) -> Any:
            if call is None:  # pragma: no cover - error is set instead
                raise RuntimeError("no call")
            _check_label_range(call, total)
            stats, states[class_start] = _backend(call.xp).row_stats(
                call.logits,
                call.label,
                class_start,
                call.m1,
                call.m2,
                call.m3,
                call.scale,
                out,
            )
            return stats

        if call is None:
            shape, checksum, params, xp = (0, 0), 0, 0, np
        else:
            shape, xp = (call.n, call.c), call.xp
            checksum = _comm.label_checksum(call.label, xp)
            params = _comm.arguments_hash(
                call.logits.dtype.name,
                call.m1,
                call.m2,
                call.m3,
                call.scale,
                call.reduction,
            )
        gathered, start, total = _comm.exchange(
            comm, *shape, checksum, params, error, compute, xp
        )
        if call is None:  # pragma: no cover - exchange raised
            raise RuntimeError("exchange returned after a local error")
        state = states[start]
        sxp = _array_module(gathered)
    merged = merge_row_stats(gathered, sxp)
    _check_owners(call, merged, total, sxp)
    if sxp is not call.xp:
        merged = MergedStats(
            *(call.xp.asarray(v) for v in vars(merged).values())
        )
    return call, merged, state, start


def _local_stats(call: _Call, out: Any, grad_rows: Any) -> tuple[Any, Any]:
    """Row statistics of a single process (no communicator)."""
    backend = _backend(call.xp)
    if backend is not _NUMPY_BACKEND or out is None:
        return backend.row_stats(
            call.logits,
            call.label,
            0,
            call.m1,
            call.m2,
            call.m3,
            call.scale,
            out,
        )

    # Single process: each row block is final once its own statistics
    # exist, so the NumPy backend finishes it while it is in cache.
    def finish(r0: int, r1: int, block_stats: Any) -> Any:
        merged = merge_row_stats(block_stats[None], np)
        g = None if grad_rows is None else grad_rows[r0:r1]
        row_a, row_t = write_factors(merged, call.scale, g, np)
        return merged.shift, row_a, row_t

    return backend.row_stats(
        call.logits,
        call.label,
        0,
        call.m1,
        call.m2,
        call.m3,
        call.scale,
        out,
        finish=finish,
    )


def _write_pass(
    call: _Call,
    merged: MergedStats,
    state: Any,
    start: int,
    out: Any,
    grad_rows: Any,
) -> None:
    """Step 3: the softmax (``grad_rows`` None) or the gradient into out."""
    if not call.n:
        return
    row_a, row_t = write_factors(merged, call.scale, grad_rows, call.xp)
    _backend(call.xp).write(
        out,
        call.logits,
        call.label,
        start,
        merged.shift,
        row_a,
        row_t,
        grad_rows is not None,
        call.m1,
        call.m2,
        call.m3,
        call.scale,
        state,
    )


def _check_label_range(call: _Call, total: int) -> None:
    """Local range check, so the failing rank's own value is reported."""
    if call.n == 0:
        return
    lo, hi = int(call.label.min()), int(call.label.max())
    if lo < 0 or hi >= total:
        value = lo if lo < 0 else hi
        row = int(call.xp.argmax(call.label == value))
        raise LabelError(
            f"label: expected class ids in [0, {total}), got {value} at "
            f"row {row}"
        )


def _check_owners(call: _Call, merged: Any, total: int, xp: Any) -> None:
    """Raise LabelError where no rank owns a row's target (all ranks)."""
    bad = merged.owners != 1
    if not bool(bad.any()):
        return
    row = int(xp.argmax(bad))
    value = int(call.label[row])
    if 0 <= value < total:  # only if labels differ between ranks
        raise ValueError(
            f"label: row {row} (value {value}) is owned by "
            f"{int(merged.owners[row])} ranks; labels must be identical on "
            "every rank"
        )
    raise LabelError(
        f"label: expected class ids in [0, {total}), got {value} at row {row}"
    )


def _reduce(call: _Call, loss_rows: Any) -> Any:
    xp, dtype = call.xp, call.logits.dtype
    # A loss beyond float16's range becomes inf, without a warning.
    with np.errstate(over="ignore"):
        if call.reduction == "none":
            return loss_rows.reshape(call.n, 1).astype(dtype)
        total = loss_rows.sum()
        if call.reduction == "mean":
            total = total / call.n if call.n else xp.asarray(np.nan)
        return xp.asarray(total).astype(dtype)


def _prepare(logits, label, margins, scale, reduction, group):
    """Validate locally; under MPI an error is only raised collectively.

    Any exception counts (not only the TypeError/ValueError of the checks):
    under MPI a rank that raised on its own would leave the others waiting
    in the collective.
    """
    try:
        return _Call(logits, label, margins, scale, reduction), None
    except Exception as exc:
        if _comm.resolve_group_agreed(group)[0] is None:
            raise
        return None, exc


def _guarded(call, error, group, check):
    """Run ``check()`` on a valid call; under MPI, keep its error."""
    if call is None:
        return None, error, None
    try:
        return call, None, check()
    except Exception as exc:
        if _comm.resolve_group_agreed(group)[0] is None:
            raise
        return None, exc, None


def margin_cross_entropy(
    logits: Any,
    label: Any,
    margin1: float = 1.0,
    margin2: float = 0.5,
    margin3: float = 0.0,
    scale: float = 64.0,
    group: Any = None,
    return_softmax: bool = False,
    reduction: str | None = "mean",
) -> Any:
    """Margin softmax cross-entropy (ArcFace, CosFace, SphereFace).

    Parameters
    ----------
    logits : (..., C) float16, bfloat16, float32 or float64 array
        Cosine similarities of normalised features and this rank's class
        weights. Leading dimensions are flattened into ``N`` rows. NumPy or
        CuPy; the result is of the same kind.
    label : (...,) or (..., 1) int32 or int64 array
        Global class id of every row, identical on every rank.
    margin1, margin2, margin3 : float
        SphereFace's multiplicative, ArcFace's additive angular and
        CosFace's additive cosine margin.
    scale : float
        Logit scale ``s > 0``.
    group : None, False or mpi4py communicator
        ``None``: model parallel over COMM_WORLD when started by an MPI
        launcher with several ranks, else local. ``False``: local. A
        communicator: model parallel over it; rank ``r`` holds classes
        ``[offset_r, offset_r + C_r)`` with offsets in rank order.
    return_softmax : bool
        Also return the softmax of this rank's columns.
    reduction : {'mean', 'sum', 'none', None}
        Reduction of the per-row losses.

    Returns
    -------
    loss : () or (N, 1) array
        Dtype of ``logits``; identical bits on every rank.
    softmax : (..., C) array
        Only with ``return_softmax``; shape and dtype of ``logits``.

    Raises
    ------
    TypeError
        Unsupported logits dtype, non-integer label, non-real margins.
    ValueError
        Bad shapes, reduction, scale, or N differing between ranks.
    LabelError
        A label outside ``[0, total_classes)`` (an ``IndexError`` and a
        ``ValueError``). Under MPI every rank raises.

    Notes
    -----
    With ``theta = arccos(clip(x_iy, -1, 1))`` the target logit becomes
    ``cos(margin1 * theta + margin2) - margin3``; every logit is multiplied
    by ``scale`` and ``loss_i = logsumexp_j z_ij - z_iy`` over the classes
    of all ranks. Statistics are accumulated in float32 (float64 for
    float64 logits). One collective per call in the steady state.

    Examples
    --------
    >>> import numpy as np
    >>> from arcface_ce import margin_cross_entropy
    >>> x = np.array([[0.9, 0.1, -0.2]])
    >>> float(margin_cross_entropy(x, np.array([0]), group=False))
    ... # doctest: +ELLIPSIS
    4.31...e-14
    """
    call, error = _prepare(
        logits, label, (margin1, margin2, margin3), scale, reduction, group
    )

    def softmax_out() -> Any:
        if not isinstance(return_softmax, (bool, np.bool_)):
            raise TypeError(
                "return_softmax: expected a bool, got "
                f"{type(return_softmax).__name__}"
            )
        return call.xp.empty_like(call.logits) if return_softmax else None

    call, error, out = _guarded(call, error, group, softmax_out)
    call, merged, state, start = _forward(call, error, group, out)
    loss = _reduce(call, merged.loss)
    if out is None:
        return loss
    _write_pass(call, merged, state, start, out, None)
    return loss, out.reshape(call.shape)


def margin_cross_entropy_and_grad(
    logits: Any,
    label: Any,
    margin1: float = 1.0,
    margin2: float = 0.5,
    margin3: float = 0.0,
    scale: float = 64.0,
    group: Any = None,
    reduction: str | None = "mean",
    grad_loss: Any = None,
    out: Any = None,
) -> tuple[Any, Any]:
    """The loss and its gradient with respect to this rank's logits.

    Parameters are those of :func:`margin_cross_entropy`, plus:

    Parameters
    ----------
    grad_loss : scalar, (N,) or (N, 1) array, optional
        Upstream gradient of the loss: a scalar for ``'mean'`` and
        ``'sum'``, one value per row for ``'none'``. Default 1.
    out : (..., C) array, optional
        Where to write the gradient: C-contiguous, shape and dtype of
        ``logits``, of the same array kind. May be ``logits`` itself, which
        is then overwritten (no second N x C buffer). Reusing one buffer
        across steps also saves the page faults of a fresh allocation.

    Returns
    -------
    loss : () or (N, 1) array
        As :func:`margin_cross_entropy`.
    grad_logits : (..., C) array
        ``d loss / d logits`` for this rank's columns; shape and dtype of
        ``logits``.

    Notes
    -----
    With ``p`` the softmax and ``g_i`` the upstream gradient of row ``i``
    (divided by N for ``'mean'``): ``g_i * scale * p_ij`` off target and
    ``g_i * scale * (p_iy - 1) * m1 sin(m1 theta + m2) / sin(theta)`` at
    the target. The logits are read twice and the gradient written once;
    no communication beyond the forward's one collective.

    Examples
    --------
    >>> import numpy as np
    >>> from arcface_ce import margin_cross_entropy_and_grad
    >>> x = np.array([[0.2, 0.1], [0.3, -0.5]], dtype=np.float32)
    >>> loss, grad = margin_cross_entropy_and_grad(x, np.array([1, 0]),
    ...                                            group=False)
    >>> grad.shape, grad.dtype
    ((2, 2), dtype('float32'))
    """
    call, error = _prepare(
        logits, label, (margin1, margin2, margin3), scale, reduction, group
    )
    user_out = out
    call, error, checked = _guarded(
        call,
        error,
        group,
        lambda: (call.upstream(grad_loss), call.output(user_out)),
    )
    grad_rows, out = checked if checked is not None else (None, None)
    call, merged, state, start = _forward(call, error, group, out, grad_rows)
    loss = _reduce(call, merged.loss)
    _write_pass(call, merged, state, start, out, grad_rows)
    if user_out is not None:
        return loss, user_out
    return loss, out.reshape(call.shape)


__all__ = [
    "LabelError",
    "margin_cross_entropy",
    "margin_cross_entropy_and_grad",
]
