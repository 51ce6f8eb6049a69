"""Bad inputs raise short, exact exceptions at the public boundary.

One ``pytest.raises(..., match=...)`` per check. The messages must name
the argument; for a bad label also the bad value and the valid range.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import arcface_ce
from arcface_ce import margin_cross_entropy, margin_cross_entropy_and_grad

N, C = 4, 10


def inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    logits = rng.uniform(-1.0, 1.0, size=(N, C))
    label = rng.integers(0, C, size=N)
    return logits, label


def all_of(*words: str) -> str:
    """Regex matching text that contains every word (any order)."""
    looks = "".join(
        rf"(?=.*(?<![\w.-]){re.escape(w)}(?![\w.]))" for w in words
    )
    return rf"(?s){looks}"


FUNCTIONS = [margin_cross_entropy, margin_cross_entropy_and_grad]
FUNCTION_IDS = ["loss", "and_grad"]


# ------------------------------------------------------------ label value


@pytest.mark.parametrize("func", FUNCTIONS, ids=FUNCTION_IDS)
@pytest.mark.parametrize("bad", [-1, C, C + 3, 2**40])
def test_label_out_of_range(func: Any, bad: int) -> None:
    logits, label = inputs()
    label[2] = bad
    with pytest.raises(IndexError, match=all_of("label", str(bad), "0")) as e:
        func(logits, label, group=False)
    assert isinstance(e.value, ValueError), type(e.value).__mro__
    assert isinstance(e.value, arcface_ce.LabelError), type(e.value)
    # The valid range ends at the number of classes.
    assert re.search(rf"(?<![\w.]){C}(?![\w.])", str(e.value)), str(e.value)


@pytest.mark.parametrize("bad", [-5, C])
def test_label_out_of_range_backends(backend: str, bad: int) -> None:
    logits, label = inputs()
    label[0] = bad
    with pytest.raises(ValueError, match=all_of("label", str(bad))) as e:
        margin_cross_entropy(logits, label, group=False, reduction="none")
    assert isinstance(e.value, IndexError), type(e.value).__mro__


def test_label_out_of_range_int32_column() -> None:
    logits, label = inputs()
    label = label.astype(np.int32)[:, None]
    label[3, 0] = C
    with pytest.raises(arcface_ce.LabelError, match=all_of("label", str(C))):
        margin_cross_entropy(logits, label, group=False)


# ------------------------------------------------------------ label dtype


@pytest.mark.parametrize("func", FUNCTIONS, ids=FUNCTION_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_label(func: Any, dtype: Any) -> None:
    logits, label = inputs()
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=all_of("label", name)):
        func(logits, label.astype(dtype), group=False)


# ------------------------------------------------------------ label shape


@pytest.mark.parametrize(
    ("logits_shape", "label_shape"),
    [
        ((N, C), (N, 2)),
        ((N, C), (N + 1,)),
        ((N, C), (N - 1, 1)),
        ((N, C), (1, N)),
        ((N, C), (N, 1, 1)),
        ((N, C), ()),
        ((2, 3, C), (3, 2)),
        ((2, 3, C), (6,)),
        ((2, 3, C), (2, 3, 2)),
    ],
    ids=lambda s: "x".join(map(str, s)) or "scalar",
)
def test_label_shape(logits_shape: tuple, label_shape: tuple) -> None:
    logits = np.zeros(logits_shape)
    label = np.zeros(label_shape, dtype=np.int64)
    with pytest.raises(ValueError, match="label"):
        margin_cross_entropy(logits, label, group=False)


# ------------------------------------------------------------ logits


@pytest.mark.parametrize("shape", [(C,), ()], ids=["1d", "0d"])
def test_logits_too_few_dims(shape: tuple) -> None:
    logits = np.zeros(shape)
    label = np.zeros(1 if shape else (), dtype=np.int64)
    with pytest.raises(ValueError, match="logits"):
        margin_cross_entropy(logits, label, group=False)


@pytest.mark.parametrize("func", FUNCTIONS, ids=FUNCTION_IDS)
@pytest.mark.parametrize(
    "dtype", [np.int32, np.int64, np.complex64, np.complex128, np.bool_]
)
def test_logits_unsupported_dtype(func: Any, dtype: Any) -> None:
    logits, label = inputs()
    bad = logits.astype(dtype)
    with pytest.raises(TypeError, match=all_of("logits")):
        func(bad, label, group=False)


# ------------------------------------------------------------ reduction


@pytest.mark.parametrize("func", FUNCTIONS, ids=FUNCTION_IDS)
@pytest.mark.parametrize("reduction", ["avg", "Mean", "elementwise", ""])
def test_bad_reduction(func: Any, reduction: str) -> None:
    logits, label = inputs()
    pattern = "reduction" if not reduction else all_of(reduction)
    with pytest.raises(ValueError, match=pattern):
        func(logits, label, group=False, reduction=reduction)


# ------------------------------------------------------------ grad_loss


@pytest.mark.parametrize(
    ("reduction", "shape"),
    [
        ("mean", (N,)),
        ("sum", (2,)),
        ("none", (N + 1,)),
        ("none", (N, 2)),
        (None, (1, N)),
    ],
)
def test_grad_loss_wrong_shape(reduction: Any, shape: tuple) -> None:
    logits, label = inputs()
    grad_loss = np.ones(shape)
    with pytest.raises(ValueError, match="grad_loss"):
        margin_cross_entropy_and_grad(
            logits,
            label,
            group=False,
            reduction=reduction,
            grad_loss=grad_loss,
        )


@pytest.mark.parametrize("grad_loss", ["a", 1j, np.array([1j] * N), True])
def test_grad_loss_not_real(grad_loss: Any) -> None:
    logits, label = inputs()
    with pytest.raises(TypeError, match=all_of("grad_loss:", "expected")):
        margin_cross_entropy_and_grad(
            logits, label, group=False, reduction="none", grad_loss=grad_loss
        )


@pytest.mark.parametrize("flag", ["yes", 1, None])
def test_return_softmax_not_bool(flag: Any) -> None:
    logits, label = inputs()
    with pytest.raises(TypeError, match=all_of("return_softmax:", "bool")):
        margin_cross_entropy(logits, label, group=False, return_softmax=flag)


# -------------------------------------------------------------------- out


@pytest.mark.parametrize(
    ("out", "error"),
    [([[0.0]], TypeError), (np.zeros((N, C), np.float32), TypeError)],
    ids=["list", "dtype"],
)
def test_out_wrong_kind(out: Any, error: type) -> None:
    logits, label = inputs()
    with pytest.raises(error, match="out:"):
        margin_cross_entropy_and_grad(logits, label, group=False, out=out)


def test_out_partly_overlapping_logits() -> None:
    logits, label = inputs()
    buf = np.zeros(N * C + 5)
    x = buf[: N * C].reshape(N, C)
    x[...] = logits
    out = buf[5:].reshape(N, C)
    with pytest.raises(ValueError, match=all_of("out:", "overlaps")):
        margin_cross_entropy_and_grad(x, label, group=False, out=out)


def test_out_is_returned_itself() -> None:
    logits, label = inputs()
    out = np.empty_like(logits)
    _, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, out=out
    )
    assert grad is out
    _, grad = margin_cross_entropy_and_grad(
        logits, label, group=False, out=logits
    )
    assert grad is logits


def test_uint64_label_beyond_int64() -> None:
    logits, label = inputs()
    label = label.astype(np.uint64)
    label[2] = np.iinfo(np.uint64).max
    with pytest.raises(
        arcface_ce.LabelError, match=all_of("label:", "18446744073709551615")
    ):
        margin_cross_entropy(logits, label, group=False)


def test_float16_loss_beyond_range_is_inf_without_warning() -> None:
    # filterwarnings = error: a RuntimeWarning here fails the test.
    logits = np.full((2, 3), -1.0, dtype=np.float16)
    logits[:, 1:] = 1.0
    loss = margin_cross_entropy(
        logits, np.array([0, 0]), group=False, scale=40_000.0, reduction="none"
    )
    assert np.isinf(loss).all()


def test_out_read_only() -> None:
    logits, label = inputs()
    out = np.zeros_like(logits)
    out.flags.writeable = False
    with pytest.raises(ValueError, match=all_of("out:", "read-only")):
        margin_cross_entropy_and_grad(logits, label, group=False, out=out)
    assert (out == 0).all(), "nothing may be written before the error"
