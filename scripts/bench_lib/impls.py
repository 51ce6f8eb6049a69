"""The implementations that are timed, behind one small interface.

Each implementation object takes its inputs once in :meth:`setup`
(conversion, device transfer: never timed) and then offers
``forward(m) -> loss`` and ``forward_grad(m) -> (loss, grad)`` on them,
returning arrays of its own backend; :meth:`to_numpy` brings a result
back for the correctness check.  ``sync`` waits for queued device work
(a no-op on the CPU) and is called around every timed call.

Implementations:

- ``package``: ``arcface_ce.margin_cross_entropy`` and
  ``margin_cross_entropy_and_grad`` on NumPy or CuPy arrays, the gradient
  written into one caller-owned array (``out=``), as a training loop does
  and as the composite below reuses its work array.
- ``composite``: Paddle's steps written with NumPy ufuncs (copy, margin
  on the target, scale, row max, subtract, exp, row sum, divide, one-hot
  subtract), reusing one work array in place, which is already kinder
  than Paddle itself (its backward starts from a copy of the softmax).
  16-bit logits are upcast to float32 by the copy.
- ``torch``: the eager PyTorch composite in the way InsightFace writes
  it (upcast, clamp, arccos/cos of the target column, scatter, scale,
  ``F.cross_entropy``), gradient by autograd; forward alone runs under
  ``torch.inference_mode``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .reference import Margins


class Impl:
    """Base class: an implementation bound to one input."""

    name = "impl"
    has_forward = True
    has_forward_grad = True

    def setup(self, logits: np.ndarray, label: np.ndarray) -> None:
        """Take the NumPy inputs (converted here, outside any timing)."""
        raise NotImplementedError

    def forward(self, m: Margins) -> Any:
        """Mean loss only."""
        raise NotImplementedError

    def forward_grad(self, m: Margins) -> tuple[Any, Any]:
        """Mean loss and gradient with respect to the logits."""
        raise NotImplementedError

    def to_numpy(self, a: Any) -> np.ndarray:
        """A result of this backend as a NumPy array."""
        return np.asarray(a)

    def sync(self) -> None:
        """Wait until queued work is done (no-op on the CPU)."""

    def release(self) -> None:
        """Drop references to the inputs."""
        self.__dict__.pop("x", None)
        self.__dict__.pop("label", None)

    def check_callables(self) -> tuple[Any, Any]:
        """``(forward, forward_grad)`` in the form the reference check uses.

        Each takes NumPy ``(logits, label, margins)`` and returns NumPy
        results; None where the implementation lacks the phase.
        """

        def fwd(x: np.ndarray, label: np.ndarray, m: Margins) -> float:
            self.setup(x, label)
            return float(self.to_numpy(self.forward(m)))

        def fwd_grad(
            x: np.ndarray, label: np.ndarray, m: Margins
        ) -> tuple[float, np.ndarray]:
            self.setup(x, label)
            loss, grad = self.forward_grad(m)
            out = float(self.to_numpy(loss)), self.to_numpy(grad)
            if out[1].dtype != x.dtype:
                raise TypeError(
                    f"gradient dtype {out[1].dtype}, expected {x.dtype}"
                )
            return out

        return (
            fwd if self.has_forward else None,
            fwd_grad if self.has_forward_grad else None,
        )


class PackageImpl(Impl):
    """``arcface_ce`` on NumPy arrays (or CuPy arrays when ``xp`` is cupy).

    Parameters
    ----------
    module : module
        The imported ``arcface_ce`` package.
    group : object
        Passed as ``group`` (False: no communication).
    xp : module
        ``numpy`` or ``cupy``; inputs are converted with ``xp.asarray``.
    """

    name = "package"

    def __init__(
        self, module: ModuleType, group: Any = False, xp: Any = np
    ) -> None:
        self.module = module
        self.group = group
        self.xp = xp
        self.has_forward = hasattr(module, "margin_cross_entropy")
        self.has_forward_grad = hasattr(
            module, "margin_cross_entropy_and_grad"
        )

    def setup(self, logits: np.ndarray, label: np.ndarray) -> None:
        if self.xp is not np and logits.dtype.name == "bfloat16":
            # CuPy has no bfloat16: the package takes the uint16 bits
            logits = logits.view(np.uint16)
        self.x = self.xp.asarray(logits)
        self.label = self.xp.asarray(label)
        self.out = self.xp.empty_like(self.x)

    def release(self) -> None:
        super().release()
        self.__dict__.pop("out", None)

    def forward(self, m: Margins) -> Any:
        return self.module.margin_cross_entropy(
            self.x, self.label, group=self.group, **m.as_kwargs()
        )

    def forward_grad(self, m: Margins) -> tuple[Any, Any]:
        return self.module.margin_cross_entropy_and_grad(
            self.x,
            self.label,
            group=self.group,
            out=self.out,
            **m.as_kwargs(),
        )

    def to_numpy(self, a: Any) -> np.ndarray:
        if self.xp is np:
            return np.asarray(a)
        out = self.xp.asnumpy(a)
        if out.dtype == np.uint16:  # bfloat16 bits, see setup
            import ml_dtypes

            out = out.view(ml_dtypes.bfloat16)
        return out

    def sync(self) -> None:
        if self.xp is not np:
            self.xp.cuda.get_current_stream().synchronize()


def work_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for 16-bit logits, else the logits dtype itself."""
    return np.dtype(np.float32) if dtype.itemsize < 4 else np.dtype(dtype)


