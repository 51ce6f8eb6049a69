"""A model-parallel margin-softmax classification head.

The head is the last layer of an embedding network trained with ArcFace,
CosFace or SphereFace: class weights are split over the ranks of a
communicator (model parallel), the batch of features is split over the same
ranks (data parallel). It works on NumPy arrays and on CuPy arrays alike
(the array module follows the input).

One training step, :meth:`MarginHead.forward_backward`
----------------------------------------------------------
1. All-gather every rank's features ``[n_r, D]`` and labels ``[n_r]`` into
   the global batch ``[N, D]``, ``[N]`` (ranks in order; ``n_r`` may
   differ, even be 0).
2. Normalise: ``f_hat = f / sqrt(|f|^2 + eps^2)`` per feature row,
   ``w_hat`` likewise per weight column. The ``eps`` makes a zero vector
   map to zero instead of NaN and keeps the map smooth everywhere.
3. ``logits = f_hat @ w_hat``, ``[N, C]`` cosines with this rank's ``C``
   classes, global ids ``[class_start, class_start + C)``.
4. Loss and ``dL/dlogits`` from
   :func:`arcface_ce.margin_cross_entropy_and_grad` (one collective).
5. ``d f_hat = dlogits @ w_hat^T`` is this rank's classes' share of the
   feature gradient of every row; a reduce-scatter sums the shares over
   the ranks and leaves each rank its own ``n_r`` rows.
6. ``d w_hat = f_hat^T @ dlogits`` is complete on every rank: the weight
   gradient needs no communication.
7. Back through the normalisation, with ``x_hat = x / n``:
   ``dx = (d x_hat - x_hat <x_hat, d x_hat>) / n``, i.e. the Jacobian
   ``(I - x_hat x_hat^T) / n``, exact for the ``eps`` form of step 2.

A step costs four collectives: an object all-gather of the labels and
shapes, an all-gather of the features, the loss's own, a reduce-scatter of
the feature gradients. Arrays cross MPI through host memory (CuPy arrays
are copied to the host and back, which synchronises the stream).

The gradients are those of the loss of the WHOLE batch (mean over all
``N`` rows with ``reduction='mean'``): a network below the head that
back-propagates its rank's ``grad_features`` gets the gradient of that
global loss restricted to its own rows, so the network gradients of the
ranks must be SUMMED (all-reduce), not averaged, to give the gradient of
the global loss. With equal slices that is the average of the per-rank
gradients of the per-rank mean losses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ._comm import resolve_group_agreed
from ._core import _real

__all__ = ["MarginHead", "allgather_rows", "split_classes"]

_REDUCTIONS = ("mean", "sum")


def _array_module(x: Any) -> Any:
    """NumPy, or CuPy for a CuPy array (imported only then)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _to_host(x: Any) -> np.ndarray:
    """A C-contiguous NumPy copy (or view) of a NumPy or CuPy array."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(x.get())


def _is_float(dtype: Any) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _work_dtype(dtype: Any) -> Any:
    """float64 stays float64; every narrower float computes in float32."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _check_weight(weight: Any) -> Exception | None:
    """The weight's argument error, or None (not raised here)."""
    if not hasattr(weight, "dtype"):
        return TypeError(
            "weight: expected a NumPy or CuPy array, got "
            f"{type(weight).__name__}"
        )
    if np.ndim(weight) != 2:
        return ValueError(
            f"weight: expected shape (D, C), got {np.shape(weight)}"
        )
    try:
        ok = _is_float(weight.dtype)
    except TypeError:
        ok = False
    if not ok:
        return TypeError(f"weight: expected a float dtype, got {weight.dtype}")
    return None


def _raise_agreed(comm: Any, local: Exception | None) -> None:
    """Raise the first failing rank's error on every rank, or return.

    Collective: every rank of ``comm`` must call it.
    """
    report = None if local is None else (type(local).__name__, str(local))
    reports = comm.allgather(report)
    for rank, item in enumerate(reports):
        if item is None:
            continue
        if rank == comm.Get_rank() and local is not None:
            raise local
        name, message = item
        cls = TypeError if name == "TypeError" else ValueError
        raise cls(f"{message} (raised on rank {rank})")


