"""Transport of the row statistics between ranks, and error agreement.

The merge arithmetic lives in :mod:`arcface_ce._merge`; this module moves
the bytes. One call of the loss costs ONE collective in the steady state:

1. Each rank packs a small header (status, N, C_local, a hash of the
   labels, a hash of the other arguments: logits dtype, margins, scale,
   reduction) and its ``[N, 4]`` row statistics into one float64 buffer.
2. ``Allgather`` of that buffer. Its length follows from the N agreed in
   the previous call on this communicator (cached as an MPI attribute), so
   every rank posts the same size even when one rank's N is wrong.
3. Every rank reads every header. If any rank reported an error (a bad
   argument, an exception while computing), all ranks take part in one
   more, object all-gather of the messages and raise the first rank's
   exception: nobody is left waiting in a collective. If a rank's shape
   differs from the cached one (first call, new batch size, new class
   split), all ranks agree on the new shapes from the headers, validate
   them (equal N) and repeat step 2 once with the right size; an error
   found while computing with the stale shapes (a label checked against
   the old class count) is dropped and found again, or not, in the
   repeat.
4. Labels or arguments that differ between ranks (hashes differ) raise
   ValueError on every rank.

The statistics go through host memory unless the MPI library reports that
it is CUDA-aware, in which case CuPy buffers are passed directly (after
synchronising the stream).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ._merge import STATS_WIDTH

HEADER = 5
STATUS_OK, STATUS_RESHAPE, STATUS_ERROR, STATUS_STALE_ERROR = 0, 1, 2, 3

_LAUNCHER_SIZE_VARS = (
    "PMI_SIZE",  # MPICH / Hydra, Intel MPI
    "OMPI_COMM_WORLD_SIZE",  # Open MPI
    "PMIX_SIZE",
    "MV2_COMM_WORLD_SIZE",  # MVAPICH
)

_KEYVAL: Any = None
_CUDA_AWARE: bool | None = None


class LabelError(IndexError, ValueError):
    """A label is outside ``[0, total_classes)``."""


_EXCEPTIONS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        LabelError,
        TypeError,
        ValueError,
        IndexError,
        MemoryError,
        RuntimeError,
        OverflowError,
    )
}


def launched_world_size() -> int:
    """World size announced by an MPI launcher, 1 for a plain process."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        return int(mpi.COMM_WORLD.Get_size())
    for name in _LAUNCHER_SIZE_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def resolve_group(group: Any) -> Any | None:
    """Map the ``group`` argument to a communicator, or None for local.

    ``False`` and a one-rank communicator mean no communication; ``None``
    means COMM_WORLD when an MPI launcher started several ranks.
    """
    if group is False:
        return None
    if group is None:
        if launched_world_size() <= 1:
            return None
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(
                "group=None in a process started by an MPI launcher "
                f"({launched_world_size()} ranks) needs mpi4py: install "
                "arcface_ce[mpi], or pass group=False for a local loss"
            ) from exc

        group = MPI.COMM_WORLD
    elif group is True or not hasattr(group, "Allgather"):
        raise TypeError(
            "group: expected None, False or an mpi4py communicator, "
            f"got {type(group).__name__}"
        )
    try:
        size = group.Get_size()
    except Exception as exc:  # MPI.COMM_NULL, a freed communicator
        raise TypeError(
            "group: expected a valid communicator, got one that fails "
            f"Get_size() (null or freed?): {exc}"
        ) from None
    if size == 1:
        return None
    return group


def resolve_group_agreed(group: Any) -> tuple[Any | None, Exception | None]:
    """:func:`resolve_group` that lets a bad ``group`` be agreed on.

    A process started by an MPI launcher with several ranks gets
    ``(COMM_WORLD, TypeError)`` for a bad ``group`` instead of the
    exception: it then reports the error through the collective, so the
    ranks that passed COMM_WORLD itself (or ``None``) raise too instead of
    waiting; ranks that passed another communicator cannot be reached.
    A plain process gets the exception.
    """
    try:
        return resolve_group(group), None
    except TypeError as exc:
        if launched_world_size() <= 1:
            raise
        try:
            from mpi4py import MPI
        except ImportError:  # nobody to tell
            raise exc from None

        return MPI.COMM_WORLD, exc


