"""Model parallel loss over MPI ranks (``mpiexec -n 2`` / ``-n 3``).

Every rank builds the same full problem from the same seed, keeps its
contiguous block of classes and checks its loss, softmax columns and
gradient columns against the single-process float64 reference of the whole
problem. Errors must be raised on every rank and leave nobody inside a
collective: each error test then makes a normal call that must work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import (
    FLOAT_DTYPES,
    assert_close,
    backend_params,
    tolerances,
)
from reference import margin_ce_reference

import arcface_ce
from arcface_ce import margin_cross_entropy, margin_cross_entropy_and_grad

# The thread method ends a rank stuck inside MPI (where a signal handler
# never runs); its exit makes the launcher end the other ranks.
pytestmark = [pytest.mark.mpi, pytest.mark.timeout(60, method="thread")]

REDUCTIONS = ["mean", "sum", None, "none"]

# Classes per rank, in rank order: uneven, empty ranks, fewer classes than
# ranks.
SHARDS = {
    2: [[4, 8], [0, 5], [1, 3], [1, 0]],
    3: [[1, 4, 7], [0, 3, 2], [1, 0, 1], [0, 1, 0]],
}
N_CASES = 4


def shards_for(size: int, case: int) -> list[int]:
    if size in SHARDS:
        return SHARDS[size][case]
    generic = [
        [r % 3 + 1 for r in range(size)],
        [0] + [r + 1 for r in range(1, size)],
        [1 - r % 2 for r in range(size)],
        [1] + [0] * (size - 1),
    ]
    return generic[case]


class Problem:
    """The full problem and this rank's slice of it."""

    def __init__(
        self,
        comm: Any,
        shards: list[int],
        n: int = 6,
        dtype: Any = np.float64,
        seed: int = 0,
    ) -> None:
        self.total = sum(shards)
        self.start = sum(shards[: comm.rank])
        self.stop = self.start + shards[comm.rank]
        rng = np.random.default_rng(seed)
        self.full = rng.uniform(-1.0, 1.0, size=(n, self.total)).astype(dtype)
        self.label = rng.integers(0, self.total, size=n)
        self.local = np.ascontiguousarray(self.full[:, self.start : self.stop])

    def cols(self, a: np.ndarray) -> np.ndarray:
        return a[:, self.start : self.stop]


def assert_same_bits_everywhere(comm: Any, a: np.ndarray, what: str) -> None:
    everyone = comm.allgather(np.asarray(a).tobytes())
    differ = [r for r, b in enumerate(everyone) if b != everyone[0]]
    assert not differ, f"{what}: ranks {differ} differ from rank 0 in bits"


def check_problem(
    comm: Any, p: Problem, reduction: Any, group: Any = None
) -> None:
    """Loss, softmax and gradient of this rank against the reference."""
    group = comm if group is None else group
    ref = margin_ce_reference(p.full, p.label, reduction=reduction)
    loss, softmax = margin_cross_entropy(
        p.local,
        p.label,
        group=group,
        return_softmax=True,
        reduction=reduction,
    )
    loss2, grad = margin_cross_entropy_and_grad(
        p.local, p.label, group=group, reduction=reduction
    )
    n = p.local.shape[0]
    g = 1.0 / n if reduction == "mean" else 1.0
    tol = tolerances(p.local.dtype, 64.0, g)
    for name, out, shape in (
        ("loss", loss, ref.loss.shape),
        ("loss of _and_grad", loss2, ref.loss.shape),
        ("softmax", softmax, p.local.shape),
        ("grad", grad, p.local.shape),
    ):
        assert isinstance(out, np.ndarray), f"{name}: {type(out)}"
        assert out.dtype == p.local.dtype, f"{name}: {out.dtype}"
        assert out.shape == shape, f"{name}: {out.shape} != {shape}"
    assert_close(loss, ref.loss, *tol["loss"], what="loss")
    assert_close(loss2, ref.loss, *tol["loss"], what="loss of _and_grad")
    assert_close(softmax, p.cols(ref.softmax), *tol["softmax"], what="softmax")
    assert_close(grad, p.cols(ref.grad), *tol["grad"], what="grad")
    assert_same_bits_everywhere(comm, loss, "loss")
    assert_same_bits_everywhere(comm, loss2, "loss of _and_grad")
    assert loss.tobytes() == loss2.tobytes(), "_and_grad loss differs"


