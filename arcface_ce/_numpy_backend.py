"""The NumPy backend: row statistics and the write pass on the CPU.

Work is split into blocks of whole rows small enough to stay in the L2
cache (``BLOCK_BYTES``), spread over a thread pool: NumPy releases the GIL
inside ufuncs, so the blocks run on every core. Per block:

1. ``buf = scale * x`` into a cache-resident buffer (or, for float32 and
   float64 output, straight into the caller's output block): the only
   read of the block from memory;
2. the shift: the row maximum of ``buf`` without the target;
3. ``buf -= shift`` then ``exp`` in place, one exponential per element;
4. the target column is zeroed and the row sums taken.

When an output (softmax or gradient) of the accumulate type is wanted, the
exponentials of step 3 stay in it, and the write pass only rescales each row
by ``row_a * exp(shift - M)`` and sets the target: no second exponential
and no second read of the logits. float16/bfloat16 outputs cannot hold
unnormalised exponentials, so their write pass recomputes them from the
logits block by block.

Where a C++ compiler is available, each block is instead one call of the
compiled kernels of ``kernels/margin_ce_cpu.cpp`` (see ``_cpu_kernels``):
the same four steps fused in one loop per row, for every logits dtype
(16-bit ones computed in float32), with the GIL released for the whole
call, so the worker threads really run in parallel (NumPy's ufuncs take
the GIL back between steps, and with blocks this small the handovers cost
more than the arithmetic). Passes over the N x C logits, per call:

- forward: one read (the exponential pass finds each row in cache);
- loss and gradient, one process: one read of the logits and one write
  of the gradient (each block is finished while in cache);
- loss and gradient under MPI: one read of the logits and one write of
  the exponentials before the collective, one read and write of them
  after (rescaling in place); 16-bit outputs instead re-read the logits.

Memory: O(N) per-row arrays plus one ``BLOCK_BYTES`` buffer per thread
(none with the compiled kernels).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import _cpu_kernels
from ._merge import OWNED, SHIFT, STATS_WIDTH, SUMEXP, TARGET

BLOCK_BYTES = 1 << 19  # per-thread scratch, well inside a 1-2 MiB L2
# Row blocks of the compiled kernels: they need no scratch, and a block's
# Python bookkeeping (about 50 us) must stay small next to its work, so at
# least this size, and otherwise about KERNEL_BLOCKS_PER_THREAD blocks per
# worker (fewer hand-offs, still balanced; measured at N = 512..4096,
# C = 1e4..1e5).
KERNEL_BLOCK_BYTES = 1 << 22
KERNEL_BLOCKS_PER_THREAD = 4
THETA_EPS = 1e-6  # radians; see margin_slope

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_SCRATCH = threading.local()


def num_threads() -> int:
    """Worker threads: ``ARCFACE_CE_NUM_THREADS``, else this rank's cores.

    Ranks of an MPI job on one node share its cores (and busy-poll while
    waiting in a collective), so each takes ``cores // local_ranks``.
    """
    env = os.environ.get("ARCFACE_CE_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    local = 1
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            local = int(value)
            break
    return max(1, cores // local)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                num_threads(), thread_name_prefix="arcface_ce"
            )
    return _POOL


def _scratch(rows: int, cols: int, dtype: Any) -> np.ndarray:
    """A thread-local ``[rows, cols]`` buffer, reused across calls."""
    size = rows * cols
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = np.empty(max(size, 1), dtype=dtype)
        _SCRATCH.buf = buf
    return buf[:size].reshape(rows, cols)


def _run_blocks(
    n: int,
    c: int,
    itemsize: int,
    fn: Callable,
    size: int = BLOCK_BYTES,
    per_thread: int = 0,
) -> None:
    """Call ``fn(r0, r1)`` on row blocks of about ``size`` bytes, or of
    ``n / (per_thread * threads)`` rows if that is more."""
    rows = max(1, size // max(1, c * itemsize))
    if per_thread:
        rows = max(rows, -(-n // (per_thread * num_threads())))
    bounds = [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]
    if len(bounds) <= 1 or num_threads() == 1:
        for r0, r1 in bounds:
            fn(r0, r1)
        return
    for future in [_pool().submit(fn, r0, r1) for r0, r1 in bounds]:
        future.result()


def accumulate_dtype(dtype: Any) -> Any:
    """float64 for float64 logits, float32 for everything narrower."""
    return np.float64 if dtype == np.float64 else np.float32


def margin_target(x: Any, m1: float, m2: float, m3: float, xp: Any = np):
    """``cos(m1 * acos(x) + m2) - m3`` with ``x`` clamped to [-1, 1].

    Rounding can push a cosine to 1.0000001; the clamp keeps acos finite.
    """
    c = xp.clip(x, -1.0, 1.0)
    if m1 == 1.0 and m2 == 0.0:
        return c - m3
    return xp.cos(m1 * xp.arccos(c) + m2) - m3


def margin_slope(x: Any, m1: float, m2: float, xp: Any = np):
    """``d target / dx = m1 sin(m1 theta + m2) / sin(theta)``.

    Exactly 1 without an angular margin. ``theta`` is kept in
    ``[THETA_EPS, pi - THETA_EPS]``: the slope stays finite at
    ``|x| = 1`` and tends to the right limit where one exists (``m1**2``
    for SphereFace, whose numerator vanishes with ``sin(theta)``).
    """
    if m1 == 1.0 and m2 == 0.0:
        return xp.ones_like(x)
    theta = xp.arccos(xp.clip(x, -1.0, 1.0))
    theta = xp.clip(theta, THETA_EPS, np.pi - THETA_EPS)
    return m1 * xp.sin(m1 * theta + m2) / xp.sin(theta)


class NumpyBackend:
    """Row statistics and write pass for NumPy arrays (see ``_core``).

    ``row_stats`` also takes ``finish``: in a single process the global
    statistics of a row block are known as soon as its own are, so the
    driver passes a callable ``finish(r0, r1, stats_block) -> (row_max,
    row_a, row_t)`` and the output block is completed while it is still in
    the cache; ``write`` then has nothing left to do.
    """

    xp = np

    def row_stats(
        self,
        logits,
        label,
        class_start,
        m1,
        m2,
        m3,
        scale,
        out,
        finish=None,
    ):
        n, c = logits.shape
        acc = accumulate_dtype(logits.dtype)
        local = label.astype(np.int64) - class_start
        owned = (local >= 0) & (local < c)
        rows = np.flatnonzero(owned)
        cols = local[rows]
        x_t = logits[rows, cols].astype(np.float64)
        stats = np.zeros((n, STATS_WIDTH), dtype=np.float64)
        z_t = scale * margin_target(x_t, m1, m2, m3)
        stats[rows, TARGET] = z_t.astype(acc)
        stats[:, OWNED] = owned
        # float32/float64 outputs keep the exponentials of the statistics
        # pass and are rescaled (10 % faster than recomputing them from
        # the logits with the compiled kernels, measured); see _floor for
        # what that costs in the smallest entries.
        fused = out is not None and out.dtype == acc
        target_col = np.full(n, -1, dtype=np.int64)
        target_col[rows] = cols
        state = _State(fused, rows, cols, target_col, stats[:, SHIFT])
        state.x_t = x_t  # kept: an in-place output overwrites the logits
        # The caller guarantees that out is logits itself or disjoint from
        # it (_core rejects partial overlaps), so one pointer tells.
        state.inplace = (
            out is not None and out.ctypes.data == logits.ctypes.data
        )
        if c == 0:
            stats[:, SHIFT] = -np.inf
            return stats, state
        floor = _floor(acc, fused)

        def settle(r0: int, r1: int, shift: Any, sums: Any) -> None:
            """Store a block's statistics; finish its output if final."""
            stats[r0:r1, SHIFT] = shift
            stats[r0:r1, SUMEXP] = sums
            if finish is not None and out is not None:
                row_max, row_a, _ = finish(r0, r1, stats[r0:r1])
                self._write_block(
                    out, logits, r0, r1, state, shift, row_max, row_a, scale
                )

        state.kernel = _kernel_for(logits, out)
        if state.kernel is not None:
            name = _cpu_kernels.suffix(logits.dtype)
            fn = getattr(state.kernel, f"mce_cpu_stats_{name}")
            x_ptr, ldx = _rows_pointer(logits)
            ex_ptr, ldex = _rows_pointer(out) if fused else (0, 0)
            shift_all = np.empty(n)
            sum_all = np.empty(n)
            isz = logits.itemsize
            # Addresses once per call, not per block (int64/float64: 8 B).
            t_ptr = target_col.ctypes.data
            sh_ptr, sum_ptr = shift_all.ctypes.data, sum_all.ctypes.data

            def block(r0: int, r1: int) -> None:
                fn(
                    x_ptr + r0 * ldx * isz,
                    ldx,
                    r1 - r0,
                    c,
                    t_ptr + 8 * r0,
                    scale,
                    floor,
                    sh_ptr + 8 * r0,
                    sum_ptr + 8 * r0,
                    ex_ptr + r0 * ldex * isz if fused else None,
                    ldex,
                )
                settle(r0, r1, shift_all[r0:r1], sum_all[r0:r1])

            size, per_thread = KERNEL_BLOCK_BYTES, KERNEL_BLOCKS_PER_THREAD
        else:
            block = self._ufunc_block(
                logits, out, fused, acc, scale, floor, target_col, settle
            )
            size, per_thread = BLOCK_BYTES, 0
        _run_blocks(n, c, np.dtype(acc).itemsize, block, size, per_thread)
        state.done = finish is not None and out is not None
        return stats, state

    @staticmethod
    def _ufunc_block(
        logits, out, fused, acc, scale, floor, target_col, settle
    ) -> Callable[[int, int], None]:
        """The per-block work in NumPy ufuncs (no compiled kernels)."""
        c = logits.shape[1]

        def block(r0: int, r1: int) -> None:
            x = logits[r0:r1]
            buf = out[r0:r1] if fused else _scratch(r1 - r0, c, acc)
            # Infinite or huge logits make their row NaN by design (inf -
            # inf): no warning.
            with np.errstate(invalid="ignore", over="ignore"):
                # 1. buf = scale * x, then the row maximum of its
                #    non-target entries: the target's raw value is not the
                #    logit it contributes (the margin lowers it), so it
                #    must not set the shift (see the compiled kernels).
                if x.dtype == acc:
                    np.multiply(x, acc(scale), out=buf)
                else:
                    np.copyto(buf, x, casting="unsafe")
                    buf *= acc(scale)
                tcol = target_col[r0:r1]
                hit = np.flatnonzero(tcol >= 0)
                buf[hit, tcol[hit]] = -np.inf
                shift = buf.max(axis=1)
                # No finite non-target logit: computed with shift 0, then
                # reported as (-inf, 0), exactly no mass (the clamp would
                # invent some). +inf stays, making the row NaN (inf - inf),
                # as the compiled and CUDA kernels do.
                dead = np.flatnonzero(shift == -np.inf)
                shift[dead] = 0.0
                # 2. buf - shift <= 0, clamped at `floor` so that neither
                #    exp() nor the write pass produce subnormals (slow by
                #    two orders of magnitude on x86); see _floor.
                buf -= shift[:, None]
                low = buf < floor  # 0 there, as in the compiled kernels
                np.clip(buf, floor, 0.0, out=buf)
                # 3. One exponential per element.
                np.exp(buf, out=buf)
                buf[low] = 0.0
                # 4. The target is summed separately (merge step 3).
                _zero_targets(buf, tcol)
                sums = _row_sums(buf)
                sums[dead], shift[dead], buf[dead] = 0.0, -np.inf, 0.0
                settle(r0, r1, shift, sums)

        return block

    def _write_block(
        self, out, logits, r0, r1, state, shift, row_max, row_a, scale
    ):
        """Off-target values of rows ``r0:r1``; block-local row arrays."""
        acc = accumulate_dtype(logits.dtype)
        ob = out[r0:r1]
        if state.fused:
            # ob holds exp(max(scale * x - shift, floor)); rescale rows
            # whose factor keeps every product a normal number.
            with np.errstate(over="ignore", invalid="ignore"):
                factor = row_a * np.exp(shift.astype(np.float64) - row_max)
            ok = (np.abs(factor) >= FACTOR_MIN) | (factor == 0)
            if ok.all() or state.inplace:
                # In place, the logits are gone: multiply even where the
                # products may be subnormal (slower, still exact).
                if state.kernel is not None:
                    _kernel_scale(state.kernel, ob, factor)
                else:
                    ob *= factor.astype(acc)[:, None]
                return
            keep = np.flatnonzero(ok)
            ob[keep] *= factor[keep].astype(acc)[:, None]
            todo = np.flatnonzero(~ok)
        else:
            todo = np.arange(r1 - r0)
        if todo.size == 0:
            return
        if state.kernel is not None and todo.size == r1 - r0:
            _kernel_write(
                state.kernel,
                ob,
                logits[r0:r1],
                state,
                r0,
                _split_offset(shift, row_a, row_max),
                np.sign(row_a),
                scale,
            )
            return
        # Recompute: value = sign(a) * exp((scale * x - sh) + off), see
        # _split_offset; 0 where the exponent is below the floor (so no
        # result is subnormal, and a -inf logit gives exactly 0).
        buf = _scratch(todo.size, logits.shape[1], acc)
        np.copyto(buf, logits[r0:r1][todo], casting="unsafe")
        sh, off = _split_offset(shift[todo], row_a[todo], row_max[todo])
        with np.errstate(over="ignore", invalid="ignore"):
            buf *= acc(scale)  # huge logits: a NaN row anyway
            buf -= sh.astype(acc)[:, None]
            buf += off.astype(acc)[:, None]
            floor = _floor(acc, False)
            low = buf < floor
            np.maximum(buf, floor, out=buf)
            np.exp(buf, out=buf)
        buf[low] = 0.0
        sign = np.sign(row_a[todo])
        if (sign != 1).any():
            buf *= sign.astype(acc)[:, None]
        _zero_targets(buf, state.target_col[r0:r1][todo])
        if todo.size == r1 - r0:
            np.copyto(ob, buf, casting="unsafe")
        else:
            ob[todo] = buf

    def write(
        self,
        out,
        logits,
        label,
        class_start,
        row_max,
        row_a,
        row_t,
        apply_dt,
        m1,
        m2,
        m3,
        scale,
        state,
    ):
        n, c = logits.shape
        if c == 0 or n == 0:
            return
        if not state.done:

            def block(r0: int, r1: int) -> None:
                self._write_block(
                    out,
                    logits,
                    r0,
                    r1,
                    state,
                    state.shift[r0:r1],
                    row_max[r0:r1],
                    row_a[r0:r1],
                    scale,
                )

            acc = accumulate_dtype(logits.dtype)
            if state.kernel is None:
                _run_blocks(n, c, np.dtype(acc).itemsize, block)
            else:
                _run_blocks(
                    n,
                    c,
                    np.dtype(acc).itemsize,
                    block,
                    KERNEL_BLOCK_BYTES,
                    KERNEL_BLOCKS_PER_THREAD,
                )
        rows, cols = state.rows, state.cols
        if rows.size:
            value = row_t[rows]
            if apply_dt:
                value = value * margin_slope(state.x_t, m1, m2)
            # dtarget/dx grows like 1/sin(theta) near |x| = 1; saturate
            # rather than overflow a float16 output to inf.
            big = float(np.finfo(out.dtype).max)
            out[rows, cols] = np.clip(value, -big, big).astype(out.dtype)


