"""The benchmark grid and the CPU (single process) run over it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .impls import FloorPasses, Impl
from .reference import Margins, check_implementation, dtype_from_name
from .report import Row, make_row
from .timing import Plan, Stats, peak_extra_memory, time_calls


@dataclass(frozen=True)
class Grid:
    """Sizes, dtypes and call counts of one run."""

    Ns: Sequence[int]
    Cs: Sequence[int]
    dtypes: Sequence[str]
    plan: Plan
    margins: Margins
    seed: int = 0
    measure_memory: bool = True
    data: str = "normal"


def make_timing_input(
    n: int,
    c: int,
    dtype: np.dtype,
    seed: int,
    data: str = "normal",
    label: np.ndarray | None = None,
    class_start: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of ``dtype`` for timing, and int64 labels.

    Parameters
    ----------
    n, c : int
        Rows and (local) classes.
    dtype : numpy.dtype
        Logits dtype.
    seed : int
        Seed of the generator.
    data : {"normal", "uniform"}
        ``"normal"``: like a trained model, non-target cosines from
        N(0, 0.1) and target cosines uniform in [0.2, 0.8];
        ``"uniform"``: every cosine uniform in [-0.9, 0.9] (with the
        default scale most softmax entries then underflow).
    label : ndarray of int64, shape (N,), optional
        Global labels (drawn in [0, c) when None).
    class_start : int
        Global id of local column 0 (model parallel).
    """
    rng = np.random.default_rng(seed)
    if label is None:
        label = rng.integers(0, c, size=n, dtype=np.int64)
    gen = np.float64 if dtype == np.float64 else np.float32
    if data == "uniform":
        x = rng.random((n, c), dtype=gen)
        x *= 1.8
        x -= 0.9
    else:
        x = rng.standard_normal((n, c), dtype=gen)
        x *= 0.1
        np.clip(x, -1.0, 1.0, out=x)
        owned = np.flatnonzero(
            (label >= class_start) & (label < class_start + c)
        )
        x[owned, label[owned] - class_start] = rng.uniform(
            0.2, 0.8, size=owned.size
        )
    if x.dtype != dtype:
        x = x.astype(dtype)
    return x, label


def gate(
    impls: Sequence[Impl],
    dtype_name: str,
    say: Callable[[str], None],
    margins: Margins | None = None,
) -> list[Impl]:
    """Check each implementation against float64; return those that pass.

    The check covers fixed margin settings and ``margins`` (the run's own).
    Prints one ``check <impl> <dtype>: OK|FAILED ...`` line each.
    """
    passed = []
    extra = () if margins is None else (margins,)
    for impl in impls:
        res = check_implementation(
            *impl.check_callables(), dtype_name, extra=extra
        )
        impl.release()
        word = "OK" if res.ok else "FAILED"
        say(f"check {impl.name} {dtype_name}: {word} {res.detail}")
        if res.ok:
            passed.append(impl)
        else:
            say(f"  -> {impl.name} is not timed for {dtype_name}")
    return passed


def run_cpu(
    grid: Grid,
    impls: Sequence[Impl],
    say: Callable[[str], None],
) -> list[Row]:
    """Check, then time every implementation and the floor on the CPU."""
    rows: list[Row] = []
    m = grid.margins
    floor = FloorPasses()
    for dtype_name in grid.dtypes:
        dtype = dtype_from_name(dtype_name)
        ok = gate(impls, dtype_name, say, grid.margins)
        for n in grid.Ns:
            for c in grid.Cs:
                x, label = make_timing_input(n, c, dtype, grid.seed, grid.data)
                for impl in ok:
                    try:
                        impl.setup(x, label)
                        for phase, fn in phases_of(impl):
                            row = _measure(
                                grid,
                                impl,
                                phase,
                                fn,
                                m,
                                dtype_name,
                                n,
                                c,
                                dtype.itemsize,
                            )
                            rows.append(row)
                            say(_progress(row))
                    except Exception as exc:  # e.g. MemoryError
                        say(
                            f"  cpu {impl.name} {dtype_name} N={n} C={c}: "
                            f"failed ({type(exc).__name__}: {exc}), skipped"
                        )
                    finally:
                        impl.release()
                floor.setup(x)
                t_max = Stats.of(time_calls(floor.max_pass, grid.plan))
                t_exp = Stats.of(time_calls(floor.exp_pass, grid.plan))
                floor.release()
                for impl_name, phase, stats, model in (
                    ("floor:max", "component", t_max, "fwd"),
                    ("floor:exp", "component", t_exp, "copy"),
                    ("floor", "fwd", t_max, "fwd"),
                    ("floor", "fwd+grad", t_max.plus(t_exp), "fwd+grad"),
                ):
                    row = make_row(
                        "cpu",
                        impl_name,
                        phase,
                        dtype_name,
                        n,
                        c,
                        dtype.itemsize,
                        stats,
                        model_phase=model,
                    )
                    rows.append(row)
                    say(_progress(row))
                del x, label
    return rows


def phases_of(impl: Impl) -> list[tuple[str, Callable[[Margins], Any]]]:
    """The phases an implementation offers, with their methods."""
    out: list[tuple[str, Callable[[Margins], Any]]] = []
    if impl.has_forward:
        out.append(("fwd", impl.forward))
    if impl.has_forward_grad:
        out.append(("fwd+grad", impl.forward_grad))
    return out


def _measure(
    grid: Grid,
    impl: Impl,
    phase: str,
    fn: Callable[[Margins], object],
    m: Margins,
    dtype_name: str,
    n: int,
    c: int,
    itemsize: int,
) -> Row:
    times = time_calls(lambda: fn(m), grid.plan, impl.sync)
    mem = (float("nan"), float("nan"))
    if grid.measure_memory:
        mem = peak_extra_memory(lambda: fn(m))
    note = ""
    if impl.name == "torch":
        note = "torch allocations: see mem rss"
    return make_row(
        "cpu",
        impl.name,
        phase,
        dtype_name,
        n,
        c,
        itemsize,
        Stats.of(times),
        mem=mem,
        note=note,
    )


def _progress(r: Row) -> str:
    return (
        f"  {r.mode} {r.impl:10} {r.phase:9} {r.dtype:8} N={r.N} C={r.C}: "
        f"median {r.median_s * 1e3:.3f} ms "
        f"(IQR {r.q25_s * 1e3:.3f}-{r.q75_s * 1e3:.3f}, n={r.repeats})"
    )
