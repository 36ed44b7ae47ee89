"""GroupNorm (+ optional fused SiLU) over (B, C, H, W) or (B, C, T, H, W) tensors.

y = (x − μ_g) / sqrt(σ²_g + eps) · weight + bias, then silu(y) when ``silu=True``.
With ``per_frame=True`` a 5D input gets statistics per (b, g, t) over (C/G, H, W).

Skeleton: the PyTorch reference. The Triton kernel lands here (see the kernels issue).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-6, *, silu=False, per_frame=False):
    """PyTorch GroupNorm (statistics in fp32), optionally per frame and followed by SiLU."""
    if x.ndim not in (4, 5):
        raise ValueError(f"group_norm expects (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {x.shape[1]} channels are not divisible by {num_groups} groups")
    if per_frame and x.ndim == 5:
        b = x.shape[0]
        y = rearrange(x, "b c t h w -> (b t) c h w")
        y = F.group_norm(y.float(), num_groups, None, None, eps)
        y = rearrange(y, "(b t) c h w -> b c t h w", b=b)
    else:
        y = F.group_norm(x.float(), num_groups, None, None, eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.float().view(shape)
    if bias is not None:
        y = y + bias.float().view(shape)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-6, *, silu=False, per_frame=False, backend="auto"):
    """GroupNorm with optional fused SiLU and per-frame statistics; see :func:`group_norm_reference`."""
    return group_norm_reference(x, num_groups, weight, bias, eps, silu=silu, per_frame=per_frame)


class GroupNorm(nn.Module):
    """``nn.GroupNorm`` with fused SiLU and per-frame statistics, backed by :func:`group_norm`."""

    def __init__(self, num_groups, num_channels, eps=1e-6, affine=True, *, silu=False, per_frame=False):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.silu, self.per_frame = silu, per_frame
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu, per_frame=self.per_frame)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, silu={self.silu}, per_frame={self.per_frame}"
