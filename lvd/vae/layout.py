"""Memory layout helpers: the VAE's CPU inference runs channels-last (see ``CausalVideoVAE.set_cpu_channels_last``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last_3d`` for a channels-last 5D tensor (the CPU inference layout, see
    :meth:`CausalVideoVAE.encode_posterior`), else ``torch.contiguous_format``."""
    if x.ndim == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def cat_frames(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``torch.cat(parts, dim=2)`` in ``like``'s memory format (torch.cat would follow ``parts[0]``, which
    may be an expanded view)."""
    if memory_format_of(like) == torch.contiguous_format:
        return torch.cat(parts, dim=2)
    shape = list(parts[0].shape)
    shape[2] = sum(p.shape[2] for p in parts)
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last_3d)
    return torch.cat(parts, dim=2, out=out)  # channels-last is the no-grad inference layout: no autograd here


def pad_right_bottom(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad H and W by one at the end (``F.pad(x, (0, 1, 0, 1))``), in x's memory format: F.pad returns
    a contiguous tensor, and converting it back to channels-last would copy the activation a second time."""
    if memory_format_of(x) == torch.contiguous_format:
        return F.pad(x, (0, 1, 0, 1))
    b, c, t, h, w = x.shape
    out = torch.empty(b, c, t, h + 1, w + 1, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    out[..., h, :] = 0
    out[..., :h, w] = 0
    out[..., :h, :w] = x
    return out