def target_derivative(
    cos_t: np.ndarray, theta: np.ndarray, m: Margins
) -> np.ndarray | float:
    """d target / d x at the target: m1 sin(m1 theta + m2) / sin(theta)."""
    if m.margin1 == 1.0 and m.margin2 == 0.0:
        return 1.0
    sin_t = np.sqrt(np.maximum(1.0 - cos_t * cos_t, 0.0))
    return m.margin1 * np.sin(m.margin1 * theta + m.margin2) / sin_t


class CompositeImpl(Impl):
    """Paddle's steps as NumPy ufunc passes (see the module docstring)."""

    name = "composite"

    def setup(self, logits: np.ndarray, label: np.ndarray) -> None:
        self.x = logits
        self.label = label

    def _statistics(
        self, m: Margins
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any]:
        x, label = self.x, self.label
        rows = np.arange(x.shape[0])
        # 1. copy (upcast for 16-bit logits)
        z = np.array(x, dtype=work_dtype(x.dtype))
        # 2. margin on the target column, arccos input clamped
        cos_t = np.clip(z[rows, label], -1.0, 1.0)
        theta = np.arccos(cos_t)
        z[rows, label] = np.cos(m.margin1 * theta + m.margin2) - m.margin3
        # 3. scale
        z *= z.dtype.type(m.scale)
        # 4. row max, 5. subtract it
        zmax = z.max(axis=1, keepdims=True)
        z -= zmax
        shifted_target = z[rows, label]
        # 6. exp, 7. row sum
        np.exp(z, out=z)
        total = z.sum(axis=1, keepdims=True)
        loss = np.mean(np.log(total[:, 0]) - shifted_target)
        dtarget = target_derivative(cos_t, theta, m)
        return z, total, rows, loss, dtarget

    def forward(self, m: Margins) -> Any:
        loss = self._statistics(m)[3]
        return loss.astype(self.x.dtype)

    def forward_grad(self, m: Margins) -> tuple[Any, Any]:
        z, total, rows, loss, dtarget = self._statistics(m)
        label = self.label
        # 8. divide: z becomes the softmax
        z /= total
        # 9. one-hot subtract, target derivative, upstream 1/N and scale
        z[rows, label] = (z[rows, label] - 1.0) * dtarget
        z *= z.dtype.type(m.scale / self.x.shape[0])
        return loss.astype(self.x.dtype), z.astype(self.x.dtype, copy=False)


class TorchImpl(Impl):
    """Eager PyTorch composite with autograd (see the module docstring).

    Parameters
    ----------
    torch : module
        The imported ``torch``.
    device : str
        ``"cpu"`` or ``"cuda"``.
    """

    name = "torch"

    def __init__(self, torch: ModuleType, device: str = "cpu") -> None:
        self.torch = torch
        self.device = device
        if device != "cpu":
            self.name = f"torch-{device}"

    def setup(self, logits: Any, label: Any) -> None:
        torch = self.torch
        if isinstance(logits, np.ndarray):
            if logits.dtype.name == "bfloat16":
                t = torch.from_numpy(logits.view(np.int16))
                t = t.view(torch.bfloat16)
            else:
                t = torch.from_numpy(logits)
            lab = torch.from_numpy(label)
        else:  # a device array: hand it over without a host copy
            t = torch.as_tensor(logits, device=self.device)
            if t.dtype == torch.uint16:  # bfloat16 bits (CuPy has none)
                t = t.view(torch.bfloat16)
            lab = torch.as_tensor(label, device=self.device)
        self.x = t.to(self.device).requires_grad_(True)
        self.label = lab.to(self.device)

    def _loss(self, m: Margins) -> Any:
        torch = self.torch
        x = self.x
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.clamp(-1.0, 1.0)
        col = self.label[:, None]
        theta = torch.acos(x.gather(1, col))
        target = torch.cos(m.margin1 * theta + m.margin2) - m.margin3
        z = x.scatter(1, col, target) * m.scale
        return torch.nn.functional.cross_entropy(z, self.label)

    def forward(self, m: Margins) -> Any:
        with self.torch.inference_mode():
            return self._loss(m)

    def forward_grad(self, m: Margins) -> tuple[Any, Any]:
        self.x.grad = None
        loss = self._loss(m)
        loss.backward()
        return loss.detach(), self.x.grad

    def to_numpy(self, a: Any) -> np.ndarray:
        a = a.detach().cpu()
        if a.dtype == self.torch.bfloat16:
            import ml_dtypes

            return a.view(self.torch.int16).numpy().view(ml_dtypes.bfloat16)
        return a.numpy()

    def sync(self) -> None:
        if self.device != "cpu":
            self.torch.cuda.synchronize()


class FloorPasses:
    """The two passes whose times define the floor (NumPy, CPU).

    floor(fwd+grad) = t(np.max(x, axis=1)) + t(np.exp(x, out=buf)):
    one read of the logits for the row statistics, then one read and one
    write with one exponential per element for the gradient.
    floor(fwd) = t(np.max(x, axis=1)) alone: one read, no exponential
    (a bound no loss can reach, given as a yardstick).
    """

    name = "floor"

    def setup(self, logits: np.ndarray) -> None:
        self.x = logits
        self.buf = np.empty_like(logits)

    def max_pass(self) -> Any:
        return np.max(self.x, axis=1)

    def exp_pass(self) -> Any:
        return np.exp(self.x, out=self.buf)

    def release(self) -> None:
        self.__dict__.pop("x", None)
        self.__dict__.pop("buf", None)
