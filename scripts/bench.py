#!/usr/bin/env python3
"""Benchmark of ``arcface_ce`` against the alternatives a user has.

Run from the repository root::

    python scripts/bench.py                 # default grid, ~2-3 min
    python scripts/bench.py --quick         # seconds
    mpiexec -n 2 python scripts/bench.py    # classes split over 2 ranks

What it does, in order:

1. checks every implementation against a float64 NumPy reference on a
   small input (``check <impl> <dtype>: OK|FAILED``) and refuses to
   time one that fails;
2. single process: times forward (loss only) and forward+gradient of
   the package (``group=False``), the NumPy composite of Paddle's steps,
   the PyTorch eager composite with autograd (if torch is installed) and
   the floor, over the grid of N, C and dtypes;
   under an MPI launcher with several ranks: the package with
   ``group=COMM_WORLD`` against a Paddle-style reference with five
   blocking Allreduce calls per step, time = max over ranks;
3. when CuPy sees a GPU (single process): the package on CuPy arrays,
   the PyTorch CUDA composite and a device copy;
4. writes ``<tag>.csv`` (one measurement per line), ``<tag>_env.json``
   (machine, versions, thread pools, variables) and ``<tag>_cpu.png`` /
   ``<tag>_gpu.png`` (time against C) into ``--out``, with tag
   ``single`` or ``mpi<ranks>``, and prints the table of ratios last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_lib.grid import Grid, run_cpu  # noqa: E402
from bench_lib.impls import CompositeImpl, Impl, PackageImpl, TorchImpl  # noqa: E402
from bench_lib.mpi import world_size_from_launcher  # noqa: E402
from bench_lib.reference import Margins  # noqa: E402
from bench_lib.report import (  # noqa: E402
    BYTES_MODEL,
    FLOOR_DEFINITION,
    Row,
    environment,
    format_environment,
    format_ratios,
    format_rows,
    plot,
    write_csv,
    write_environment,
)
from bench_lib.timing import Plan  # noqa: E402

ALL_IMPLS = ("package", "composite", "torch")

# name: (N list, C list, dtypes, warmup, min repeats, max repeats, budget s)
PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "N": [512],
        "C": [10_000, 30_000, 100_000],
        "dtypes": ["float32", "float16"],
        "warmup": 1,
        "min_repeats": 5,
        "max_repeats": 30,
        "budget": 0.5,
        "gpu_N": [512, 4096],
        "gpu_C": [100_000, 1_000_000],
        "gpu_dtypes": ["float32", "float16"],
    },
    "quick": {
        "N": [512],
        "C": [10_000, 100_000],
        "dtypes": ["float32"],
        "warmup": 1,
        "min_repeats": 3,
        "max_repeats": 10,
        "budget": 0.2,
        "gpu_N": [512],
        "gpu_C": [100_000, 1_000_000],
        "gpu_dtypes": ["float32"],
    },
}


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(float(t)) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers, got {text!r}"
        )
    return vals


def _name_list(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        vals = [t.strip() for t in text.split(",") if t.strip()]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {choices}, got {text!r}"
            )
        return vals

    return parse


DTYPES = ("float32", "float64", "float16", "bfloat16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset grid options come from the profile."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small grid and few repeats (seconds; longer with torch)",
    )
    p.add_argument("--N", type=_int_list, help="rows, e.g. 512,2048")
    p.add_argument(
        "--C",
        type=_int_list,
        help="classes (all ranks together), e.g. 1e4,1e5",
    )
    p.add_argument(
        "--dtypes",
        type=_name_list(DTYPES),
        help=f"subset of {','.join(DTYPES)}",
    )
    p.add_argument(
        "--impls",
        type=_name_list(ALL_IMPLS),
        default=list(ALL_IMPLS),
        help="implementations to run besides the floor "
        f"(default {','.join(ALL_IMPLS)})",
    )
    p.add_argument("--warmup", type=int, help="untimed calls first")
    p.add_argument(
        "--min-repeats",
        type=int,
        help="timed calls at least (exactly, under MPI)",
    )
    p.add_argument("--max-repeats", type=int, help="timed calls at most")
    p.add_argument(
        "--budget",
        type=float,
        help="seconds per measurement after min-repeats",
    )
    p.add_argument(
        "--margins",
        type=float,
        nargs=3,
        default=(1.0, 0.5, 0.0),
        metavar=("M1", "M2", "M3"),
    )
    p.add_argument("--scale", type=float, default=64.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data",
        choices=("normal", "uniform"),
        default="normal",
        help="logits: 'normal' (trained-model-like: non-target N(0, 0.1), "
        "target U(0.2, 0.8)) or 'uniform' (U(-0.9, 0.9))",
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the (untimed) peak-memory calls",
    )
    p.add_argument(
        "--no-cpu",
        action="store_true",
        help="skip the CPU grid (e.g. to run the GPU grid only)",
    )
    p.add_argument(
        "--no-gpu",
        action="store_true",
        help="skip the GPU grid even when CuPy sees a device",
    )
    p.add_argument("--gpu-N", type=_int_list)
    p.add_argument("--gpu-C", type=_int_list)
    p.add_argument("--gpu-dtypes", type=_name_list(DTYPES))
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench_out"),
        help="output folder (default bench_out/)",
    )
    args = p.parse_args(argv)
    prof = PROFILES["quick" if args.quick else "default"]
    for key, val in prof.items():
        if getattr(args, key, None) is None:
            setattr(args, key, val)
    if args.min_repeats < 1 or args.max_repeats < args.min_repeats:
        p.error("need 1 <= --min-repeats <= --max-repeats")
    if args.warmup < 0 or args.budget < 0:
        p.error("--warmup and --budget must be >= 0")
    return args


def _say(msg: str) -> None:
    print(msg, flush=True)


def import_package() -> tuple[ModuleType | None, str]:
    """``arcface_ce`` (from the repository if not installed), or a note."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    try:
        import arcface_ce
    except Exception as exc:  # missing, or broken while being written
        return None, f"arcface_ce not importable ({type(exc).__name__}: {exc})"
    missing = [
        f
        for f in ("margin_cross_entropy", "margin_cross_entropy_and_grad")
        if not hasattr(arcface_ce, f)
    ]
    if len(missing) == 2:
        return None, "arcface_ce has neither public function yet"
    note = f"arcface_ce lacks {missing[0]}" if missing else ""
    return arcface_ce, note


