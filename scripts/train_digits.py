"""Train a digit embedding with a model-parallel ArcFace head.

Data: scikit-learn's bundled handwritten digits (1,797 real 8x8 images,
10 classes, no download), a stratified held-out split with a fixed seed.

Model: a small MLP written out in NumPy (or CuPy), 64 -> hidden -> ReLU ->
embedding, trained with :class:`arcface_ce.head.MarginHead` and Adam.

Parallelism, for any number of ranks (also 1, without MPI):

- data parallel: every rank runs the MLP on its slice of each batch; the
  network gradients are summed over the ranks with one all-reduce (the
  head returns gradients of the loss of the WHOLE batch, so the sum is
  the gradient of the global mean loss, i.e. the average of the ranks'
  mean-loss gradients when the slices are equal);
- model parallel: the 10 classes are split unevenly over the ranks (4 and
  6 on two ranks); each rank keeps and updates only its columns of the
  class weights, and the head all-gathers the embeddings.

Every rank draws the same initial parameters and batch order from the
seed, so a run is reproducible and the same for every rank count up to
rounding. Rank 0 prints one line per epoch and a summary: held-out
accuracy (argmax of the cosine logits over all ranks) and a verification
score on held-out pairs (same digit or not, by the cosine similarity of
the embeddings): ROC AUC, and the accuracy at the threshold that is best
on training pairs.

Run::

    python scripts/train_digits.py
    mpiexec -n 2 python scripts/train_digits.py --epochs 30

The exit status is non-zero when a rank fails, the loss stops being
finite or the held-out accuracy is below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any


def _share_cores_between_ranks() -> None:
    """Give each rank of this node its share of the cores for BLAS.

    Several ranks per node each running a full-size BLAS thread pool next
    to MPI's busy polling slow a small model down by an order of magnitude.
    Variables the user set are kept. Must run before NumPy is imported.
    """
    local = 1
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            local = int(value)
            break
    if local <= 1:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    share = str(max(1, cores // local))
    for name in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "ARCFACE_CE_NUM_THREADS",
    ):
        os.environ.setdefault(name, share)


_share_cores_between_ranks()

import numpy as np  # noqa: E402

if __package__ in (None, ""):
    # Run as a file from a checkout: make the package importable.
    sys.path.insert(
        0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )

from arcface_ce.head import (  # noqa: E402
    MarginHead,
    allgather_rows,
    split_classes,
)

_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--margin1", type=float, default=1.0, help="SphereFace")
    p.add_argument("--margin2", type=float, default=0.3, help="ArcFace")
    p.add_argument("--margin3", type=float, default=0.0, help="CosFace")
    p.add_argument("--scale", type=float, default=16.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam step")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--embedding", type=int, default=64)
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=0.0,
        help="exit with status 1 if the held-out accuracy is lower",
    )
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be at least 1")
    return args


# ---------------------------------------------------------------- setup


def world() -> Any:
    """COMM_WORLD when an MPI launcher started several ranks, else None."""
    sizes = [os.environ.get(name, "") for name in _LAUNCHER_SIZE_VARS]
    if not any(s.isdigit() and int(s) > 1 for s in sizes):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def array_module(device: str, rank: int) -> tuple[Any, str]:
    """NumPy or CuPy (one GPU per rank, round robin) for ``--device``."""
    if device == "cpu":
        return np, "cpu"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no CuPy, no driver, no device
        if device == "gpu":
            raise RuntimeError(f"--device gpu: no usable GPU ({exc})") from exc
        return np, "cpu"
    if count == 0:
        if device == "gpu":
            raise RuntimeError("--device gpu: CuPy sees no GPU")
        return np, "cpu"
    cupy.cuda.Device(rank % count).use()
    return cupy, f"gpu{rank % count}"


def to_host(x: Any) -> np.ndarray:
    return x.get() if hasattr(x, "get") else np.asarray(x)


def load_data(seed: int, test_size: float) -> tuple[np.ndarray, ...]:
    """Standardised float32 digits, stratified train/held-out split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data,
        digits.target,
        test_size=test_size,
        stratify=digits.target,
        random_state=seed,
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0) + 1.0  # constant border pixels stay 0
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


# ---------------------------------------------------------------- model


