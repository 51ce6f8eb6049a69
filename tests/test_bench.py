"""Smoke tests of the benchmark CLI ``scripts/bench.py``.

The CLI runs in a subprocess on tiny sizes; nothing here asserts a time.
Its correctness gate and its GPU harness (with NumPy standing in for
CuPy) are also exercised in process.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench.py"
sys.path.insert(0, str(REPO / "scripts"))

from bench_lib.grid import Grid, gate  # noqa: E402
from bench_lib.impls import CompositeImpl, PackageImpl  # noqa: E402
from bench_lib.reference import Margins, reference_loss_and_grad  # noqa: E402
from bench_lib.timing import Plan  # noqa: E402


def _package_ready() -> bool:
    if importlib.util.find_spec("arcface_ce") is None:
        return False
    import arcface_ce

    return hasattr(arcface_ce, "margin_cross_entropy_and_grad")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
    )
    env["MPLBACKEND"] = "Agg"
    return env


def _run(cmd: list[str], timeout: float) -> str:
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_reference_matches_the_worked_example() -> None:
    # The float64 example of the loss contract (per-row losses).
    x = np.array(
        [
            [0.85204151, -0.55557678, 0.04994566, 0.71986042],
            [-0.20198586, -0.35270476, -0.55182702, 0.09749021],
        ]
    )
    loss, grad = reference_loss_and_grad(x, np.array([2, 3]), Margins())
    expected = (82.37059615 + 12.13448407) / 2
    assert abs(loss - expected) <= 1e-8 * expected, (loss, expected)
    # Off-target gradient = scale / N * softmax; the example prints the
    # softmax to 8 decimals.
    want = np.array([0.99978819, 0.0, 0.00021181])
    got = grad[0, [0, 1, 3]] / (64.0 / 2)
    worst = int(np.argmax(np.abs(got - want)))
    assert np.allclose(got, want, rtol=0, atol=6e-9), (worst, got, want)


class _NoTargetDerivative(CompositeImpl):
    """A plausible bug: the margin's derivative at the target left out."""

    name = "broken"

    def forward_grad(self, m: Margins) -> tuple[object, object]:
        loss, grad = super().forward_grad(m)
        rows = np.arange(self.x.shape[0])
        x = np.clip(self.x[rows, self.label].astype(np.float64), -1, 1)
        theta = np.arccos(x)
        d = m.margin1 * np.sin(m.margin1 * theta + m.margin2) / np.sin(theta)
        grad[rows, self.label] /= d
        return loss, grad


def test_gate_refuses_a_wrong_gradient() -> None:
    lines: list[str] = []
    passed = gate(
        [CompositeImpl(), _NoTargetDerivative()], "float32", lines.append
    )
    assert [i.name for i in passed] == ["composite"], lines
    bad = [ln for ln in lines if ln.startswith("check broken float32:")]
    assert len(bad) == 1 and "FAILED" in bad[0], lines
    assert "worst at (" in bad[0], bad[0]
    assert any("broken is not timed" in ln for ln in lines), lines


def test_quick_run_writes_csv_plot_and_ratios_last(tmp_path: Path) -> None:
    out = _run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--N",
            "8",
            "--C",
            "64,256",
            "--dtypes",
            "float32",
            "--no-gpu",
            "--out",
            str(tmp_path),
        ],
        timeout=240,
    )
    assert "check composite float32: OK" in out, out
    if _package_ready():
        assert "check package float32: OK" in out, out
    torch_ok = "check torch float32: OK" in out
    assert torch_ok or "torch not installed" in out, out
    assert "FAILED" not in out, out

    rows = _read_csv(tmp_path / "single.csv")
    impls = {"composite", "floor"} | (
        {"package"} if _package_ready() else set()
    )
    impls |= {"torch"} if torch_ok else set()
    for impl in impls:
        for phase in ("fwd", "fwd+grad"):
            for c in ("64", "256"):
                sel = [
                    r
                    for r in rows
                    if (r["impl"], r["phase"], r["C"]) == (impl, phase, c)
                ]
                assert len(sel) == 1, (impl, phase, c, sel)
                med = float(sel[0]["median_s"])
                assert math.isfinite(med) and med > 0, sel[0]
                assert (
                    float(sel[0]["q25_s"]) <= med <= float(sel[0]["q75_s"])
                ), sel[0]
    assert (tmp_path / "single_cpu.png").read_bytes()[:4] == b"\x89PNG"
    env = json.loads((tmp_path / "single_env.json").read_text())
    for key in ("cpu_model", "python", "numpy", "threadpools"):
        assert key in env, sorted(env)

    # The ratio table comes last: nothing but its rows after its title.
    tail = out[out.rindex("=== ratios ===") :].strip().splitlines()
    assert tail[1].startswith("CPU"), tail
    assert tail[-1].startswith("float32"), tail
    assert "comp/ours" in tail[2], tail


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


@pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or _mpiexec() is None,
    reason="mpi4py or mpiexec not installed",
)
def test_two_rank_run_counts_collectives(tmp_path: Path) -> None:
    out = _run(
        [
            str(_mpiexec()),
            "-n",
            "2",
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--N",
            "8",
            "--C",
            "100",
            "--dtypes",
            "float32",
            "--out",
            str(tmp_path),
        ],
        timeout=240,
    )
    assert "check paddle-style float32 (mpi): OK" in out, out
    if _package_ready():
        assert "check package float32 (mpi): OK" in out, out
    rows = _read_csv(tmp_path / "mpi2.csv")
    coll = {
        (r["impl"], r["phase"]): float(r["collectives_per_call"]) for r in rows
    }
    # Paddle's pattern: four Allreduce calls forward, one more backward.
    assert coll[("paddle-style", "fwd")] == 4, coll
    assert coll[("paddle-style", "fwd+grad")] == 5, coll
    if _package_ready():
        assert coll[("package", "fwd+grad")] >= 1, coll
    assert all(r["ranks"] == "2" for r in rows), rows
    assert "paddle/ours" in out[out.rindex("=== ratios ===") :], out


def _numpy_as_cupy() -> types.ModuleType:
    """Just enough of CuPy's surface, backed by NumPy, for the harness."""
    fake = types.ModuleType("fake_cupy")
    fake.__dict__.update(
        {k: v for k, v in np.__dict__.items() if not k.startswith("__")}
    )

    class _Pool:
        def malloc(self, size: int) -> None:
            return None

        def total_bytes(self) -> int:
            return 0

        def free_bytes(self) -> int:
            return 0

        def free_all_blocks(self) -> None:
            return None

    class _Sync:
        def synchronize(self) -> None:
            return None

    class _Using:
        def __init__(self, _alloc: object) -> None:
            pass

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            return None

    fake.asnumpy = np.asarray
    fake.get_default_memory_pool = _Pool
    fake.random = types.SimpleNamespace(default_rng=np.random.default_rng)
    fake.cuda = types.SimpleNamespace(
        Device=_Sync,
        get_current_stream=_Sync,
        MemoryPool=_Pool,
        using_allocator=_Using,
        runtime=types.SimpleNamespace(memGetInfo=lambda: (2**34, 2**34)),
    )
    return fake


@pytest.mark.skipif(not _package_ready(), reason="arcface_ce not ready")
def test_gpu_harness_with_numpy_standing_in_for_cupy() -> None:
    from bench_lib.gpu import run_gpu

    import arcface_ce

    lines: list[str] = []
    grid = Grid([4], [50, 300], ["float32"], Plan(1, 2, 2, 0.0), Margins())
    rows = run_gpu(grid, _numpy_as_cupy(), arcface_ce, None, lines.append)
    assert "check package float32: OK" in "\n".join(lines), lines
    got = sorted((r.impl, r.phase, r.C) for r in rows)
    want = sorted(
        (impl, phase, c)
        for c in (50, 300)
        for impl, phase in (
            ("copy", "copy"),
            ("package", "fwd"),
            ("package", "fwd+grad"),
        )
    )
    assert got == want, got
    assert all(r.mode == "gpu" and r.median_s > 0 for r in rows), rows
    # The harness must hand the package the stand-in's arrays unchanged.
    impl = PackageImpl(arcface_ce, xp=_numpy_as_cupy())
    impl.setup(np.zeros((2, 3), np.float32), np.zeros(2, np.int64))
    assert impl.x.dtype == np.float32
