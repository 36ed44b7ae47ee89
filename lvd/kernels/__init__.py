"""Fused kernels for lvd's hot paths, each with a PyTorch reference.

Models call only :func:`attention`, :func:`group_norm` and :class:`GroupNorm`; :mod:`lvd.kernels.dispatch`
picks the backend (Triton on CUDA with compute capability ≥ 8.0, SDPA or the PyTorch reference
elsewhere; ``backend=`` or ``LVD_KERNELS`` forces one). Importing this package never touches a GPU
driver. This package imports nothing from ``lvd``.
"""

from lvd.kernels.attention import attention, attention_reference
from lvd.kernels.dispatch import BACKENDS, BackendUnavailableError
from lvd.kernels.group_norm import GroupNorm, group_norm, group_norm_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "GroupNorm",
    "attention",
    "attention_reference",
    "group_norm",
    "group_norm_reference",
]