# ---------------------------------------------------------- correctness


@pytest.mark.parametrize("case", range(N_CASES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "dtype", FLOAT_DTYPES, ids=[dt.name for dt in FLOAT_DTYPES]
)
def test_matches_reference(
    world: Any, dtype: Any, reduction: Any, case: int
) -> None:
    p = Problem(world, shards_for(world.size, case), dtype=dtype, seed=case)
    check_problem(world, p, reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float16_statistics_across_ranks(world: Any, reduction: str) -> None:
    # 70,000 classes of exp(64) split over the ranks: float16 partial sums
    # would overflow; the merged loss must stay finite and correct.
    total = 70_000
    base, extra = divmod(total, world.size)
    shards = [base + (r < extra) for r in range(world.size)]
    start = sum(shards[: world.rank])
    full = np.ones((2, total), dtype=np.float16)
    label = np.array([7, total - 1])
    local = full[:, start : start + shards[world.rank]]
    ref = margin_ce_reference(full, label, reduction=reduction)
    loss = margin_cross_entropy(local, label, group=world, reduction=reduction)
    assert np.isfinite(loss.astype(np.float64)).all(), f"loss {loss}"
    assert_close(loss, ref.loss, *tolerances(np.float16, 64.0)["loss"], "loss")
    assert_same_bits_everywhere(world, loss, "loss")


def test_many_rows(world: Any) -> None:
    p = Problem(world, shards_for(world.size, 0), n=300, seed=9)
    check_problem(world, p, "mean")


def test_empty_batch(world: Any) -> None:
    p = Problem(world, shards_for(world.size, 0), n=0)
    for reduction, expect in (("sum", 0.0), ("none", None)):
        loss, softmax = margin_cross_entropy(
            p.local,
            p.label,
            group=world,
            return_softmax=True,
            reduction=reduction,
        )
        assert softmax.shape == p.local.shape
        if expect is None:
            assert loss.shape == (0, 1), loss.shape
        else:
            assert loss == expect, loss
    loss = margin_cross_entropy(p.local, p.label, group=world)
    assert np.isnan(loss), loss


# ---------------------------------------------------------- groups


def test_group_none_means_world(world: Any) -> None:
    p = Problem(world, shards_for(world.size, 0), seed=3)
    check_problem(world, p, "none", group=None)
    with_world = margin_cross_entropy(p.local, p.label, group=world)
    with_none = margin_cross_entropy(p.local, p.label, group=None)
    assert with_none.tobytes() == with_world.tobytes()


def test_group_false_means_local(world: Any) -> None:
    # Different N and C on every rank: only a purely local call works.
    rng = np.random.default_rng(100 + world.rank)
    n, c = 3 + world.rank, 5 + 2 * world.rank
    logits = rng.uniform(-1.0, 1.0, size=(n, c))
    label = rng.integers(0, c, size=n)
    ref = margin_ce_reference(logits, label, reduction="none")
    loss, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, reduction="none"
    )
    tol = tolerances(np.float64, 64.0)
    assert_close(loss, ref.loss, *tol["loss"], what="local loss")
    assert_close(grad, ref.grad, *tol["grad"], what="local grad")


def test_sub_communicator(world: Any) -> None:
    # A split communicator: ranks 0..k-1 and the rest work independently.
    color = int(world.rank >= (world.size + 1) // 2)
    sub = world.Split(color, world.rank)
    try:
        shards = [2 + r for r in range(sub.size)]
        p = Problem(sub, shards, seed=40 + color)
        check_problem(sub, p, "sum")
    finally:
        sub.Free()


# ---------------------------------------------------------- errors


def _next_call_works(world: Any) -> None:
    """After an error, a normal call must go through on every rank."""
    p = Problem(world, shards_for(world.size, 0), seed=77)
    check_problem(world, p, "mean")


@pytest.mark.parametrize("where", ["one", "all"])
@pytest.mark.parametrize("bad", [-1, "total", 2**40])
def test_bad_label(world: Any, where: str, bad: Any) -> None:
    p = Problem(world, shards_for(world.size, 0), seed=5)
    label = p.label.copy()
    value = p.total if bad == "total" else bad
    if where == "all" or world.rank == 0:
        label[1] = value
    with pytest.raises(IndexError, match="label") as e:
        margin_cross_entropy(p.local, label, group=world)
    assert isinstance(e.value, ValueError), type(e.value).__mro__
    assert isinstance(e.value, arcface_ce.LabelError), type(e.value)
    _next_call_works(world)


@pytest.mark.parametrize("func", ["loss", "and_grad"])
def test_bad_label_last_rank(world: Any, func: str) -> None:
    p = Problem(world, shards_for(world.size, 1), seed=6)
    label = p.label.copy()
    if world.rank == world.size - 1:
        label[0] = p.total
    f = (
        margin_cross_entropy
        if func == "loss"
        else margin_cross_entropy_and_grad
    )
    with pytest.raises(arcface_ce.LabelError, match="label"):
        f(p.local, label, group=world)
    _next_call_works(world)


def test_float_label_on_one_rank(world: Any) -> None:
    p = Problem(world, shards_for(world.size, 0), seed=7)
    label = p.label.astype(np.float64) if world.rank == 1 else p.label
    with pytest.raises(TypeError):
        margin_cross_entropy(p.local, label, group=world)
    _next_call_works(world)


def test_rows_differ_on_one_rank(world: Any) -> None:
    p = Problem(world, shards_for(world.size, 0), seed=8)
    logits, label = p.local, p.label
    if world.rank == world.size - 1:
        logits = np.concatenate([logits, logits[:1]])
        label = np.concatenate([label, label[:1]])
    with pytest.raises(ValueError):
        margin_cross_entropy(logits, label, group=world)
    _next_call_works(world)


def test_unsupported_dtype_on_one_rank(world: Any) -> None:
    p = Problem(world, shards_for(world.size, 0), seed=9)
    logits = p.local.astype(np.int32) if world.rank == 0 else p.local
    with pytest.raises(TypeError):
        margin_cross_entropy(logits, p.label, group=world)
    _next_call_works(world)


def test_bad_reduction_on_one_rank(world: Any) -> None:
    p = Problem(world, shards_for(world.size, 0), seed=10)
    reduction = "avg" if world.rank == 1 else "mean"
    with pytest.raises(ValueError):
        margin_cross_entropy(
            p.local, p.label, group=world, reduction=reduction
        )
    _next_call_works(world)


def test_mixed_float_dtypes_raise_everywhere(world: Any) -> None:
    # float32 on rank 0, float64 elsewhere: the ranks could not return
    # identical bits, so every rank raises ValueError.
    p = Problem(world, shards_for(world.size, 0), seed=11)
    logits = p.local.astype(np.float32) if world.rank == 0 else p.local
    with pytest.raises(ValueError, match="same on every rank"):
        margin_cross_entropy(logits, p.label, group=world)
    _next_call_works(world)


@pytest.mark.parametrize(
    "argument",
    [
        {"scale": 30.0},
        {"margin2": 0.3},
        {"margin1": 1.35},
        {"reduction": "sum"},
    ],
    ids=["scale", "margin2", "margin1", "reduction"],
)
def test_arguments_differ_on_one_rank(world: Any, argument: dict) -> None:
    p = Problem(world, shards_for(world.size, 1), seed=21)
    kwargs = argument if world.rank == world.size - 1 else {}
    with pytest.raises(ValueError, match="same on every rank"):
        margin_cross_entropy_and_grad(p.local, p.label, group=world, **kwargs)
    _next_call_works(world)


def test_labels_that_fool_a_linear_checksum(world: Any) -> None:
    # [1, 7] and [4, 6] have the same sum of label * (2i + 1); with 2 of
    # 8 classes per rank each row still has exactly one owner.
    # (With more ranks a row may get two owners instead: also ValueError.)
    shards = [
        8 // world.size + (r < 8 % world.size) for r in range(world.size)
    ]
    p = Problem(world, shards, n=2, seed=22)
    label = np.array([1, 7]) if world.rank == 0 else np.array([4, 6])
    match = "same labels" if world.size == 2 else None
    with pytest.raises(ValueError, match=match):
        margin_cross_entropy(p.local, label, group=world)
    _next_call_works(world)


def test_class_split_changes_back_to_a_cached_one(world: Any) -> None:
    # Rank 0's class count changes while the others' stay: their cached
    # total is stale, and a label valid under the new total must not be
    # rejected against the old one.
    rng = np.random.default_rng(23)
    for first in (5, 3, 5, 2, 5):
        shards = [first] + [5] * (world.size - 1)
        total = sum(shards)
        full = rng.uniform(-1, 1, (4, total)).astype(np.float64)
        label = np.array([total - 1, 0, total // 2, 1])
        start = sum(shards[: world.rank])
        local = np.ascontiguousarray(
            full[:, start : start + shards[world.rank]]
        )
        loss = margin_cross_entropy(local, label, group=world)
        ref = margin_ce_reference(full, label)
        assert_close(
            loss,
            ref.loss,
            *tolerances(np.float64, 64.0)["loss"],
            what=f"loss with shards {shards}",
        )


@pytest.mark.parametrize(
    "bad", ["out_list", "out_overlap", "softmax_flag", "grad_loss_str"]
)
def test_bad_optional_argument_on_one_rank(world: Any, bad: str) -> None:
    p = Problem(world, shards_for(world.size, 0), seed=24)
    odd = world.rank == world.size - 1
    with pytest.raises((TypeError, ValueError)):
        if bad == "softmax_flag":
            margin_cross_entropy(
                p.local,
                p.label,
                group=world,
                return_softmax="yes" if odd else True,
            )
        elif bad == "grad_loss_str":
            margin_cross_entropy_and_grad(
                p.local, p.label, group=world, grad_loss="a" if odd else 1.0
            )
        else:
            big = np.zeros(p.local.size + 3, dtype=p.local.dtype)
            logits = big[: p.local.size].reshape(p.local.shape)
            logits[...] = p.local
            if bad == "out_list":
                out: Any = [[0.0]] if odd else None
            else:
                out = big[3:].reshape(p.local.shape) if odd else None
            margin_cross_entropy_and_grad(
                logits, p.label, group=world, out=out
            )
    _next_call_works(world)


# ---------------------------------------------------------- emulated


@pytest.mark.timeout(300, method="thread")
@pytest.mark.parametrize(
    ("backend", "reduction"),
    backend_params(("emulated", "mean"), ("emulated", "none")),
    indirect=["backend"],
)
def test_emulated_backend(world: Any, backend: str, reduction: str) -> None:
    p = Problem(world, shards_for(world.size, 2), n=4, seed=12)
    check_problem(world, p, reduction)
    for i, dtype in enumerate(FLOAT_DTYPES):
        q = Problem(
            world, shards_for(world.size, i), n=3, dtype=dtype, seed=13 + i
        )
        check_problem(world, q, reduction)


def test_bad_group_on_one_rank(world: Any) -> None:
    # One rank passes group=True, the others None (COMM_WORLD, which the
    # world fixture is): the bad rank reports through COMM_WORLD, so
    # nobody waits.
    p = Problem(world, shards_for(world.size, 0), seed=25)
    group: Any = True if world.rank == 0 else None
    with pytest.raises(TypeError, match="group:"):
        margin_cross_entropy(p.local, p.label, group=group)
    _next_call_works(world)


def test_negative_zero_margin_is_the_same_argument(world: Any) -> None:
    p = Problem(world, shards_for(world.size, 1), seed=26)
    margin3 = -0.0 if world.rank == 0 else 0.0
    loss = margin_cross_entropy(p.local, p.label, group=world, margin3=margin3)
    assert_same_bits_everywhere(world, loss, "loss")


@pytest.mark.parametrize("kind", ["null", "freed"])
def test_null_or_freed_communicator_on_one_rank(world: Any, kind: str) -> None:
    from mpi4py import MPI

    p = Problem(world, shards_for(world.size, 0), seed=27)
    group: Any = None
    if world.rank == 0:
        if kind == "null":
            group = MPI.COMM_NULL
        else:
            group = MPI.COMM_SELF.Dup()
            group.Free()
    with pytest.raises(TypeError, match="group:"):
        margin_cross_entropy_and_grad(p.local, p.label, group=group)
    _next_call_works(world)


def test_allgather_rows_bad_group_on_one_rank(world: Any) -> None:
    from arcface_ce.head import allgather_rows

    group: Any = "world" if world.rank == world.size - 1 else None
    with pytest.raises(TypeError, match="group:"):
        allgather_rows(np.ones((2, 3)), group=group)
    rows, counts = allgather_rows(np.ones((2, 3)), group=world)
    assert counts.tolist() == [2] * world.size
