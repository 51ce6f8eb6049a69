"""Smoke tests of the digits training demo (scripts/train_digits.py).

The script runs in a subprocess, in a single process unless stated, with
every MPI launcher variable removed from its environment so that it does
not join the MPI job this test suite may itself be running in.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_digits.py"
TIMEOUT = 120

EPOCH = re.compile(
    r"^epoch +(\d+)/(\d+) +loss (\d+\.\d+) +time (\d+\.\d+)s$", re.M
)
SUMMARY = re.compile(
    r"^SUMMARY ranks=(\d+) classes=([\d+]+) device=(\w+) epochs=(\d+) "
    r"train_time=(\d+\.\d+)s first_loss=(\d+\.\d+) final_loss=(\d+\.\d+) "
    r"accuracy=(\d\.\d{4}) pair_auc=(\d\.\d{4}) "
    r"pair_accuracy=(\d\.\d{4}) threshold=(-?\d\.\d{4})$",
    re.M,
)
_MPI_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA_", "MV2_")


def _clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(_MPI_PREFIXES)
    }
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    return env


def run_demo(*args: str, launcher: list[str] | None = None):
    cmd = (launcher or []) + [sys.executable, str(SCRIPT), *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_clean_env(),
        cwd=ROOT,
    )


def check_output(proc, ranks: int, epochs: int, blocks: str) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = EPOCH.findall(proc.stdout)
    assert [int(e) for e, *_ in lines] == list(range(1, epochs + 1)), (
        "one progress line per epoch, from one rank only:\n" + proc.stdout
    )
    losses = [float(loss) for _, _, loss, _ in lines]
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    found = SUMMARY.findall(proc.stdout)
    assert len(found) == 1, "expected one summary line:\n" + proc.stdout
    (n, classes, _, ep, _, first, final, acc, auc, pair_acc, _) = found[0]
    assert (int(n), classes, int(ep)) == (ranks, blocks, epochs)
    assert float(first) == pytest.approx(losses[0], abs=1e-6)
    assert float(final) == pytest.approx(losses[-1], abs=1e-6)
    # Even 2 epochs separate the digits far better than chance.
    assert float(acc) > 0.5, proc.stdout
    assert 0.5 < float(auc) <= 1.0, proc.stdout
    assert 0.0 <= float(pair_acc) <= 1.0, proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("SUMMARY")


def test_demo_single_process_trains():
    proc = run_demo("--epochs", "3", "--device", "cpu", "--seed", "1")
    check_output(proc, ranks=1, epochs=3, blocks="10")


def test_demo_fails_when_accuracy_is_below_target():
    proc = run_demo("--epochs", "1", "--device", "cpu", "--min-accuracy", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "below --min-accuracy" in proc.stdout


def test_demo_rejects_bad_arguments():
    proc = run_demo("--epochs", "0")
    assert proc.returncode == 2
    assert "--epochs" in proc.stderr


@pytest.mark.slow
def test_demo_two_ranks_split_classes_unevenly():
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        if found is None:
            pytest.skip("no mpiexec found")
        mpiexec = Path(found)
    pytest.importorskip("mpi4py")
    proc = run_demo(
        "--epochs", "2", "--device", "cpu", launcher=[str(mpiexec), "-n", "2"]
    )
    check_output(proc, ranks=2, epochs=2, blocks="4+6")