class MLP:
    """``x -> relu(x W1 + b1) W2 + b2``, with its own backward pass."""

    def __init__(self, sizes: tuple[int, int, int], rng, xp) -> None:
        d_in, hidden, d_out = sizes
        self.xp = xp

        def he(fan_in: int, shape: tuple[int, int]) -> Any:
            w = rng.normal(scale=np.sqrt(2.0 / fan_in), size=shape)
            return xp.asarray(w.astype(np.float32))

        self.params = [
            he(d_in, (d_in, hidden)),
            xp.zeros(hidden, dtype=np.float32),
            he(hidden, (hidden, d_out)),
            xp.zeros(d_out, dtype=np.float32),
        ]

    def forward(self, x: Any) -> tuple[Any, tuple[Any, Any]]:
        w1, b1, w2, b2 = self.params
        h = self.xp.maximum(x @ w1 + b1, 0.0)
        return h @ w2 + b2, (x, h)

    def backward(self, cache: tuple[Any, Any], g_out: Any) -> list[Any]:
        x, h = cache
        w2 = self.params[2]
        g_h = (g_out @ w2.T) * (h > 0)
        return [x.T @ g_h, g_h.sum(axis=0), h.T @ g_out, g_out.sum(axis=0)]


class Adam:
    """Adam (Kingma & Ba) on a list of arrays, updated in place."""

    def __init__(self, params: list[Any], lr: float, xp) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.m = [xp.zeros_like(p) for p in params]
        self.v = [xp.zeros_like(p) for p in params]

    def step(self, grads: list[Any]) -> None:
        self.t += 1
        c1 = 1.0 - self.beta1**self.t
        c2 = 1.0 - self.beta2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * g * g
            p -= (self.lr / c1) * m / ((v / c2) ** 0.5 + self.eps)


def allreduce_sum(comm: Any, arrays: list[Any], xp) -> list[Any]:
    """Sum every array over the ranks with one all-reduce (via the host)."""
    if comm is None:
        return arrays
    from mpi4py import MPI

    flat = np.concatenate([to_host(a).ravel() for a in arrays])
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    out, pos = [], 0
    for a in arrays:
        out.append(xp.asarray(flat[pos : pos + a.size].reshape(a.shape)))
        pos += a.size
    return out


def my_rows(n: int, comm: Any) -> slice:
    """This rank's contiguous slice of ``n`` rows."""
    if comm is None:
        return slice(0, n)
    bounds = split_classes(n, comm.Get_size())
    r = comm.Get_rank()
    return slice(int(bounds[r]), int(bounds[r + 1]))


# ---------------------------------------------------------------- metrics