def split_classes(
    total_classes: int, size: int, weights: npt.ArrayLike | None = None
) -> np.ndarray:
    """Contiguous blocks of classes for ``size`` ranks.

    Parameters
    ----------
    total_classes : int
        Number of classes ``C_total >= 0``.
    size : int
        Number of ranks, ``>= 1``.
    weights : (size,) array_like of non-negative floats, optional
        Relative block sizes (not all zero). Default: equal blocks, the
        remainder going one class each to the last ranks.

    Returns
    -------
    bounds : (size + 1,) int64 ndarray
        Rank ``r`` owns global classes ``[bounds[r], bounds[r + 1])``;
        ``bounds[0] == 0``, ``bounds[-1] == total_classes``. Blocks may be
        empty when there are fewer classes than ranks.

    Raises
    ------
    ValueError
        For a negative ``total_classes``, ``size < 1``, or weights of the
        wrong length, negative, non-finite or all zero.

    Examples
    --------
    >>> split_classes(10, 3).tolist()
    [0, 3, 6, 10]
    >>> split_classes(10, 2, weights=[2, 3]).tolist()
    [0, 4, 10]
    """
    total_classes, size = int(total_classes), int(size)
    if total_classes < 0:
        raise ValueError(f"total_classes: expected >= 0, got {total_classes}")
    if size < 1:
        raise ValueError(f"size: expected >= 1, got {size}")
    ranks = np.arange(size + 1, dtype=np.int64)
    if weights is None:
        return (total_classes * ranks) // size
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (size,):
        raise ValueError(
            f"weights: expected {size} values, got shape {w.shape}"
        )
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            "weights: expected finite non-negative values, not all 0, "
            f"got {w.tolist()}"
        )
    cum = np.concatenate([[0.0], np.cumsum(w)])
    bounds = np.floor(total_classes * cum / cum[-1] + 0.5).astype(np.int64)
    bounds[-1] = total_classes
    return np.maximum.accumulate(bounds)


def allgather_rows(x: Any, group: Any = None) -> tuple[Any, np.ndarray]:
    """Concatenate every rank's rows, in rank order, on every rank.

    Parameters
    ----------
    x : (n_r, ...) ndarray (NumPy or CuPy)
        This rank's rows; ``n_r`` may differ between ranks (even 0), the
        trailing shape and the dtype may not.
    group : None, False or mpi4py communicator
        As for :func:`arcface_ce.margin_cross_entropy`. ``False`` (or a
        single process) returns ``x`` itself.

    Returns
    -------
    rows : (N, ...) ndarray of ``x``'s type and dtype
        All rows, ``N = sum_r n_r``.
    counts : (R,) int64 ndarray
        ``n_r`` of every rank.

    Raises
    ------
    ValueError
        On every rank, when trailing shapes or dtypes differ between ranks
        or ``x`` is 0-d.
    """
    comm, error = resolve_group_agreed(group)
    if comm is None:
        if np.ndim(x) == 0:
            raise ValueError("x: expected at least 1 dimension, got 0-d")
        return x, np.array([x.shape[0]], dtype=np.int64)
    xp = _array_module(x)
    if error is not None:
        host = np.zeros((0,), dtype=np.float64)
    elif np.ndim(x) == 0:
        error = ValueError("x: expected at least 1 dimension, got 0-d")
        host = np.zeros((0,), dtype=np.float64)
    else:
        host = _to_host(x)
    rows, counts, _ = _allgather_host(comm, host, "x", error)
    return (rows if xp is np else xp.asarray(rows)), counts