# Below this |factor| a fused product of a clamped exponential could be
# subnormal: exp(FUSED_FLOOR) * FACTOR_MIN ~ 1e-37 > FLT_MIN.
FUSED_FLOOR = -60.0
FACTOR_MIN = 1.5e-11


def _floor(acc: Any, fused: bool) -> float:
    """Clamp of ``scale * x - shift`` before exp().

    exp(-87) is the smallest normal float32 order of magnitude; a term
    that small relative to the row maximum cannot change a float32 sum.
    Terms below the floor count as 0. When the exponentials are kept for
    the write pass they must stay large enough that multiplying by the
    row factor stays normal too: there the floor is -60, so float32
    softmax or gradient entries below exp(-60) = 8.8e-27 times the row's
    largest off-target one are written as 0 (the CUDA kernels resolve
    them down to float32's normal range). float64 has room to spare.
    """
    if acc == np.float64:
        return -700.0
    return FUSED_FLOOR if fused else -87.0


def _kernel_for(logits: np.ndarray, out: np.ndarray | None) -> Any:
    """The compiled kernels if they can take these arrays, else None.

    ``out`` is logits itself (element-wise in place, which the kernels
    allow) or disjoint from it: _core rejects partial overlaps.
    """
    if _cpu_kernels.suffix(logits.dtype) is None:
        return None
    if not _cpu_kernels.rows_ok(logits):
        return None
    if out is not None and not _cpu_kernels.rows_ok(out):
        return None
    return _cpu_kernels.library()


