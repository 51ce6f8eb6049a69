"""Margin softmax cross-entropy for face recognition at scale.

ArcFace, CosFace, SphereFace and their combination, with PaddlePaddle's
``margin_cross_entropy`` API, on NumPy (CPU) or CuPy (CUDA kernels), with
the class dimension split over MPI ranks. See :func:`margin_cross_entropy`.
"""

from ._core import (
    LabelError,
    margin_cross_entropy,
    margin_cross_entropy_and_grad,
)
from .head import MarginHead, allgather_rows, split_classes

__version__ = "0.1.0"

__all__ = [
    "LabelError",
    "MarginHead",
    "allgather_rows",
    "split_classes",
    "margin_cross_entropy",
    "margin_cross_entropy_and_grad",
]
