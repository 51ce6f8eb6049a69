"""The GPU backend: the CUDA kernels of ``kernels/margin_ce.cu``.

The backend is written against an array module ``xp``: with ``cupy`` it
launches the kernels compiled by ``cupy.RawModule``; with ``numpy`` and
``emulate=True`` it launches the same kernels, compiled from the same
source with the same options and name expressions, on the CPU through
``arcface_ce._emulator``. Only the module that launches differs.

Passes over the ``N x C`` logits
--------------------------------
- ``row_stats`` reads the logits once. Short rows (``C <= WARP_ROW_MAX``)
  use one warp per row and write the ``[N, 4]`` statistics directly. Long
  rows are cut into ``CHUNK_SIZE`` chunks, one block per (chunk, row); each
  block leaves an online (max, sum) pair in a small ``[N, chunks, 2]``
  buffer that a second kernel folds in chunk order (deterministic, and
  reading ``2 * N * chunks`` numbers, not the logits).
- ``write`` reads the logits once more and writes the output once.

Counting every full read or full write of an ``N x C`` matrix as one
pass: the forward (loss only) makes one pass; loss plus gradient (or
softmax) makes three, two reads of the logits and one write of the
result, the target's margin and its derivative being computed on the fly.
PaddlePaddle's ``margin_cross_entropy`` makes fourteen for the same work:
its forward copies the logits (2), scales them (2), takes the row max (1),
subtracts it (2), sums the exponentials (1), subtracts their logarithm (2)
and exponentiates into the softmax (2); its backward rescales the softmax
into the gradient in place (2).

Accumulation is in float32 for float16/bfloat16/float32 logits and in
float64 for float64 logits; outputs are rounded once when stored. CuPy has
no bfloat16 dtype: ``uint16`` arrays are read as bfloat16 bit patterns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _kernels
from ._kernels import BLOCK_SIZE, CHUNK_SIZE, NUM_WARPS

#: Rows at most this long use one warp per row instead of chunk blocks.
WARP_ROW_MAX = 2048
#: Cap on the blocks of the 1-D grid-stride launches.
MAX_BLOCKS = 65535 * 16
#: CUDA limit on gridDim.y.
MAX_GRID_Y = 65535
#: CUDA limit on gridDim.x.
MAX_GRID_X = 2**31 - 1
STATS_WIDTH = 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class GpuBackend:
    """Backend running the CUDA kernels (or their CPU emulation).

    Parameters
    ----------
    xp : module
        ``cupy``, or ``numpy`` together with ``emulate=True``.
    emulate : bool
        Run the kernels through the CPU emulation layer.
    """

    def __init__(self, xp: Any, emulate: bool) -> None:
        if emulate != (xp is np):
            raise ValueError(
                "emulate=True needs numpy arrays and emulate=False cupy "
                f"arrays, got xp={xp.__name__}, emulate={emulate}"
            )
        self.xp = xp
        self.emulate = emulate

    def _kernel(self, name: str, logits: Any, label: Any) -> Any:
        return _kernels.get_kernel(
            self.xp, self.emulate, name, logits.dtype, label.dtype
        )

    def _acc_dtype(self, logits: Any) -> Any:
        if _kernels.logits_type_name(logits.dtype) == "float64":
            return np.float64
        return np.float32

    def row_stats(
        self,
        logits: Any,
        label: Any,
        class_start: int,
        m1: float,
        m2: float,
        m3: float,
        scale: float,
        out: Any,
    ) -> tuple[Any, None]:
        """Per-row statistics of this rank's columns, in one pass.

        Parameters
        ----------
        logits : (N, C) array, C-contiguous
            float16, bfloat16 (or uint16 bit patterns), float32 or float64.
        label : (N,) int32 or int64 array, C-contiguous
            Global class ids; ids outside ``[class_start, class_start + C)``
            mean "not owned here", never an error.
        class_start : int
            Global id of local column 0.
        m1, m2, m3, scale : float
            Margins and scale.
        out : array or None
            Unused (the kernels need no scratch of that size).

        Returns
        -------
        stats : (N, 4) float64 array
            Shift, sum of exponentials, target, ownership per row.
        state : None
            Nothing is carried over to :meth:`write`.
        """
        xp = self.xp
        n, c = (int(d) for d in logits.shape)
        stats = xp.empty((n, STATS_WIDTH), dtype=np.float64)
        if n == 0:
            return stats, None
        start = np.int64(class_start)
        margins = (np.float64(m1), np.float64(m2), np.float64(m3))
        f_scale = np.float64(scale)
        if c <= WARP_ROW_MAX:
            grid = (min(_ceil_div(n, NUM_WARPS), MAX_BLOCKS),)
            self._kernel("mce_row_stats_warp", logits, label)(
                grid,
                (BLOCK_SIZE,),
                (logits, label, start, np.int64(n), np.int64(c),
                 *margins, f_scale, stats),
            )  # fmt: skip
            return stats, None
        chunks = max(1, _ceil_div(c, CHUNK_SIZE))
        partials = xp.empty((n, chunks, 2), dtype=self._acc_dtype(logits))
        self._kernel("mce_row_stats_chunk", logits, label)(
            (min(chunks, MAX_GRID_X), min(n, MAX_GRID_Y)),
            (BLOCK_SIZE,),
            (logits, label, start, np.int64(n), np.int64(c),
             np.int64(chunks), f_scale, partials),
        )  # fmt: skip
        grid = (min(_ceil_div(n, BLOCK_SIZE), MAX_BLOCKS),)
        self._kernel("mce_row_stats_combine", logits, label)(
            grid,
            (BLOCK_SIZE,),
            (logits, label, start, np.int64(n), np.int64(c),
             np.int64(chunks), *margins, f_scale, partials, stats),
        )  # fmt: skip
        return stats, None

    def write(
        self,
        out: Any,
        logits: Any,
        label: Any,
        class_start: int,
        row_max: Any,
        row_a: Any,
        row_t: Any,
        apply_dt: bool,
        m1: float,
        m2: float,
        m3: float,
        scale: float,
        state: Any,
    ) -> None:
        """Fill ``out`` with the softmax or the gradient, in one pass.

        Parameters
        ----------
        out : (N, C) array, C-contiguous
            Output, same dtype as ``logits``.
        logits : (N, C) array, C-contiguous
            The logits given to :meth:`row_stats`.
        label : (N,) int32 or int64 array, C-contiguous
            Global class ids.
        class_start : int
            Global id of local column 0.
        row_max, row_a, row_t : (N,) float64 arrays
            Global shift ``M_i`` and the non-target and target factors:
            ``out_ij = row_a_i * exp(z_ij - M_i)`` off target,
            ``out_iy = row_t_i * (dtdx if apply_dt else 1)`` at the target.
        apply_dt : bool
            Multiply the target by the derivative of the margin.
        m1, m2, m3, scale : float
            Margins and scale.
        state : None
            What :meth:`row_stats` returned (unused).
        """
        n, c = (int(d) for d in logits.shape)
        if n * c == 0:
            return
        xp = self.xp
        row_max, row_a, row_t = (
            xp.ascontiguousarray(v, dtype=np.float64)
            for v in (row_max, row_a, row_t)
        )
        grid = (min(_ceil_div(n * c, BLOCK_SIZE), MAX_BLOCKS),)
        self._kernel("mce_write", logits, label)(
            grid,
            (BLOCK_SIZE,),
            (out, logits, label, np.int64(class_start), np.int64(n),
             np.int64(c), row_max, row_a, row_t, np.int32(bool(apply_dt)),
             np.float64(m1), np.float64(m2), np.float64(m3),
             np.float64(scale)),
        )  # fmt: skip