def _allgather_host(
    comm: Any,
    host: np.ndarray,
    name: str,
    error: Exception | None,
    extra: Any = None,
) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Object all-gather of shapes and ``extra``, then the rows' bytes.

    Returns the rows, every rank's row count and every rank's ``extra``.
    An error passed in by any rank, or a mismatch of trailing shapes or
    dtypes, is raised on every rank.
    """
    meta = (
        None if error is None else (type(error).__name__, str(error)),
        host.shape,
        host.dtype.str,
        extra,
    )
    metas = comm.allgather(meta)
    for rank, m in enumerate(metas):
        if m[0] is not None:
            if rank == comm.Get_rank() and error is not None:
                raise error
            cls = TypeError if m[0][0] == "TypeError" else ValueError
            raise cls(f"{m[0][1]} (raised on rank {rank})")
    tails = {m[1][1:] for m in metas}
    dtypes = {m[2] for m in metas}
    if len(tails) > 1 or len(dtypes) > 1:
        raise ValueError(
            f"{name}: expected the same trailing shape and dtype on every "
            f"rank, got {[(m[1], m[2]) for m in metas]}"
        )
    counts = np.array([m[1][0] for m in metas], dtype=np.int64)
    out = np.empty((int(counts.sum()),) + host.shape[1:], dtype=host.dtype)
    row_bytes = host.dtype.itemsize * int(np.prod(host.shape[1:]))
    comm.Allgatherv(
        host.reshape(-1).view(np.uint8),
        [out.reshape(-1).view(np.uint8), (counts * row_bytes).tolist()],
    )
    return out, counts, [m[3] for m in metas]


def _normalize(x: Any, axis: int, eps: float, xp: Any) -> tuple[Any, Any]:
    """``(x / n, n)`` with ``n = sqrt(sum(x^2, axis) + eps^2)``, keepdims."""
    norm = xp.sqrt((x * x).sum(axis=axis, keepdims=True) + eps * eps)
    return x / norm, norm


def _normalize_backward(x_hat: Any, norm: Any, grad: Any, axis: int) -> Any:
    """``(grad - x_hat <x_hat, grad>) / n``: the Jacobian transposed."""
    radial = (x_hat * grad).sum(axis=axis, keepdims=True)
    return (grad - x_hat * radial) / norm


class MarginHead:
    """Normalised linear layer + margin softmax loss, classes sharded.

    Parameters
    ----------
    weight : (D, C) ndarray (NumPy or CuPy)
        This rank's class weights, one column per class: rank ``r`` holds
        the contiguous block of global classes ``[class_start, class_start
        + C)``, blocks in rank order, ``C`` may differ between ranks (even
        0). float16, bfloat16, float32 or float64. Kept by reference: an
        optimiser may update it in place or assign a new array of the
        same shape to :attr:`weight`.
    group : None, False or mpi4py communicator, optional
        ``None``: model parallel over ``COMM_WORLD`` when an MPI launcher
        started several ranks, else local. ``False``: local, ``weight``
        holds every class. A communicator: model parallel over it.
    margin1, margin2, margin3 : float, optional
        SphereFace, ArcFace and CosFace margins (ArcFace by default).
    scale : float, optional
        Logit scale ``s``.
    eps : float, optional
        Norm regulariser, see the module notes. The loss of an all-zero
        feature row is finite, but its gradient is of order ``1 / eps``
        (the normalisation is that steep at 0): clip it or keep features
        away from 0 (a bias or a non-linearity before the head).

    Attributes
    ----------
    weight : (D, C) ndarray
        This rank's class weights.
    class_start : int
        Global id of this rank's first class.
    total_classes : int
        Classes over all ranks.
    class_counts : tuple of int
        ``C`` of every rank, in rank order.

    Raises
    ------
    ValueError
        For a weight that is not 2-D or feature widths ``D`` that differ
        between ranks (on every rank).
    TypeError
        For a weight that is not floating point.

    Notes
    -----
    Construction is collective over the communicator (one object
    all-gather). For row ``i`` with label ``y``, ``theta = arccos(cos_iy)``
    and ``cos_ij = <f_hat_i, w_hat_j>``, the loss is the softmax cross
    entropy of ``s * cos_ij`` (``j != y``) and
    ``s * (cos(margin1 * theta + margin2) - margin3)`` (``j = y``) over
    the classes of all ranks.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> head = MarginHead(rng.normal(size=(8, 5)), group=False, scale=16.0)
    >>> feats = rng.normal(size=(4, 8))
    >>> loss, g_feats, g_weight = head.forward_backward(feats, [0, 1, 2, 4])
    >>> g_feats.shape, g_weight.shape
    ((4, 8), (8, 5))
    >>> head.predict(feats).shape
    (4,)
    """

    def __init__(
        self,
        weight: Any,
        *,
        group: Any = None,
        margin1: float = 1.0,
        margin2: float = 0.5,
        margin3: float = 0.0,
        scale: float = 64.0,
        eps: float = 1e-12,
    ) -> None:
        # Every check is local; under MPI the first error is raised on
        # every rank before anyone waits in a collective.
        comm, error = resolve_group_agreed(group)
        self.comm: Any = comm
        try:
            self.margin1 = _real("margin1", margin1)
            self.margin2 = _real("margin2", margin2)
            self.margin3 = _real("margin3", margin3)
            self.scale = _real("scale", scale, positive=True)
            self.eps = _real("eps", eps, positive=True)
            error = error or _check_weight(weight)
        except (TypeError, ValueError) as exc:
            error = error or exc
        if self.comm is None:
            if error is not None:
                raise error
            counts = [int(weight.shape[1])]
            widths = [int(weight.shape[0])]
        else:
            _raise_agreed(self.comm, error)
            pairs = self.comm.allgather(tuple(weight.shape))
            widths = [int(d) for d, _ in pairs]
            counts = [int(c) for _, c in pairs]
            if len(set(widths)) > 1:
                raise ValueError(
                    "weight: expected the same feature width D on every "
                    f"rank, got {widths}"
                )
        rank = 0 if self.comm is None else self.comm.Get_rank()
        self.weight = weight
        self.class_counts = tuple(counts)
        self.class_start = int(sum(counts[:rank]))
        self.total_classes = int(sum(counts))
        self._rank = rank

    # ------------------------------------------------------------------
    def _check_batch(
        self, features: Any, labels: Any, reduction: str = "mean"
    ) -> Exception | None:
        """This rank's argument error, or None (not raised here)."""
        if reduction not in _REDUCTIONS:
            return ValueError(
                f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}"
            )
        if not hasattr(features, "dtype"):
            return TypeError(
                "features: expected a NumPy or CuPy array, got "
                f"{type(features).__name__}"
            )
        d = self.weight.shape[0]
        if np.ndim(features) != 2 or features.shape[1] != d:
            return ValueError(
                f"features: expected shape (n, {d}), got {np.shape(features)}"
            )
        if np.dtype(features.dtype) != np.dtype(self.weight.dtype):
            return TypeError(
                f"features: expected dtype {self.weight.dtype} (the "
                f"weight's), got {features.dtype}"
            )
        if labels is not None:
            shape = np.shape(labels)
            n = features.shape[0]
            if shape not in ((n,), (n, 1)):
                return ValueError(
                    f"labels: expected shape ({n},) or ({n}, 1), got {shape}"
                )
            kind = np.dtype(labels.dtype).kind
            if kind not in "iu":
                return TypeError(
                    f"labels: expected an integer dtype, got {labels.dtype}"
                )
        return None

    def _gather(
        self,
        features: Any,
        labels: Any,
        gather: bool = True,
        reduction: str = "mean",
        need_labels: bool = False,
    ) -> tuple[Any, Any, int, list[int]]:
        """Global features (and labels), this rank's row offset, all n_r."""
        xp = _array_module(features)
        error: Exception | None = None
        try:
            if labels is not None and not hasattr(labels, "dtype"):
                labels = xp.asarray(labels)
                if labels.size == 0:  # [] is float64 to NumPy
                    labels = labels.astype(np.int64)
            if need_labels and labels is None:
                raise TypeError("labels: expected an integer array, got None")
            error = self._check_batch(features, labels, reduction)
        except Exception as exc:  # any local failure must reach every rank
            error = exc
        if self.comm is None or not gather:
            if self.comm is not None:
                _raise_agreed(self.comm, error)
            elif error is not None:
                raise error
            if labels is not None:
                labels = labels.reshape(-1)
            return features, labels, 0, [int(features.shape[0])]
        if error is None:
            host = _to_host(features)
            host_labels = (
                None if labels is None else _to_host(labels).reshape(-1)
            )
        else:
            host = np.zeros((0, self.weight.shape[0]), np.float64)
            host_labels = None
        rows, counts, label_parts = _allgather_host(
            self.comm, host, "features", error, extra=host_labels
        )
        all_labels = None
        if labels is not None:
            all_labels = xp.asarray(
                np.concatenate([p.astype(np.int64) for p in label_parts])
            )
        offset = int(counts[: self._rank].sum())
        feats = rows if xp is np else xp.asarray(rows)
        return feats, all_labels, offset, [int(c) for c in counts]

    def _cosines(self, feats: Any, xp: Any) -> tuple[Any, ...]:
        """``(logits, f_hat, f_norm, w_hat, w_norm)`` in the work dtype."""
        work = _work_dtype(self.weight.dtype)
        f_hat, f_norm = _normalize(feats.astype(work), 1, self.eps, xp)
        w_hat, w_norm = _normalize(self.weight.astype(work), 0, self.eps, xp)
        return f_hat @ w_hat, f_hat, f_norm, w_hat, w_norm

    # ------------------------------------------------------------------
    def forward_backward(
        self, features: Any, labels: Any, reduction: str = "mean"
    ) -> tuple[Any, Any, Any]:
        """Loss of the global batch and the gradients of this rank.

        Collective over the communicator.

        Parameters
        ----------
        features : (n_r, D) ndarray, dtype of ``weight``
            This rank's slice of the batch (``n_r`` may differ between
            ranks, even be 0). The global batch is the concatenation of the
            ranks' slices in rank order.
        labels : (n_r,) or (n_r, 1) int array
            Global class ids of this rank's rows.
        reduction : {'mean', 'sum'}, optional
            Over the ``N`` rows of the global batch.

        Returns
        -------
        loss : 0-d ndarray, dtype of ``weight``
            Identical on every rank.
        grad_features : (n_r, D) ndarray, dtype of ``features``
            Gradient of ``loss`` with respect to this rank's features.
        grad_weight : (D, C) ndarray, dtype of ``weight``
            Gradient of ``loss`` with respect to this rank's weights.

        Raises
        ------
        ValueError
            Bad shapes or ``reduction`` (on every rank); a label outside
            ``[0, total_classes)`` raises
            :class:`arcface_ce.LabelError` (a ``ValueError``).
        TypeError
            Non-integer labels, features of another dtype than the weight.
        """
        from ._core import margin_cross_entropy_and_grad

        xp = _array_module(features)
        feats, all_labels, offset, counts = self._gather(
            features, labels, reduction=reduction, need_labels=True
        )
        n_local = counts[self._rank]
        cos, f_hat, f_norm, w_hat, w_norm = self._cosines(feats, xp)
        dtype = self.weight.dtype
        loss, grad_cos = margin_cross_entropy_and_grad(
            cos.astype(dtype),
            all_labels,
            margin1=self.margin1,
            margin2=self.margin2,
            margin3=self.margin3,
            scale=self.scale,
            group=False if self.comm is None else self.comm,
            reduction=reduction,
        )
        grad_cos = grad_cos.astype(f_hat.dtype)
        grad_w_hat = f_hat.T @ grad_cos
        grad_weight = _normalize_backward(w_hat, w_norm, grad_w_hat, 0)
        grad_f_hat = grad_cos @ w_hat.T
        if self.comm is not None:
            grad_f_hat = self._reduce_scatter(grad_f_hat, counts, xp)
        rows = slice(offset, offset + n_local)
        grad_features = _normalize_backward(
            f_hat[rows], f_norm[rows], grad_f_hat, 1
        )
        return (
            loss,
            grad_features.astype(features.dtype),
            grad_weight.astype(dtype),
        )

    def _reduce_scatter(self, grad: Any, counts: list[int], xp: Any) -> Any:
        """Sum ``[N, D]`` over the ranks, keep this rank's ``n_r`` rows."""
        from mpi4py import MPI

        host = _to_host(grad)
        width = host.shape[1]
        out = np.empty((counts[self._rank], width), dtype=host.dtype)
        self.comm.Reduce_scatter(
            host, out, recvcounts=[c * width for c in counts], op=MPI.SUM
        )
        return out if xp is np else xp.asarray(out)

    def logits(self, features: Any, gather: bool = True) -> Any:
        """Cosine logits (no margin, no scale) of this rank's classes.

        Collective over the communicator.

        Parameters
        ----------
        features : (n_r, D) ndarray, dtype of ``weight``
            This rank's rows (``gather=True``) or the whole batch, the same
            on every rank (``gather=False``).
        gather : bool, optional
            Whether to all-gather the rows of the ranks first.

        Returns
        -------
        cos : (N, C) ndarray, dtype of ``weight``
            ``cos[i, j]`` is the cosine of row ``i`` and global class
            ``class_start + j``.
        """
        xp = _array_module(features)
        feats, _, _, _ = self._gather(features, None, gather)
        cos = self._cosines(feats, xp)[0]
        return cos.astype(self.weight.dtype)

    def predict(self, features: Any, gather: bool = True) -> Any:
        """Global class id of the largest cosine, identical on every rank.

        Collective over the communicator. Ties go to the lowest class id,
        as ``argmax`` over the concatenated logits of all ranks.

        Parameters
        ----------
        features : (n_r, D) ndarray, dtype of ``weight``
            As for :meth:`logits`.
        gather : bool, optional
            As for :meth:`logits`.

        Returns
        -------
        ids : (N,) int64 ndarray (NumPy or CuPy, as ``features``)
            Predicted global class of every row of the gathered batch.
        """
        xp = _array_module(features)
        feats, _, _, _ = self._gather(features, None, gather)
        cos = self._cosines(feats, xp)[0]
        n, c = cos.shape
        if self.comm is None:
            if c == 0:
                raise ValueError("weight: expected at least one class, got 0")
            return xp.argmax(cos, axis=1).astype(xp.int64)
        # Each rank's best (cosine, global id); -inf / -1 for no classes.
        best = np.full((2, n), -np.inf)
        best[1] = -1
        if c > 0:
            local = _to_host(cos).astype(np.float64)
            idx = local.argmax(axis=1)
            best[0] = local[np.arange(n), idx]
            best[1] = idx + self.class_start
        stack = np.empty((self.comm.Get_size(), 2, n))
        self.comm.Allgather(best, stack)
        winner = stack[:, 0, :].argmax(axis=0)  # first rank on ties
        ids = stack[winner, 1, np.arange(n)].astype(np.int64)
        return ids if xp is np else xp.asarray(ids)
