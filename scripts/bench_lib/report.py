"""Measurement rows, the environment block, CSV, plot and text tables.

Bytes model (used for every implementation, so GB/s is an *effective*
rate against the least traffic the work needs, not what the code moved):

- forward:       read the logits once                 = N * C * b
- forward+grad:  read once for the row statistics, then read once and
                 write the gradient once              = 3 * N * C * b
- device copy:   read once and write once             = 2 * N * C * b

with b the logits' bytes per element and C all classes (all ranks).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from .timing import Stats

BYTES_MODEL = (
    "bytes model: fwd = N*C*b (one read of the logits); "
    "fwd+grad = 3*N*C*b (one read for the statistics, one read + one "
    "write for the gradient); copy = 2*N*C*b; C = all classes"
)
FLOOR_DEFINITION = (
    "floor(fwd+grad) = t(np.max(x, axis=1)) + t(np.exp(x, out=buf)) "
    "(medians added, same run, same array); floor(fwd) = "
    "t(np.max(x, axis=1)) alone (one read without exp: a yardstick)"
)


@dataclass
class Row:
    """One measurement (one implementation, phase and grid cell)."""

    mode: str  # cpu | gpu | mpi
    impl: str
    phase: str  # fwd | fwd+grad | component
    dtype: str
    N: int
    C: int  # all classes (the sum over ranks)
    ranks: int
    repeats: int
    median_s: float
    q25_s: float
    q75_s: float
    min_s: float
    max_s: float
    bytes_model: int
    gbps_effective: float
    collectives_per_call: float
    peak_tracemalloc_bytes: float
    peak_rss_delta_bytes: float
    peak_device_bytes: float
    rank_medians_s: str
    note: str


def bytes_model(phase: str, n: int, c: int, itemsize: int) -> int:
    """Bytes the work needs to move at least (see the module docstring)."""
    factor = {"fwd": 1, "fwd+grad": 3, "copy": 2}.get(phase, 1)
    return factor * n * c * itemsize


def make_row(
    mode: str,
    impl: str,
    phase: str,
    dtype: str,
    n: int,
    c: int,
    itemsize: int,
    stats: Stats,
    ranks: int = 1,
    collectives: float = 0.0,
    mem: tuple[float, float] = (math.nan, math.nan),
    device_bytes: float = math.nan,
    rank_medians: Sequence[float] = (),
    note: str = "",
    model_phase: str | None = None,
) -> Row:
    """Build a :class:`Row`, computing the bytes model and GB/s."""
    nbytes = bytes_model(model_phase or phase, n, c, itemsize)
    gbps = nbytes / stats.median / 1e9 if stats.median > 0 else math.nan
    return Row(
        mode,
        impl,
        phase,
        dtype,
        n,
        c,
        ranks,
        stats.n,
        stats.median,
        stats.q25,
        stats.q75,
        stats.min,
        stats.max,
        nbytes,
        gbps,
        collectives,
        mem[0],
        mem[1],
        device_bytes,
        ";".join(f"{t:.6g}" for t in rank_medians),
        note,
    )


def write_csv(path: Path, rows: Iterable[Row]) -> None:
    """Write the rows, one measurement per line, with a header line."""
    names = [f.name for f in fields(Row)]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(repo: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Machine, library versions, thread pools and relevant variables.

    Call it after the libraries of the run were imported, so that
    threadpoolctl sees their thread pools.
    """
    import numpy as np

    env: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None
        ),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": _version("torch"),
        "mpi4py": _version("mpi4py"),
        "mpich": _version("mpich"),
        "cupy": _version("cupy-cuda12x")
        or _version("cupy-cuda13x")
        or _version("cupy"),
        "ml_dtypes": _version("ml_dtypes"),
        "matplotlib": _version("matplotlib"),
        "threadpoolctl": _version("threadpoolctl"),
        "arcface_ce_commit": _git_commit(repo),
        "environment_variables": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(
                ("OPENBLAS_", "OMP_", "MKL_", "GOTO", "BLIS_", "ARCFACE_CE_")
            )
            or k
            in (
                "NUMEXPR_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS",
                "CUDA_VISIBLE_DEVICES",
            )
        },
        "load_average_at_end": (
            os.getloadavg() if hasattr(os, "getloadavg") else None
        ),
        "bytes_model": BYTES_MODEL,
        "floor_definition": FLOOR_DEFINITION,
    }
    try:
        from threadpoolctl import threadpool_info

        env["threadpools"] = [
            {
                k: d.get(k)
                for k in (
                    "user_api",
                    "internal_api",
                    "num_threads",
                    "version",
                    "threading_layer",
                    "architecture",
                )
            }
            for d in threadpool_info()
        ]
    except ImportError:
        env["threadpools"] = "threadpoolctl not installed"
    if "arcface_ce" in sys.modules:
        from arcface_ce import _cpu_kernels
        from arcface_ce._numpy_backend import num_threads

        env["numpy_backend"] = (
            f"{_cpu_kernels.status()}, {num_threads()} thread(s)"
        )
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env["torch_num_threads"] = torch.get_num_threads()
    env.update(extra)
    return env