def mpi_is_cuda_aware() -> bool:
    """Whether the MPI library accepts device pointers (cached).

    MPICH and Open MPI export ``MPIX_Query_cuda_support``; the PyPI wheels
    are built without CUDA support and answer 0 or lack the symbol.
    """
    global _CUDA_AWARE
    if _CUDA_AWARE is None:
        _CUDA_AWARE = False
        if os.environ.get("ARCFACE_CE_CUDA_AWARE_MPI") == "0":
            return False
        try:
            from mpi4py import MPI

            lib = ctypes.CDLL(MPI.__file__, mode=ctypes.RTLD_GLOBAL)
            query = lib.MPIX_Query_cuda_support
            query.restype = ctypes.c_int
            _CUDA_AWARE = bool(query())
        except (OSError, AttributeError, ImportError):
            _CUDA_AWARE = False
    return _CUDA_AWARE


def _shape_cache(comm: Any) -> dict[str, Any]:
    """Per-communicator state, cached as an MPI attribute of ``comm``."""
    global _KEYVAL
    from mpi4py import MPI

    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval()
    state = comm.Get_attr(_KEYVAL)
    if state is None:
        state = {"n": None, "cs": None}
        comm.Set_attr(_KEYVAL, state)
    return state


def _mix(z: Any, xp: Any) -> Any:
    """SplitMix64 finaliser on a uint64 array (wraps around)."""
    z = z ^ (z >> xp.uint64(30))
    z = z * xp.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> xp.uint64(27))
    z = z * xp.uint64(0x94D049BB133111EB)
    return z ^ (z >> xp.uint64(31))


def label_checksum(label: Any, xp: Any) -> int:
    """Hash of the labels and their positions, as an int64.

    Each (row, label) pair is mixed by a 64-bit finaliser before the sum,
    so different label vectors collide with probability about 2**-64
    (a linear checksum is fooled by swapping values between rows).
    """
    n = label.shape[0]
    if n == 0:
        return 0
    z = label.astype(xp.int64).astype(xp.uint64)
    z = z * xp.uint64(0x9E3779B97F4A7C15)
    z = z + xp.arange(1, n + 1, dtype=xp.uint64)
    total = _mix(z, xp).sum(dtype=xp.uint64)
    return int(np.asarray(int(total), dtype=np.uint64).view(np.int64))


def arguments_hash(*values: Any) -> int:
    """int64 hash of the ``repr`` of the arguments ranks must share.

    Floats are hashed with ``-0.0`` read as ``0.0`` (equal values).
    """
    values = tuple(v + 0.0 if isinstance(v, float) else v for v in values)
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _raise_agreed(comm: Any, headers: np.ndarray, local: Exception | None):
    """Every rank raises the first failing rank's exception."""
    reports = comm.allgather(
        None if local is None else (type(local).__name__, str(local))
    )
    for rank, report in enumerate(reports):
        if report is None:
            continue
        name, message = report
        cls = _EXCEPTIONS.get(name, RuntimeError)
        if rank == comm.Get_rank() and local is not None:
            raise local
        raise cls(f"{message} (raised on rank {rank})")
    raise RuntimeError("inconsistent error headers")  # pragma: no cover


