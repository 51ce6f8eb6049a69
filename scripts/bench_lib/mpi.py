"""Model-parallel run: classes split over MPI ranks.

Rank r holds the contiguous block of classes ``[start_r, start_r + C_r)``
of every row; the label holds global ids and is the same on all ranks.
Two implementations are compared:

- ``package``: ``arcface_ce`` with ``group`` set to a counting view of
  ``COMM_WORLD``;
- ``paddle-style``: NumPy, with the collective pattern of Paddle's
  distributed margin cross entropy kernel, five blocking Allreduce calls
  per forward+gradient step:

  1. class offsets: Allreduce(SUM) of a vector holding each rank's class
     count (Paddle recomputes the interval table on every call);
  2. row max of the scaled, margin-adjusted logits: Allreduce(MAX);
  3. row sum of exp(z - max): Allreduce(SUM);
  4. per-row loss, non-zero on the rank owning the target: Allreduce(SUM);
  5. the gradient pass recomputes the class offsets: Allreduce(SUM).

  The forward alone makes the first four.  Statistics are float32 (or
  float64) also for 16-bit logits, as the loss contract requires.

Every collective issued on the counting communicator (or on a duplicate
of it) is counted, so "collectives per call" is measured, not assumed.
Each call is preceded by a barrier on ``COMM_WORLD`` (not counted); the
time of one call is the largest over the ranks, and the summary is over
those per-call maxima.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from types import ModuleType
from typing import Any

import numpy as np

from .grid import Grid, make_timing_input, phases_of
from .impls import FloorPasses, Impl, target_derivative, work_dtype
from .reference import (
    CheckResult,
    Margins,
    check_settings,
    compare,
    dtype_from_name,
    make_check_input,
    reference_loss_and_grad,
)
from .report import Row, make_row
from .timing import Stats, peak_extra_memory, time_calls

# Collective operations of mpi4py's communicators that are counted.
COLLECTIVES = (
    "Allgather",
    "Allgatherv",
    "Allreduce",
    "Alltoall",
    "Alltoallv",
    "Alltoallw",
    "Barrier",
    "Bcast",
    "Exscan",
    "Gather",
    "Gatherv",
    "Reduce",
    "Reduce_scatter",
    "Reduce_scatter_block",
    "Scan",
    "Scatter",
    "Scatterv",
    "Iallgather",
    "Iallgatherv",
    "Iallreduce",
    "Ialltoall",
    "Ialltoallv",
    "Ibarrier",
    "Ibcast",
    "Iexscan",
    "Igather",
    "Igatherv",
    "Ireduce",
    "Ireduce_scatter",
    "Ireduce_scatter_block",
    "Iscan",
    "Iscatter",
    "Iscatterv",
    "Allreduce_init",
    "Bcast_init",
    "Allgather_init",
    "Reduce_init",
    "allgather",
    "allreduce",
    "alltoall",
    "barrier",
    "bcast",
    "exscan",
    "gather",
    "reduce",
    "scan",
    "scatter",
)


def counting_comm_class(mpi: ModuleType) -> type:
    """A subclass of ``MPI.Intracomm`` that counts its collectives.

    ``cls(MPI.COMM_WORLD)`` views the same communicator; ``Dup`` keeps the
    subclass, so a library duplicating it is counted too.  ``cls.count``
    holds the number of calls since ``cls.count = 0``.
    """

    def wrap(name: str) -> Callable[..., Any]:
        base = getattr(mpi.Intracomm, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            type(self).count += 1
            return base(self, *args, **kwargs)

        method.__name__ = name
        return method

    attrs: dict[str, Any] = {"count": 0}
    for name in COLLECTIVES:
        if hasattr(mpi.Intracomm, name):
            attrs[name] = wrap(name)
    return type("CountingIntracomm", (mpi.Intracomm,), attrs)


def split_sizes(c: int, ranks: int, uneven: bool = False) -> list[int]:
    """Class counts per rank: even, or proportional to rank + 1."""
    weights = np.arange(1, ranks + 1) if uneven else np.ones(ranks)
    sizes = np.floor(c * weights / weights.sum()).astype(np.int64)
    sizes[-1] += c - sizes.sum()
    return [int(s) for s in sizes]


class PaddleStyleImpl(Impl):
    """NumPy forward and gradient with Paddle's five Allreduce calls.

    Parameters
    ----------
    comm : mpi4py communicator
        Communicator over which the classes are split.
    """

    name = "paddle-style"

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        from mpi4py import MPI

        self.mpi = MPI

    def setup(self, logits: np.ndarray, label: np.ndarray) -> None:
        self.x = logits
        self.label = label

    def _class_start(self) -> int:
        # Allreduce: the rank's class count in slot rank + 1, then a
        # running sum gives every rank's first global class id.
        comm = self.comm
        counts = np.zeros(comm.Get_size() + 1, dtype=np.int64)
        counts[comm.Get_rank() + 1] = self.x.shape[1]
        comm.Allreduce(self.mpi.IN_PLACE, counts, op=self.mpi.SUM)
        return int(np.cumsum(counts)[comm.Get_rank()])

    def _forward(self, m: Margins) -> tuple[Any, ...]:
        mpi, comm = self.mpi, self.comm
        x, label = self.x, self.label
        n, c = x.shape
        start = self._class_start()  # 1
        owned = np.flatnonzero((label >= start) & (label < start + c))
        cols = label[owned] - start
        z = np.array(x, dtype=work_dtype(x.dtype))
        cos_t = np.clip(z[owned, cols], -1.0, 1.0)
        theta = np.arccos(cos_t)
        z[owned, cols] = np.cos(m.margin1 * theta + m.margin2) - m.margin3
        z *= z.dtype.type(m.scale)
        zmax = np.full(n, -np.inf, dtype=z.dtype)
        if c:
            np.max(z, axis=1, out=zmax)
        comm.Allreduce(mpi.IN_PLACE, zmax, op=mpi.MAX)  # 2
        z -= zmax[:, None]
        shifted_target = z[owned, cols]
        np.exp(z, out=z)
        total = z.sum(axis=1)
        comm.Allreduce(mpi.IN_PLACE, total, op=mpi.SUM)  # 3
        loss_rows = np.zeros(n, dtype=z.dtype)
        loss_rows[owned] = np.log(total[owned]) - shifted_target
        comm.Allreduce(mpi.IN_PLACE, loss_rows, op=mpi.SUM)  # 4
        loss = loss_rows.mean().astype(x.dtype)
        return loss, z, total, owned, cols, cos_t, theta

    def forward(self, m: Margins) -> Any:
        return self._forward(m)[0]

    def forward_grad(self, m: Margins) -> tuple[Any, Any]:
        loss, z, total, owned, cols, cos_t, theta = self._forward(m)
        # The gradient op of Paddle starts by rebuilding the class table.
        self._class_start()  # 5
        z /= total[:, None]
        dtarget = target_derivative(cos_t, theta, m)
        z[owned, cols] = (z[owned, cols] - 1.0) * dtarget
        z *= z.dtype.type(m.scale / self.x.shape[0])
        return loss, z.astype(self.x.dtype, copy=False)


def check_split(
    impl: Impl,
    world: Any,
    dtype_name: str,
    n: int = 7,
    c: int = 37,
    seed: int = 12345,
    extra: Sequence[Margins] = (),
) -> CheckResult:
    """Check a model-parallel implementation against the float64 reference.

    Every rank takes its block (uneven sizes) of one small global input;
    the loss must match the reference and be bit-identical on all ranks,
    each rank's gradient block must match the reference block.  After
    each call the ranks exchange their verdicts, so all of them stop at
    the same point and return the same result.  (An implementation that
    raises on one rank while the others wait inside its collective hangs;
    the loss contract forbids that.)
    """
    rank, ranks = world.Get_rank(), world.Get_size()
    sizes = split_sizes(c, ranks, uneven=True)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    dtype = dtype_from_name(dtype_name)
    x64, label = make_check_input(n, c, seed)
    x = x64.astype(dtype)
    fwd, fwd_grad = impl.check_callables()
    detail = "nothing checked"
    for m in check_settings(extra):
        ref_loss, ref_grad = reference_loss_and_grad(x, label, m)
        tag = m.tag()
        for name, fn in (("fwd", fwd), ("fwd+grad", fwd_grad)):
            if fn is None:
                continue
            bits = b""
            try:
                out = fn(np.ascontiguousarray(x[:, lo:hi]), label.copy(), m)
                loss, grad = (out, None) if name == "fwd" else out
                res = compare(
                    float(loss),
                    grad,
                    ref_loss,
                    ref_grad[:, lo:hi],
                    dtype_name,
                )
                bits = np.float64(loss).tobytes()
            except Exception as exc:  # refused, on this rank
                res = CheckResult(False, f"raised {type(exc).__name__}: {exc}")
            verdicts = world.allgather((res.ok, res.detail, bits))
            if not all(v[0] for v in verdicts):
                impl.release()
                return CheckResult(
                    False,
                    "; ".join(
                        f"rank {r}: {tag} {name}: {v[1]}"
                        for r, v in enumerate(verdicts)
                        if not v[0]
                    ),
                )
            if len({v[2] for v in verdicts}) != 1:
                impl.release()
                return CheckResult(
                    False, f"{tag} {name}: loss bits differ between ranks"
                )
            detail = verdicts[0][1]
    impl.release()
    return CheckResult(
        True,
        f"{ranks} ranks, classes {sizes}, identical loss bits; "
        f"rank 0 last: {detail}",
    )


def run_mpi(
    grid: Grid,
    module: ModuleType | None,
    say: Callable[[str], None],
) -> list[Row]:
    """Check and time the package and the Paddle-style reference.

    Returns the rows on rank 0 and an empty list elsewhere; ``say`` is
    only called on rank 0.
    """
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, ranks = world.Get_rank(), world.Get_size()
    counting: Any = counting_comm_class(MPI)
    comm = counting(world)
    root_say = say if rank == 0 else (lambda _msg: None)

    impls: list[Impl] = [PaddleStyleImpl(comm)]
    if module is not None:
        from .impls import PackageImpl

        impls.insert(0, PackageImpl(module, group=comm))
    rows: list[Row] = []
    floor = FloorPasses()
    m = grid.margins
    for dtype_name in grid.dtypes:
        dtype = dtype_from_name(dtype_name)
        ok_impls = []
        for impl in impls:
            res = check_split(impl, world, dtype_name, extra=(m,))
            word = "OK" if res.ok else "FAILED"
            root_say(
                f"check {impl.name} {dtype_name} (mpi): {word} {res.detail}"
            )
            if res.ok:
                ok_impls.append(impl)
            else:
                root_say(f"  -> {impl.name} is not timed for {dtype_name}")
        for n in grid.Ns:
            for c in grid.Cs:
                sizes = split_sizes(c, ranks)
                label = np.random.default_rng(grid.seed).integers(
                    0, c, size=n, dtype=np.int64
                )
                x, _ = make_timing_input(
                    n,
                    sizes[rank],
                    dtype,
                    grid.seed + 1 + rank,
                    grid.data,
                    label=label,
                    class_start=sum(sizes[:rank]),
                )
                for impl in ok_impls:
                    impl.setup(x, label)
                    for phase, fn in phases_of(impl):
                        counting.count = 0
                        fn(m)  # first call on this input
                        first = world.allreduce(counting.count, op=MPI.MAX)
                        row = _measure_split(
                            grid,
                            world,
                            phase,
                            impl.name,
                            partial(fn, m),
                            dtype_name,
                            n,
                            c,
                            dtype.itemsize,
                            counting,
                        )
                        if row is not None and row.collectives_per_call != (
                            first
                        ):
                            row.note = f"first call on a new input: {first}"
                        if row is not None:
                            rows.append(row)
                            root_say(_line(row))
                    impl.release()
                floor.setup(x)
                parts = []
                for part in (floor.max_pass, floor.exp_pass):
                    parts.append(
                        _measure_split(
                            grid,
                            world,
                            "component",
                            "floor",
                            part,
                            dtype_name,
                            n,
                            c,
                            dtype.itemsize,
                            None,
                            memory=False,
                        )
                    )
                floor.release()
                if rank == 0:
                    t_max, t_exp = (_stats_of_row(r) for r in parts)
                    for phase, stats in (
                        ("fwd", t_max),
                        ("fwd+grad", t_max.plus(t_exp)),
                    ):
                        row = make_row(
                            "mpi",
                            "floor",
                            phase,
                            dtype_name,
                            n,
                            c,
                            dtype.itemsize,
                            stats,
                            ranks=ranks,
                            note="per-rank floor, max over ranks per call",
                        )
                        rows.append(row)
                        root_say(_line(row))
    return rows


def _stats_of_row(r: Row | None) -> Stats:
    if r is None:
        raise RuntimeError("floor component missing on rank 0")
    return Stats(r.median_s, r.q25_s, r.q75_s, r.min_s, r.max_s, r.repeats)


def _measure_split(
    grid: Grid,
    world: Any,
    phase: str,
    impl_name: str,
    call: Callable[[], Any],
    dtype_name: str,
    n: int,
    c: int,
    itemsize: int,
    counter: Any = None,
    memory: bool = True,
) -> Row | None:
    """Time ``call`` on every rank; rank 0 gets the row, others None.

    After the timed calls, one more call counts the collectives issued
    on ``counter`` (a counting communicator class): the steady state.
    """
    times = time_calls(call, grid.plan, barrier=world.Barrier, fixed=True)
    collectives = 0
    if counter is not None:
        from mpi4py import MPI

        counter.count = 0
        call()
        collectives = world.allreduce(counter.count, op=MPI.MAX)
    mem = (math.nan, math.nan)
    if memory and grid.measure_memory:
        world.Barrier()
        mem = peak_extra_memory(call)
    gathered = world.gather((times, mem), root=0)
    if gathered is None:
        return None
    per_rank = np.stack([g[0] for g in gathered])
    mem_max = tuple(
        float(np.nanmax([g[1][k] for g in gathered]))
        if not all(math.isnan(g[1][k]) for g in gathered)
        else math.nan
        for k in (0, 1)
    )
    return make_row(
        "mpi",
        impl_name,
        phase,
        dtype_name,
        n,
        c,
        itemsize,
        Stats.of(per_rank.max(axis=0)),
        ranks=per_rank.shape[0],
        collectives=collectives,
        mem=(mem_max[0], mem_max[1]),
        rank_medians=[float(np.median(t)) for t in per_rank],
    )


def _line(r: Row) -> str:
    return (
        f"  mpi {r.impl:12} {r.phase:9} {r.dtype:8} N={r.N} C={r.C} "
        f"ranks={r.ranks}: median {r.median_s * 1e3:.3f} ms, "
        f"collectives/call {r.collectives_per_call:g}, "
        f"rank medians {r.rank_medians_s}"
    )


def world_size_from_launcher() -> int:
    """World size announced by an MPI launcher's variables (1 if none).

    Read without importing mpi4py, so a plain run never initialises MPI.
    ``MPI_LOCALNRANKS`` (ranks on this node) is a last resort: it is
    only used to tell one rank from several.
    """
    import os

    for var in (
        "PMI_SIZE",
        "OMPI_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ):
        val = os.environ.get(var, "")
        if val.isdigit():
            return int(val)
    return 1
