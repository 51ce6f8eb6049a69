"""Tests of the model-parallel margin head (arcface_ce.head).

Every gradient is checked against central finite differences of a float64
reference loss written here from the formulas, not from the library. The
``mpi`` tests compare the head split over ``COMM_WORLD`` with the same head
in one process; run them with ``mpiexec -n 2`` (or more).
"""

from __future__ import annotations

import numpy as np
import pytest

import arcface_ce
from arcface_ce.head import MarginHead, allgather_rows, split_classes

# (margin1, margin2, margin3): each margin alone, then all three together.
MARGINS = [
    (1.35, 0.0, 0.0),
    (1.0, 0.3, 0.0),
    (1.0, 0.0, 0.2),
    (1.2, 0.2, 0.1),
]
try:
    import ml_dtypes
except ImportError:  # pragma: no cover - optional
    ml_dtypes = None

# Tolerance of the analytic gradient against float64 finite differences,
# relative to the largest gradient entry.
GRAD_TOL = {
    "float64": 1e-7,
    "float32": 2e-4,
    "float16": 3e-3,
    "bfloat16": 2e-2,
}
HALF_DTYPES = [np.dtype(np.float16)]
if ml_dtypes is not None:
    HALF_DTYPES.append(np.dtype(ml_dtypes.bfloat16))
SCALE = 4.0