def exchange(
    comm: Any,
    n: int,
    c_local: int,
    checksum: int,
    params: int,
    local_error: Exception | None,
    compute: Callable[[int, int], Any],
    xp: Any,
) -> tuple[Any, int, int]:
    """Gather every rank's row statistics in one collective.

    Parameters
    ----------
    comm : mpi4py communicator
        At least two ranks.
    n, c_local : int
        This rank's rows and classes.
    checksum : int
        :func:`label_checksum` of this rank's labels.
    params : int
        :func:`arguments_hash` of the arguments every rank must share.
    local_error : Exception or None
        An error this rank found before communicating.
    compute : callable
        ``compute(class_start, total_classes) -> (N, 4) float64 xp
        array``: this rank's statistics once its class range is known.
    xp : module
        Array module of the statistics.

    Returns
    -------
    stats : (R, N, 4) float64 array
        Everyone's statistics (on the device if MPI is CUDA-aware).
    class_start, total_classes : int
        This rank's first global class id and the global class count.

    Raises
    ------
    Exception
        The first failing rank's exception, on every rank.
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    cache = _shape_cache(comm)
    on_device = xp is not np and mpi_is_cuda_aware()
    bxp = xp if on_device else np
    computed: dict[int, Any] = {}
    stale_error: Exception | None = None
    for _ in range(2):
        n_buf = cache["n"] or 0
        steady = (
            local_error is None
            and cache["n"] == n
            and cache["cs"][rank] == c_local
        )
        send = bxp.zeros(HEADER + STATS_WIDTH * n_buf, dtype=np.float64)
        status = STATUS_RESHAPE
        if steady:
            start = int(sum(cache["cs"][:rank]))
            try:
                if start not in computed:
                    computed[start] = compute(start, sum(cache["cs"]))
                stats = computed[start]
                if on_device:
                    send[HEADER:] = stats.ravel()
                else:
                    send[HEADER:] = (
                        stats.get() if xp is not np else stats
                    ).ravel()
                status = STATUS_OK
            except Exception as exc:  # reported to every rank below
                status, stale_error = STATUS_STALE_ERROR, exc
        if local_error is not None:
            status = STATUS_ERROR
        header = np.array(
            [status, n, c_local, checksum, params], dtype=np.int64
        )
        send[:HEADER] = bxp.asarray(header.view(np.float64))
        recv = bxp.empty((size, send.size), dtype=np.float64)
        if on_device:
            xp.cuda.get_current_stream().synchronize()
        comm.Allgather(send, recv)
        heads = recv[:, :HEADER].get() if on_device else recv[:, :HEADER]
        heads = np.ascontiguousarray(heads).view(np.int64)
        statuses, ns, cs, sums, hashes = heads.T
        if (statuses == STATUS_ERROR).any():
            _raise_agreed(comm, heads, local_error)
        if (hashes != hashes[0]).any():
            raise ValueError(
                "logits dtype, margin1, margin2, margin3, scale and "
                "reduction: expected the same on every rank, got "
                "different ones on ranks "
                f"{np.flatnonzero(hashes != hashes[0]).tolist()} than on "
                "rank 0"
            )
        if (ns != ns[0]).any():
            raise ValueError(
                "logits: expected the same number of rows N on every rank, "
                f"got {ns.tolist()} (ranks 0..{size - 1})"
            )
        if int(cs.sum()) == 0:
            raise ValueError(
                "logits: expected at least one class over all ranks, got 0"
            )
        changed = cache["n"] != int(ns[0]) or cache["cs"] != tuple(
            int(c) for c in cs
        )
        if (statuses == STATUS_STALE_ERROR).any() and not changed:
            _raise_agreed(comm, heads, stale_error)
        if (statuses == STATUS_OK).all():
            if (sums != sums[0]).any():
                raise ValueError(
                    "label: expected the same labels on every rank, got "
                    f"different ones (checksums {sums.tolist()})"
                )
            stats = recv[:, HEADER:].reshape(size, n, STATS_WIDTH)
            start = int(cs[:rank].sum())
            return stats, start, int(cs.sum())
        cache["n"], cache["cs"] = int(ns[0]), tuple(int(c) for c in cs)
        stale_error = None
    raise RuntimeError("shape agreement did not settle")  # pragma: no cover