def _rows_pointer(a: np.ndarray) -> tuple[int, int]:
    """Address of ``a[0, 0]`` and the row stride in elements."""
    return a.ctypes.data, a.strides[0] // a.itemsize


def _kernel_scale(kernel: Any, ob: np.ndarray, factor: np.ndarray) -> None:
    """``ob *= factor[:, None]`` through the compiled kernel."""
    fn = getattr(kernel, f"mce_cpu_scale_{_cpu_kernels.suffix(ob.dtype)}")
    factor = np.ascontiguousarray(factor, dtype=np.float64)
    ptr, ld = _rows_pointer(ob)
    fn(ptr, ld, ob.shape[0], ob.shape[1], factor.ctypes.data)


def _split_offset(
    shift: np.ndarray, row_a: np.ndarray, row_max: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(sh, off)`` with outputs ``sign(a) exp((scale x - sh) + off)``.

    ``sh`` is the row's own shift from the statistics pass and ``off =
    log|a| - (M - sh)``: ``scale * x - sh`` is formed first, exactly as
    in that pass (both terms may be huge, their difference is small), and
    the small ``off`` is added after. Folding ``M`` into one offset
    would lose the digits of ``scale * x - M`` for large logits.
    """
    sh = np.where(np.isfinite(shift), shift, 0.0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.log(np.abs(row_a)) - (row_max - sh)
    return sh, off


def _kernel_write(
    kernel: Any,
    ob: np.ndarray,
    xb: np.ndarray,
    state: _State,
    r0: int,
    split: tuple[np.ndarray, np.ndarray],
    sign: np.ndarray,
    scale: float,
) -> None:
    """Output rows ``sign(a) exp((scale x - sh) + off)`` from the logits."""
    name = _cpu_kernels.suffix(ob.dtype)
    fn = getattr(kernel, f"mce_cpu_write_{name}")
    shift = np.ascontiguousarray(split[0], dtype=np.float64)
    offset = np.ascontiguousarray(split[1], dtype=np.float64)
    sign = np.ascontiguousarray(sign, dtype=np.float64)
    tcol = np.ascontiguousarray(state.target_col[r0 : r0 + xb.shape[0]])
    x_ptr, ldx = _rows_pointer(xb)
    o_ptr, ldo = _rows_pointer(ob)
    floor = _floor(accumulate_dtype(ob.dtype), False)
    fn(
        x_ptr,
        ldx,
        xb.shape[0],
        xb.shape[1],
        tcol.ctypes.data,
        scale,
        shift.ctypes.data,
        offset.ctypes.data,
        sign.ctypes.data,
        floor,
        o_ptr,
        ldo,
    )


def _zero_targets(buf: np.ndarray, target_col: np.ndarray) -> None:
    hit = np.flatnonzero(target_col >= 0)
    if hit.size:
        buf[hit, target_col[hit]] = 0.0


def _row_sums(buf: np.ndarray) -> np.ndarray:
    """Row sums through a matrix-vector product (twice as fast as sum()).

    BLAS accumulates in the dtype of ``buf``; past ``2**16`` columns a
    float32 row is summed pairwise instead, whose error grows with
    ``log C`` rather than ``C``.
    """
    if buf.dtype == np.float32 and buf.shape[1] > 1 << 16:
        return buf.sum(axis=1)
    ones = np.ones(buf.shape[1], dtype=buf.dtype)
    return buf @ ones


class _State:
    """What ``row_stats`` hands to ``write``."""

    def __init__(self, fused, rows, cols, target_col, shift):
        self.fused = fused
        self.rows = rows
        self.cols = cols
        self.target_col = target_col
        self.shift = shift
        self.done = False
        self.x_t: np.ndarray | None = None
        self.inplace = False
        self.kernel: Any = None