def write_environment(path: Path, env: dict[str, Any]) -> None:
    """Write the environment block as JSON beside the CSV."""
    with open(path, "w") as fh:
        json.dump(env, fh, indent=2, default=str)
        fh.write("\n")


def format_environment(env: dict[str, Any]) -> str:
    """A few lines of the environment for the console."""
    pools = env.get("threadpools")
    if isinstance(pools, list):
        pools_txt = ", ".join(
            f"{p['internal_api']}:{p['num_threads']}" for p in pools
        )
    else:
        pools_txt = str(pools)
    return "\n".join(
        [
            f"cpu: {env['cpu_model']} ({env['cpus_usable']} usable of "
            f"{env['cpu_count']})",
            f"python {env['python']}, numpy {env['numpy']}, torch "
            f"{env['torch']}, mpi4py {env['mpi4py']}, cupy {env['cupy']}",
            f"thread pools: {pools_txt}; variables: "
            f"{env['environment_variables']}",
            f"arcface_ce NumPy backend: {env.get('numpy_backend', '-')}",
        ]
    )


def _fmt_bytes(b: float) -> str:
    if not math.isfinite(b):
        return "-"
    return f"{b / 2**20:.0f}M"


def format_rows(rows: Sequence[Row]) -> str:
    """The measurements as an aligned text table."""
    head = (
        f"{'mode':4} {'impl':13} {'phase':9} {'dtype':8} {'N':>6} "
        f"{'C':>9} {'median ms':>10} {'IQR ms':>15} {'n':>3} "
        f"{'GB/s':>7} {'coll':>4} {'mem trc':>8} {'mem rss':>8} "
        f"{'mem dev':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.mode:4} {r.impl:13} {r.phase:9} {r.dtype:8} {r.N:>6} "
            f"{r.C:>9} {r.median_s * 1e3:>10.3f} "
            f"{r.q25_s * 1e3:>7.3f}-{r.q75_s * 1e3:<7.3f} {r.repeats:>3} "
            f"{r.gbps_effective:>7.2f} {r.collectives_per_call:>4g} "
            f"{_fmt_bytes(r.peak_tracemalloc_bytes):>8} "
            f"{_fmt_bytes(r.peak_rss_delta_bytes):>8} "
            f"{_fmt_bytes(r.peak_device_bytes):>8}"
            + (f"  {r.note}" if r.note else "")
        )
    return "\n".join(lines)


def _index(rows: Sequence[Row]) -> dict[tuple, dict[str, Row]]:
    cells: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        key = (r.mode, r.dtype, r.N, r.C, r.phase)
        cells.setdefault(key, {})[r.impl] = r
    return cells


def _ratio(a: Row | None, b: Row | None) -> float:
    if a is None or b is None or b.median_s <= 0:
        return math.nan
    return a.median_s / b.median_s


def _fx(v: float, width: int = 9, unit: str = "x") -> str:
    if not math.isfinite(v):
        return f"{'-':>{width}}"
    return f"{v:>{width - len(unit)}.2f}{unit}"


# Goals of the package for forward+gradient on the CPU.
GOAL_FLOOR = 1.5
GOAL_COMPOSITE = 3.0
GOAL_TORCH = 15.0


