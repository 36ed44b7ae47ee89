"""3D convolution of an ``nn.Conv3d`` on CPU through oneDNN, and over a split causal window.

Two functions the causal video VAE's convolutions go through (``lvd.vae.layers.CausalConv3d`` and every
spatial conv of the VAE):

- :func:`conv3d`: ``y = conv(x)``, on CPU fp32 always through oneDNN (``aten.mkldnn_convolution``). PyTorch
  sends a batch-1 Conv3d with few channels or frames (B·C·T·H ≤ 20480, e.g. a temporal chunk) to its
  unblocked ``slow_conv3d``: 1.7 GFLOP/s against 12 GFLOP/s for oneDNN at 8 channels, 6×256²
  (2 threads, loaded machine).
- :func:`conv3d_split_window`: one output frame over the window ``[left | x]`` of ``k_t`` frames,
  ``y = W[:, :, n:] ⋆ x + b + W[:, :, :n] ⋆ left`` with ``n`` the frames of ``left``: each part with its own
  taps of the kernel, without copying the window into one tensor. On CPU without autograd oneDNN adds
  the second convolution into the first's output (a fused sum, ``_convolution_pointwise_.binary``).

Both equal :func:`conv3d_reference` (``F.conv3d`` over the concatenated window) to float rounding, in the
contiguous and the channels-last (``channels_last_3d``) layout; autograd works on both (the fused sum has
no autograd formula, so with grad enabled the two convolutions are summed by an ordinary add).
Everywhere but CPU fp32 they are plain ``F.conv3d`` calls.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def uses_onednn(x: torch.Tensor) -> bool:
    """Whether :func:`conv3d` takes oneDNN for ``x``: CPU, fp32, and a PyTorch built with it."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def conv3d_reference(conv: nn.Conv3d, x: torch.Tensor, left: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(cat([left, x], dim=2))`` (``conv(x)`` without ``left``): the oracle of both functions here."""
    if left is not None:
        x = torch.cat([left, x], dim=2)
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _onednn_args(conv: nn.Conv3d) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv3d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, but on CPU fp32 always through oneDNN; the same result to float rounding."""
    if uses_onednn(x):
        return torch.ops.aten.mkldnn_convolution(x, conv.weight, conv.bias, *_onednn_args(conv))
    return conv(x)


def conv3d_split_window(conv: nn.Conv3d, left: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One output frame of ``conv`` (kernel ``k_t`` frames) over the window ``left`` followed by ``x``
    (``k_t`` frames together), as two convolutions summed; equals ``conv(cat([left, x]))`` to float rounding."""
    n, w = left.shape[2], conv.weight
    if uses_onednn(x):  # oneDNN for the same reason as conv3d()
        args = _onednn_args(conv)
        out = torch.ops.aten.mkldnn_convolution(x, w[:, :, n:], conv.bias, *args)
        if torch.is_grad_enabled():  # the fused sum has no autograd formula
            return out + torch.ops.aten.mkldnn_convolution(left, w[:, :, :n], None, *args)
        return torch.ops.mkldnn._convolution_pointwise_.binary(out, left, w[:, :, :n], None, *args, "add", 1.0,
                                                                None, [], None)
    return (F.conv3d(x, w[:, :, n:], conv.bias, conv.stride, conv.padding)
            + F.conv3d(left, w[:, :, :n], None, conv.stride, conv.padding))