def import_torch() -> tuple[ModuleType | None, str]:
    """``torch`` or a note saying why it is skipped."""
    try:
        import torch
    except ImportError:
        return None, "torch not installed: the torch composite is skipped"
    return torch, ""


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    m1, m2, m3 = args.margins
    margins = Margins(m1, m2, m3, args.scale)
    plan = Plan(args.warmup, args.min_repeats, args.max_repeats, args.budget)
    grid = Grid(
        args.N,
        args.C,
        args.dtypes,
        plan,
        margins,
        args.seed,
        measure_memory=not args.no_memory,
        data=args.data,
    )
    ranks = world_size_from_launcher()
    tag = "single" if ranks == 1 else f"mpi{ranks}"
    # Checked on every rank alike, before any collective or measurement.
    if min(args.C) < ranks:
        print(
            f"--C: every C must be at least the number of ranks ({ranks}) "
            f"to split the classes, got {min(args.C)}",
            file=sys.stderr,
        )
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        print(f"--out: cannot write to {args.out}: {exc}", file=sys.stderr)
        return 2

    module, note = (None, "package not selected")
    if "package" in args.impls:
        module, note = import_package()
    rank = 0
    if ranks > 1:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    say = _say if rank == 0 else (lambda _msg: None)
    if note:
        say(f"note: {note}")
    say(
        f"margins m1={margins.margin1} m2={margins.margin2} "
        f"m3={margins.margin3} scale={margins.scale}, reduction='mean'"
    )
    say(f"data: {args.data} (see --help)")
    say(BYTES_MODEL)
    say(FLOOR_DEFINITION)

    rows: list[Row] = []
    extra: dict[str, Any] = {
        "run": tag,
        "argv": sys.argv[1:],
        "load_average_at_start": (
            os.getloadavg() if hasattr(os, "getloadavg") else None
        ),
    }
    torch: ModuleType | None = None
    if ranks > 1:
        from bench_lib.mpi import run_mpi

        mpi_plan = Plan(
            args.warmup,
            max(args.min_repeats, 5),
            args.max_repeats,
            args.budget,
        )
        mpi_grid = Grid(
            args.N,
            args.C,
            args.dtypes,
            mpi_plan,
            margins,
            args.seed,
            measure_memory=not args.no_memory,
            data=args.data,
        )
        say(
            f"MPI: {ranks} ranks, classes split evenly, "
            f"{mpi_plan.min_repeats} timed calls per measurement"
        )
        rows += run_mpi(mpi_grid, module, say)
        extra["mpi_library"] = MPI.Get_library_version().splitlines()[0]
    else:
        if "torch" in args.impls:
            torch, tnote = import_torch()
            if tnote:
                say(f"note: {tnote}")
        if not args.no_cpu:
            impls: list[Impl] = []
            if module is not None:
                impls.append(PackageImpl(module, group=False))
            if "composite" in args.impls:
                impls.append(CompositeImpl())
            if torch is not None:
                impls.append(TorchImpl(torch, "cpu"))
            rows += run_cpu(grid, impls, say)
        rows += _maybe_gpu(args, grid, module, torch, say, extra)

    if rank != 0:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"{tag}.csv"
    write_csv(csv_path, rows)
    env = environment(REPO, extra)
    write_environment(args.out / f"{tag}_env.json", env)
    pngs = []
    for mode in ("cpu", "mpi", "gpu"):
        sel = [r for r in rows if r.mode == mode]
        path = args.out / f"{tag}_{mode}.png"
        if plot(path, sel, f"arcface_ce benchmark, {mode} ({tag})"):
            pngs.append(path)
    say("")
    say(format_environment(env))
    say("")
    say(format_rows(rows))
    say("")
    say(
        f"wrote {csv_path}, {args.out / (tag + '_env.json')}, "
        + ", ".join(str(p) for p in pngs)
        + f" in {time.perf_counter() - t_start:.0f} s"
    )
    say("")
    say("=== ratios ===")
    say(format_ratios(rows) or "(no measurements)")
    return 0


def _maybe_gpu(
    args: argparse.Namespace,
    grid: Grid,
    module: ModuleType | None,
    torch: ModuleType | None,
    say: Any,
    extra: dict[str, Any],
) -> list[Row]:
    """The GPU grid when CuPy sees a device (and it was not turned off)."""
    if args.no_gpu:
        return []
    from bench_lib.gpu import device_name, gpu_available, run_gpu

    cupy, why = gpu_available()
    if cupy is None:
        say(f"note: GPU grid skipped: {why}")
        extra["gpu"] = why
        return []
    extra["gpu"] = device_name(cupy)
    say(f"GPU: {extra['gpu']}")
    gpu_plan = Plan(
        max(args.warmup, 3),
        max(args.min_repeats, 10),
        200,
        max(args.budget, 0.3),
    )
    gpu_grid = Grid(
        args.gpu_N,
        args.gpu_C,
        args.gpu_dtypes,
        gpu_plan,
        grid.margins,
        grid.seed,
        data=grid.data,
    )
    if torch is None and "torch" in args.impls:
        torch, _ = import_torch()
    return run_gpu(gpu_grid, cupy, module, torch, say)


if __name__ == "__main__":
    sys.exit(main())