def format_ratios(rows: Sequence[Row]) -> str:
    """Ratios of the package against every alternative, per grid cell.

    ``alt/ours`` is how many times faster the package is (> 1 good);
    ``ours/floor`` how many floors the package takes (< 1.5 is the goal).
    """
    out = []
    cells = _index(rows)
    modes = sorted({k[0] for k in cells}, key=["cpu", "mpi", "gpu"].index)
    for mode in modes:
        keys = sorted(
            k for k in cells if k[0] == mode and k[4] in ("fwd", "fwd+grad")
        )
        if mode == "cpu":
            out.append(
                "CPU (single process, group=False): speed-up of the "
                "package = alt/ours; goals for fwd+grad: ours/floor <= "
                f"{GOAL_FLOOR}, composite/ours >= {GOAL_COMPOSITE}, "
                f"torch/ours >= {GOAL_TORCH}"
            )
            out.append(
                f"{'dtype':8} {'N':>6} {'C':>9} {'phase':9} "
                f"{'ours ms':>9} {'ours/floor':>10} {'comp/ours':>9} "
                f"{'torch/ours':>10}  goals"
            )
        elif mode == "mpi":
            out.append(
                "MPI (classes split over ranks; time = max over ranks): "
                "speed-up of the package = alt/ours"
            )
            out.append(
                f"{'dtype':8} {'N':>6} {'C':>9} {'phase':9} "
                f"{'ours ms':>9} {'ours/floor':>10} {'paddle/ours':>11} "
                f"{'coll ours':>9} {'coll paddle':>11}"
            )
        else:
            out.append(
                "GPU: speed-up of the package = alt/ours; copy bw "
                "fraction = (model bytes / ours time) / copy bandwidth"
            )
            out.append(
                f"{'dtype':8} {'N':>6} {'C':>9} {'phase':9} "
                f"{'ours ms':>9} {'torch/ours':>10} {'copy GB/s':>9} "
                f"{'of copy bw':>10}"
            )
        for key in keys:
            cell = cells[key]
            ours = cell.get("package")
            _, dtype, n, c, phase = key
            ours_ms = ours.median_s * 1e3 if ours else math.nan
            lead = f"{dtype:8} {n:>6} {c:>9} {phase:9} {ours_ms:>9.3f}"
            if mode == "cpu":
                r_floor = _ratio(ours, cell.get("floor"))
                r_comp = _ratio(cell.get("composite"), ours)
                r_torch = _ratio(cell.get("torch"), ours)
                goals = ""
                if phase == "fwd+grad" and ours is not None:
                    goals = " ".join(
                        f"{name}:{_goal(v, ok)}"
                        for name, v, ok in (
                            ("floor", r_floor, r_floor <= GOAL_FLOOR),
                            ("comp", r_comp, r_comp >= GOAL_COMPOSITE),
                            ("torch", r_torch, r_torch >= GOAL_TORCH),
                        )
                    )
                out.append(
                    f"{lead} {_fx(r_floor, 10)} {_fx(r_comp)} "
                    f"{_fx(r_torch, 10)}  {goals}"
                )
            elif mode == "mpi":
                pad = cell.get("paddle-style")
                out.append(
                    f"{lead} {_fx(_ratio(ours, cell.get('floor')), 10)} "
                    f"{_fx(_ratio(pad, ours), 11)} "
                    f"{_coll(ours):>9} {_coll(pad):>11}"
                )
            else:
                copy = cells.get((mode, dtype, n, c, "copy"), {}).get("copy")
                frac = math.nan
                copy_bw = math.nan
                if copy is not None and ours is not None:
                    copy_bw = copy.gbps_effective
                    frac = ours.gbps_effective / copy_bw
                out.append(
                    f"{lead} {_fx(_ratio(cell.get('torch-cuda'), ours), 10)}"
                    f" {copy_bw:>9.1f} {_fx(frac, 10, '')}"
                )
        if mode == "cpu" and any(
            k[1] in ("float16", "bfloat16") for k in keys
        ):
            out.append(
                "note: NumPy's max over float16/bfloat16 arrays is a scalar "
                "loop (see floor:max above), so the floor of 16-bit rows is "
                "loose: their ours/floor flatters the package"
            )
        out.append("")
    return "\n".join(out).rstrip()


def _goal(v: float, ok: bool) -> str:
    if not math.isfinite(v):
        return "n/a"
    return "ok" if ok else "MISS"


def _coll(r: Row | None) -> str:
    return "-" if r is None else f"{r.collectives_per_call:g}"


def plot(path: Path, rows: Sequence[Row], title: str) -> bool:
    """Median time against C, one line per implementation and N.

    One panel per (phase, dtype); the shaded band is the interquartile
    range.  Returns False when there is nothing to plot.
    """
    rows = [r for r in rows if r.phase in ("fwd", "fwd+grad", "copy")]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [
        p
        for p in ("fwd", "fwd+grad", "copy")
        if any(r.phase == p for r in rows)
    ]
    dtypes = sorted({r.dtype for r in rows})
    fig, axes = plt.subplots(
        len(phases),
        len(dtypes),
        squeeze=False,
        figsize=(4.5 * len(dtypes), 3.6 * len(phases)),
    )
    for i, phase in enumerate(phases):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            sel = [r for r in rows if r.phase == phase and r.dtype == dtype]
            for impl, n in sorted({(r.impl, r.N) for r in sel}):
                line = sorted(
                    (r for r in sel if r.impl == impl and r.N == n),
                    key=lambda r: r.C,
                )
                cs = [r.C for r in line]
                ax.plot(
                    cs,
                    [r.median_s * 1e3 for r in line],
                    marker="o",
                    label=f"{impl} N={n}",
                )
                ax.fill_between(
                    cs,
                    [r.q25_s * 1e3 for r in line],
                    [r.q75_s * 1e3 for r in line],
                    alpha=0.2,
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("C (classes, all ranks)")
            ax.set_ylabel("median time per call [ms]")
            ax.set_title(f"{phase}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
