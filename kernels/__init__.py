"""Fused kernels for lvd's hot paths, each with a PyTorch reference.

Models call only :func:`attention` and :func:`group_norm`; :mod:`kernels.dispatch` picks the
backend (Triton on CUDA, SDPA or the PyTorch reference on CPU). Importing this package never
touches a GPU driver. This package imports nothing from ``lvd``.
"""

from kernels.attention import attention, attention_reference
from kernels.group_norm import GroupNorm, group_norm, group_norm_reference

__all__ = ["attention", "attention_reference", "group_norm", "group_norm_reference", "GroupNorm"]
