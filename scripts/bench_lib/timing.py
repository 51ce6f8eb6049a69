"""Wall-clock timing with warm-up, robust summaries, and peak memory.

Times are taken with ``time.perf_counter`` around a single call, after a
``sync()`` that drains queued device work before and after, so a GPU
time includes the launch overhead a caller sees.  The garbage collector
is paused inside the timed loop.

Peak extra memory of one (untimed) call is measured two ways:

- ``tracemalloc``: the peak of NumPy's traced allocations during the call
  minus what was traced before it; it sees NumPy buffers (and CuPy host
  objects) but not PyTorch's or a C extension's own allocations;
- RSS: the kernel's resident high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus the resident size before the call;
  it sees every allocator, includes the returned arrays, and is NaN
  where the reset is not permitted.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in seconds."""

    median: float
    q25: float
    q75: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: np.ndarray) -> Stats:
        """Median, quartiles and extremes of ``samples``."""
        s = np.asarray(samples, dtype=np.float64)
        q25, med, q75 = np.percentile(s, [25, 50, 75])
        return cls(
            float(med),
            float(q25),
            float(q75),
            float(s.min()),
            float(s.max()),
            int(s.size),
        )

    def plus(self, other: Stats) -> Stats:
        """Sum of two independent timings (each statistic added)."""
        return Stats(
            self.median + other.median,
            self.q25 + other.q25,
            self.q75 + other.q75,
            self.min + other.min,
            self.max + other.max,
            min(self.n, other.n),
        )


@dataclass(frozen=True)
class Plan:
    """How many calls to make: warm-up, then at least ``min_repeats``
    and then more until ``budget_s`` seconds were spent, at most
    ``max_repeats``."""

    warmup: int
    min_repeats: int
    max_repeats: int
    budget_s: float


def time_calls(
    fn: Callable[[], Any],
    plan: Plan,
    sync: Callable[[], None] = lambda: None,
    barrier: Callable[[], None] | None = None,
    fixed: bool = False,
) -> np.ndarray:
    """Per-call wall-clock times of ``fn()`` in seconds.

    Parameters
    ----------
    fn : callable
        The call to time; its result is dropped after ``sync()``.
    plan : Plan
        Warm-up and repeat counts.
    sync : callable
        Drains device work; called before starting and after each call.
    barrier : callable, optional
        Called before each call (MPI: align the ranks' starts).
    fixed : bool
        Make exactly ``plan.min_repeats`` calls (every MPI rank must make
        the same number of calls, so no time budget there).

    Returns
    -------
    ndarray of float64, shape (repeats,)
    """
    for _ in range(plan.warmup):
        if barrier is not None:
            barrier()
        fn()
        sync()
    times = []
    spent = 0.0
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        while True:
            if barrier is not None:
                barrier()
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            dt = time.perf_counter() - t0
            del out
            times.append(dt)
            spent += dt
            n = len(times)
            if fixed:
                if n >= plan.min_repeats:
                    break
            elif n >= plan.max_repeats or (
                n >= plan.min_repeats and spent >= plan.budget_s
            ):
                break
    finally:
        if was_enabled:
            gc.enable()
    return np.asarray(times)


def _proc_status_kib(field: str) -> float:
    """A ``/proc/self/status`` field in KiB (NaN where unreadable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def _reset_rss_peak() -> bool:
    """Reset the resident high-water mark (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_extra_memory(fn: Callable[[], Any]) -> tuple[float, float]:
    """Peak extra bytes of one call: (tracemalloc, RSS high-water delta).

    Both include the arrays the call returns; NaN where not measurable.
    """
    gc.collect()
    can_rss = _reset_rss_peak()
    rss0 = _proc_status_kib("VmRSS")
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    traced0 = tracemalloc.get_traced_memory()[0]
    try:
        out = fn()
        traced_peak = tracemalloc.get_traced_memory()[1]
    finally:
        if started:
            tracemalloc.stop()
    hwm = _proc_status_kib("VmHWM")
    del out
    rss = (hwm - rss0) * 1024.0 if can_rss else float("nan")
    return float(traced_peak - traced0), rss