def reference_loss(feats, weight, labels, m1, m2, m3, scale, reduction):
    """Margin softmax cross entropy from the formulas, float64."""
    feats = np.asarray(feats, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    f_hat = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    w_hat = weight / np.linalg.norm(weight, axis=0, keepdims=True)
    cos = f_hat @ w_hat
    rows = np.arange(len(labels))
    theta = np.arccos(np.clip(cos[rows, labels], -1.0, 1.0))
    z = scale * cos
    z[rows, labels] = scale * (np.cos(m1 * theta + m2) - m3)
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    per_row = lse - z[rows, labels]
    return per_row.mean() if reduction == "mean" else per_row.sum()


def finite_differences(fn, x, h=1e-6):
    """Central differences of the scalar ``fn`` at every entry of ``x``."""
    grad = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        up = fn(x)
        x[idx] = old - h
        down = fn(x)
        x[idx] = old
        grad[idx] = (up - down) / (2 * h)
    return grad


def assert_close(actual, expected, tol, what):
    """Relative-to-max comparison that names the worst index."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.size == 0:
        return
    err = np.abs(actual - expected)
    bound = tol * max(1.0, float(np.abs(expected).max()))
    worst = np.unravel_index(int(err.argmax()), err.shape)
    assert err[worst] <= bound, (
        f"{what}: worst error {err[worst]:.3e} > {bound:.3e} at index "
        f"{tuple(int(i) for i in worst)}: got {actual[worst]!r}, "
        f"expected {expected[worst]!r}"
    )


def problem(seed, n=5, d=6, c=7):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d))
    weight = rng.normal(size=(d, c))
    labels = rng.integers(0, c, size=n)
    return feats, weight, labels


# ---------------------------------------------------------------------------
# split_classes


def test_split_classes_equal_blocks_cover_every_class():
    assert split_classes(10, 3).tolist() == [0, 3, 6, 10]
    assert split_classes(2, 4).tolist() == [0, 0, 1, 1, 2]
    assert split_classes(0, 2).tolist() == [0, 0, 0]


def test_split_classes_weights():
    assert split_classes(10, 2, weights=[2, 3]).tolist() == [0, 4, 10]
    assert split_classes(10, 3, weights=[2, 3, 4]).tolist() == [0, 2, 6, 10]
    assert split_classes(5, 3, weights=[1, 0, 1]).tolist() == [0, 3, 3, 5]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 2, None), "total_classes"),
        ((4, 0, None), "size"),
        ((4, 2, [1.0]), "weights: expected 2 values"),
        ((4, 2, [1.0, -1.0]), "non-negative"),
        ((4, 2, [0.0, 0.0]), "not all 0"),
    ],
)
def test_split_classes_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        split_classes(*args)


# ---------------------------------------------------------------------------
# single process, group=False


@pytest.mark.parametrize("margins", MARGINS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradients_match_finite_differences(margins, reduction):
    feats, weight, labels = problem(1)
    head = MarginHead(weight, group=False, scale=SCALE, **_named(margins))
    loss, g_feats, g_weight = head.forward_backward(
        feats, labels, reduction=reduction
    )

    def loss_of(f, w):
        return reference_loss(f, w, labels, *margins, SCALE, reduction)

    assert_close(loss, loss_of(feats, weight), 1e-12, "loss")
    fd_feats = finite_differences(lambda f: loss_of(f, weight), feats.copy())
    fd_weight = finite_differences(lambda w: loss_of(feats, w), weight.copy())
    assert_close(g_feats, fd_feats, GRAD_TOL["float64"], "grad_features")
    assert_close(g_weight, fd_weight, GRAD_TOL["float64"], "grad_weight")


def test_float32_gradients_and_dtypes():
    margins = MARGINS[-1]
    feats, weight, labels = problem(2, n=6, d=5, c=9)
    head = MarginHead(
        weight.astype(np.float32), group=False, scale=SCALE, **_named(margins)
    )
    loss, g_feats, g_weight = head.forward_backward(
        feats.astype(np.float32), labels.astype(np.int32)
    )
    assert loss.dtype == g_feats.dtype == g_weight.dtype == np.float32

    def loss_of(f, w):
        return reference_loss(f, w, labels, *margins, SCALE, "mean")

    fd_feats = finite_differences(lambda f: loss_of(f, weight), feats.copy())
    fd_weight = finite_differences(lambda w: loss_of(feats, w), weight.copy())
    assert_close(loss, loss_of(feats, weight), 1e-6, "loss")
    assert_close(g_feats, fd_feats, GRAD_TOL["float32"], "grad_features")
    assert_close(g_weight, fd_weight, GRAD_TOL["float32"], "grad_weight")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: d.name)
def test_half_precision_inputs(dtype):
    # Normalisation and matmuls run in float32; the logits reach the loss
    # in the input dtype. Compared on the inputs rounded to that dtype.
    margins = MARGINS[-1]
    feats, weight, labels = problem(2, n=6, d=5, c=9)
    feats = feats.astype(dtype).astype(np.float64)
    weight = weight.astype(dtype).astype(np.float64)
    head = MarginHead(
        weight.astype(dtype), group=False, scale=SCALE, **_named(margins)
    )
    loss, g_feats, g_weight = head.forward_backward(
        feats.astype(dtype), labels
    )
    assert loss.dtype == g_feats.dtype == g_weight.dtype == dtype

    def loss_of(f, w):
        return reference_loss(f, w, labels, *margins, SCALE, "mean")

    fd_feats = finite_differences(lambda f: loss_of(f, weight), feats.copy())
    fd_weight = finite_differences(lambda w: loss_of(feats, w), weight.copy())
    tol = GRAD_TOL[dtype.name]
    assert_close(loss, loss_of(feats, weight), tol, "loss")
    assert_close(g_feats, fd_feats, tol, "grad_features")
    assert_close(g_weight, fd_weight, tol, "grad_weight")


def test_gradients_scale_invariance_of_inputs():
    # The normalisation makes the loss independent of each row's length,
    # so the feature gradient is orthogonal to the feature and shrinks
    # as 1 / |f|.
    feats, weight, labels = problem(3)
    head = MarginHead(weight, group=False, scale=SCALE)
    _, g1, _ = head.forward_backward(feats, labels)
    _, g3, _ = head.forward_backward(3.0 * feats, labels)
    assert_close(3.0 * g3, g1, 1e-12, "3 * grad(3 f)")
    assert_close(
        (g1 * feats).sum(axis=1), np.zeros(len(feats)), 1e-12, "<g,f>"
    )


def test_zero_feature_row_stays_finite():
    feats, weight, labels = problem(4)
    feats[2] = 0.0
    head = MarginHead(weight, group=False, scale=SCALE)
    loss, g_feats, g_weight = head.forward_backward(feats, labels)
    assert np.isfinite(loss)
    assert np.isfinite(g_feats).all() and np.isfinite(g_weight).all()


def test_logits_and_predict_match_reference():
    feats, weight, labels = problem(5, n=8, c=11)
    head = MarginHead(weight, group=False)
    f_hat = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    w_hat = weight / np.linalg.norm(weight, axis=0, keepdims=True)
    assert_close(head.logits(feats), f_hat @ w_hat, 1e-14, "logits")
    np.testing.assert_array_equal(
        head.predict(feats), (f_hat @ w_hat).argmax(axis=1)
    )


def test_weight_is_read_at_call_time():
    feats, weight, labels = problem(6)
    head = MarginHead(weight, group=False, scale=SCALE)
    before = head.forward_backward(feats, labels)[0]
    head.weight = weight[:, ::-1].copy()
    after = head.forward_backward(feats, labels)[0]
    expected = reference_loss(
        feats, weight[:, ::-1], labels, 1.0, 0.5, 0.0, SCALE, "mean"
    )
    assert before != after
    assert_close(after, expected, 1e-12, "loss after update")


def test_empty_local_batch():
    _, weight, _ = problem(7)
    head = MarginHead(weight, group=False, scale=SCALE)
    loss, g_feats, g_weight = head.forward_backward(
        np.zeros((0, 6)), np.zeros(0, dtype=np.int64), reduction="sum"
    )
    assert float(loss) == 0.0
    assert g_feats.shape == (0, 6)
    assert_close(g_weight, np.zeros_like(weight), 0.0, "grad_weight")


@pytest.mark.parametrize(
    ("feats", "labels", "exc", "match"),
    [
        (np.zeros((3, 5)), np.zeros(3, np.int64), ValueError, r"\(n, 6\)"),
        (np.zeros((3, 6)), np.zeros(2, np.int64), ValueError, "labels"),
        (np.zeros((3, 6)), np.zeros(3), TypeError, "integer"),
        (
            np.zeros((3, 6), np.float32),
            np.zeros(3, np.int64),
            TypeError,
            "float64",
        ),
    ],
)
def test_bad_batch_is_rejected(feats, labels, exc, match):
    head = MarginHead(problem(8)[1], group=False)
    with pytest.raises(exc, match=match):
        head.forward_backward(feats, labels)


def test_bad_label_value_and_reduction():
    feats, weight, _ = problem(9)
    head = MarginHead(weight, group=False)
    with pytest.raises(arcface_ce.LabelError, match="7"):
        head.forward_backward(feats, np.array([0, 1, 7, 2, 3]))
    with pytest.raises(ValueError, match="reduction"):
        head.forward_backward(feats, np.zeros(5, np.int64), reduction="none")


@pytest.mark.parametrize(
    ("weight", "exc", "match"),
    [
        (np.zeros(4), ValueError, r"shape \(D, C\)"),
        (np.zeros((4, 3), np.int64), TypeError, "float"),
    ],
)
def test_bad_weight_is_rejected(weight, exc, match):
    with pytest.raises(exc, match=match):
        MarginHead(weight, group=False)


def test_allgather_rows_without_communication_is_identity():
    x = np.arange(6.0).reshape(3, 2)
    rows, counts = allgather_rows(x, group=False)
    assert rows is x and counts.tolist() == [3]


def _named(margins):
    m1, m2, m3 = margins
    return {"margin1": m1, "margin2": m2, "margin3": m3}


# ---------------------------------------------------------------------------
# model parallel: the same head split over COMM_WORLD


def _world():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        pytest.skip("needs several MPI ranks (run under mpiexec -n 2)")
    return comm


def _rows_of(comm, n):
    """Uneven row blocks: rank r gets r rows more than rank 0 (0 first)."""
    bounds = split_classes(n, comm.Get_size(), np.arange(comm.Get_size()))
    r = comm.Get_rank()
    return slice(int(bounds[r]), int(bounds[r + 1]))


@pytest.mark.mpi
@pytest.mark.parametrize("margins", MARGINS)
def test_split_head_equals_single_process_head(margins):
    comm = _world()
    size, rank = comm.Get_size(), comm.Get_rank()
    feats, weight, labels = problem(10, n=9, d=6, c=10)
    # Uneven class blocks, the last rank owning the most.
    bounds = split_classes(10, size, np.arange(1, size + 1))
    cols = slice(int(bounds[rank]), int(bounds[rank + 1]))
    rows = _rows_of(comm, 9)
    kwargs = dict(scale=SCALE, **_named(margins))

    split = MarginHead(weight[:, cols].copy(), group=comm, **kwargs)
    assert split.class_start == bounds[rank]
    assert split.total_classes == 10
    loss, g_feats, g_weight = split.forward_backward(feats[rows], labels[rows])
    whole = MarginHead(weight, group=False, **kwargs)
    loss1, g_feats1, g_weight1 = whole.forward_backward(feats, labels)

    losses = comm.allgather(float(loss))
    assert len(set(losses)) == 1, f"loss differs between ranks: {losses}"
    assert_close(loss, loss1, 1e-12, "loss")
    assert_close(g_feats, g_feats1[rows], 1e-12, "grad_features")
    assert_close(g_weight, g_weight1[:, cols], 1e-12, "grad_weight")
    ref = reference_loss(feats, weight, labels, *margins, SCALE, "mean")
    assert_close(loss, ref, 1e-12, "loss vs reference")

    predicted = split.predict(feats[rows])
    f_hat = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    w_hat = weight / np.linalg.norm(weight, axis=0, keepdims=True)
    np.testing.assert_array_equal(predicted, (f_hat @ w_hat).argmax(axis=1))
    assert_close(
        split.logits(feats[rows]), (f_hat @ w_hat)[:, cols], 1e-14, "logits"
    )


@pytest.mark.mpi
def test_allgather_rows_uneven():
    comm = _world()
    rank = comm.Get_rank()
    x = np.full((rank, 3), float(rank))
    rows, counts = allgather_rows(x, group=comm)
    assert counts.tolist() == list(range(comm.Get_size()))
    expected = np.concatenate(
        [np.full((r, 3), float(r)) for r in range(comm.Get_size())]
    )
    assert_close(rows, expected, 0.0, "gathered rows")


@pytest.mark.mpi
def test_bad_shape_on_one_rank_raises_everywhere():
    comm = _world()
    rank = comm.Get_rank()
    feats, weight, labels = problem(11, n=4, d=6, c=2 * comm.Get_size())
    head = MarginHead(weight[:, 2 * rank : 2 * rank + 2].copy(), group=comm)
    bad = feats[:, :5] if rank == comm.Get_size() - 1 else feats
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        head.forward_backward(bad, labels)
    # The communicator is still usable afterwards.
    loss = head.forward_backward(feats, labels)[0]
    assert len(set(comm.allgather(float(loss)))) == 1


@pytest.mark.mpi
def test_bad_label_on_one_rank_raises_everywhere():
    comm = _world()
    rank = comm.Get_rank()
    feats, weight, labels = problem(12, n=4, d=6, c=2 * comm.Get_size())
    head = MarginHead(weight[:, 2 * rank : 2 * rank + 2].copy(), group=comm)
    if rank == 0:
        labels = labels.copy()
        labels[1] = 2 * comm.Get_size()
    with pytest.raises(ValueError, match=str(2 * comm.Get_size())):
        head.forward_backward(feats, labels)


@pytest.mark.mpi
@pytest.mark.parametrize(
    "bad", ["reduction", "features_list", "scale_str", "weight_list"]
)
def test_bad_argument_on_one_rank_raises_everywhere(bad):
    comm = _world()
    rank = comm.Get_rank()
    odd = rank == comm.Get_size() - 1
    feats, weight, labels = problem(13, n=4, d=6, c=2 * comm.Get_size())
    shard = weight[:, 2 * rank : 2 * rank + 2].copy()
    if bad in ("scale_str", "weight_list"):
        kwargs = {"scale": "x"} if bad == "scale_str" and odd else {}
        arg = shard.tolist() if bad == "weight_list" and odd else shard
        with pytest.raises(TypeError, match="scale|weight"):
            MarginHead(arg, group=comm, **kwargs)
        return
    head = MarginHead(shard, group=comm)
    with pytest.raises((TypeError, ValueError), match="reduction|features"):
        if bad == "reduction":
            head.forward_backward(
                feats, labels, reduction="avg" if odd else "mean"
            )
        else:
            head.forward_backward(feats.tolist() if odd else feats, labels)
    loss = head.forward_backward(feats, labels)[0]
    assert len(set(comm.allgather(float(loss)))) == 1


@pytest.mark.mpi
def test_missing_labels_on_one_rank_raises_everywhere():
    comm = _world()
    rank = comm.Get_rank()
    feats, weight, labels = problem(14, n=4, d=6, c=2 * comm.Get_size())
    head = MarginHead(weight[:, 2 * rank : 2 * rank + 2].copy(), group=comm)
    odd = rank == comm.Get_size() - 1
    with pytest.raises(TypeError, match="labels"):
        head.forward_backward(feats, None if odd else labels)
    loss = head.forward_backward(feats, labels)[0]
    assert len(set(comm.allgather(float(loss)))) == 1
