"""Fused kernels for lvd's hot paths, each with a PyTorch reference.

Models call only :func:`attention`, :func:`group_norm` and :class:`GroupNorm`; :mod:`lvd.kernels.dispatch`
picks the backend (Triton on CUDA with compute capability ≥ 8.0, SDPA or the PyTorch reference
elsewhere; ``backend=`` or ``LVD_KERNELS`` forces one). Two ops without Triton kernels live here too, each
with its reference: :func:`rms_norm_rope` (the DiT's QK-norm + RoPE as one autograd op) and :func:`conv3d` /
:func:`conv3d_split_window` (the causal VAE's CPU convolutions through oneDNN). Options are arguments,
never module globals. Importing this package never touches a GPU driver. This package imports nothing
from ``lvd``.
"""

from lvd.kernels.attention import attention, attention_reference
from lvd.kernels.conv3d import conv3d, conv3d_reference, conv3d_split_window
from lvd.kernels.dispatch import BACKENDS, BackendUnavailableError
from lvd.kernels.group_norm import GroupNorm, group_norm, group_norm_reference
from lvd.kernels.rms_norm_rope import apply_rope, rms_norm_reference, rms_norm_rope

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "GroupNorm",
    "apply_rope",
    "attention",
    "attention_reference",
    "conv3d",
    "conv3d_reference",
    "conv3d_split_window",
    "group_norm",
    "group_norm_reference",
    "rms_norm_reference",
    "rms_norm_rope",
]