def pair_scores(emb: np.ndarray, labels: np.ndarray) -> tuple[Any, Any]:
    """Cosine similarity and sameness of every unordered pair."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    i, j = np.triu_indices(len(emb), k=1)
    sims = np.einsum("ij,ij->i", unit[i], unit[j])
    return sims, labels[i] == labels[j]


def best_threshold(sims: np.ndarray, same: np.ndarray) -> float:
    """Threshold on ``sims`` with the best accuracy of ``sim >= t``."""
    order = np.argsort(-sims, kind="stable")
    s, t = sims[order], same[order]
    tp = np.concatenate([[0], np.cumsum(t)])  # positives among the top k
    k = np.arange(len(s) + 1)
    correct = tp + ((~t).sum() - (k - tp))
    best = int(np.argmax(correct))
    if best == 0:
        return float(s[0]) + 1e-6
    if best == len(s):
        return float(s[-1])
    return 0.5 * float(s[best - 1] + s[best])


def verification(
    emb_train: np.ndarray,
    y_train: np.ndarray,
    emb_test: np.ndarray,
    y_test: np.ndarray,
) -> tuple[float, float, float]:
    """ROC AUC and accuracy on held-out pairs, threshold from training."""
    from sklearn.metrics import roc_auc_score

    threshold = best_threshold(*pair_scores(emb_train, y_train))
    sims, same = pair_scores(emb_test, y_test)
    auc = float(roc_auc_score(same, sims))
    acc = float(((sims >= threshold) == same).mean())
    return auc, acc, threshold


# ---------------------------------------------------------------- main


def train(args: argparse.Namespace, comm: Any) -> int:
    rank = 0 if comm is None else comm.Get_rank()
    size = 1 if comm is None else comm.Get_size()
    xp, device = array_module(args.device, rank)
    say = print if rank == 0 else (lambda *a, **k: None)

    x_train, y_train, x_test, y_test = load_data(args.seed, args.test_size)
    n_classes = int(y_train.max()) + 1
    # Uneven class blocks, e.g. 4 and 6 classes on 2 ranks.
    bounds = split_classes(n_classes, size, weights=np.arange(size) + 2.0)
    cols = slice(int(bounds[rank]), int(bounds[rank + 1]))

    rng = np.random.default_rng(args.seed)  # same draws on every rank
    net = MLP((x_train.shape[1], args.hidden, args.embedding), rng, xp)
    full_weight = rng.normal(size=(args.embedding, n_classes))
    head = MarginHead(
        xp.asarray(full_weight[:, cols].astype(np.float32)),
        group=False if comm is None else comm,
        margin1=args.margin1,
        margin2=args.margin2,
        margin3=args.margin3,
        scale=args.scale,
    )
    opt_net = Adam(net.params, args.lr, xp)
    opt_head = Adam([head.weight], args.lr, xp)
    x_train_d, x_test_d = xp.asarray(x_train), xp.asarray(x_test)
    y_train_d = xp.asarray(y_train)

    blocks = "+".join(str(int(c)) for c in np.diff(bounds))
    say(
        f"digits: {len(x_train)} train, {len(x_test)} held out, "
        f"{n_classes} classes over {size} rank(s) as {blocks}, "
        f"device {device}, margins ({args.margin1}, {args.margin2}, "
        f"{args.margin3}), scale {args.scale}"
    )
    losses = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(len(x_train))
        total, batches = 0.0, 0
        for b0 in range(0, len(order), args.batch_size):
            batch = order[b0 : b0 + args.batch_size]
            idx = xp.asarray(batch[my_rows(len(batch), comm)])
            emb, cache = net.forward(x_train_d[idx])
            loss, g_emb, g_weight = head.forward_backward(emb, y_train_d[idx])
            grads = allreduce_sum(comm, net.backward(cache, g_emb), xp)
            opt_net.step(grads)
            opt_head.step([g_weight])
            total += float(loss)
            batches += 1
        losses.append(total / batches)
        if not np.isfinite(losses[-1]):
            say(f"epoch {epoch}: the loss is not finite ({losses[-1]})")
            return 1
        say(
            f"epoch {epoch:3d}/{args.epochs}  loss {losses[-1]:.6f}  "
            f"time {time.perf_counter() - t0:.3f}s"
        )
    elapsed = time.perf_counter() - start

    # Held-out classification: each rank embeds a slice, the head gathers.
    group = False if comm is None else comm
    rows = my_rows(len(x_test), comm)
    emb_test_local = net.forward(x_test_d[rows])[0]
    predicted = to_host(head.predict(emb_test_local))
    accuracy = float((predicted == y_test).mean())
    emb_test = to_host(allgather_rows(emb_test_local, group)[0])
    rows = my_rows(len(x_train), comm)
    emb_train = to_host(
        allgather_rows(net.forward(x_train_d[rows])[0], group)[0]
    )
    if rank == 0:
        auc, pair_acc, threshold = verification(
            emb_train.astype(np.float64),
            y_train,
            emb_test.astype(np.float64),
            y_test,
        )
        same = y_test[:, None] == y_test[None, :]
        base = (same.sum() - len(y_test)) / (len(y_test) ** 2 - len(y_test))
        say(
            f"held-out: classification accuracy {accuracy:.2%} "
            f"({int((predicted == y_test).sum())}/{len(y_test)})"
        )
        say(
            f"held-out pairs (same digit or not, {base:.1%} same): ROC AUC "
            f"{auc:.4f}, accuracy {pair_acc:.2%} at cosine >= "
            f"{threshold:.4f} (threshold chosen on training pairs)"
        )
        say(
            f"SUMMARY ranks={size} classes={blocks} device={device} "
            f"epochs={args.epochs} train_time={elapsed:.2f}s "
            f"first_loss={losses[0]:.6f} final_loss={losses[-1]:.6f} "
            f"accuracy={accuracy:.4f} pair_auc={auc:.4f} "
            f"pair_accuracy={pair_acc:.4f} threshold={threshold:.4f}"
        )
    if accuracy < args.min_accuracy:
        say(
            f"held-out accuracy {accuracy:.2%} is below --min-accuracy "
            f"{args.min_accuracy:.2%}"
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    comm = world()
    try:
        return train(args, comm)
    except Exception:
        if comm is None or comm.Get_size() == 1:
            raise
        # A failing rank must not leave the others waiting in a collective.
        rank = comm.Get_rank()
        sys.stderr.write(f"[rank {rank}] {traceback.format_exc()}")
        sys.stderr.flush()
        comm.Abort(1)
        return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
