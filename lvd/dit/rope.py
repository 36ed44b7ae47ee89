"""3D rotary position embedding (RoPE) over the (t, h, w) patch grid of a video.

RoPE (Su et al., 2021, "RoFormer") rotates each consecutive pair of query/key channels
``(x_2i, x_2i+1)`` by an angle ``pos · θ^(-2i/d)``, so that ``q_m · k_n`` depends only on the offset
``m - n``. In 3D the head dimension ``D`` is split into three parts ``D = d_t + d_h + d_w`` (each even)
and each part is rotated by its own axis position (as in CogVideoX / HunyuanVideo / Wan)::

    x' = x ⊙ cos(φ) + rot(x) ⊙ sin(φ),   rot(x)_(2i, 2i+1) = (-x_2i+1, x_2i)
    φ_(2i) = φ_(2i+1) = pos_axis · θ^(-2i / d_axis)

Because a token's angle for an axis depends only on that axis' position, attention restricted to one
frame (spatial) sees only the h/w offsets, and attention along time at one location (temporal) only
the t offset: the factorized attention in :mod:`lvd.dit.model` reuses the same rotated q/k.

:func:`rope_3d` builds the (cos, sin) table; :func:`lvd.kernels.rms_norm_rope.apply_rope` rotates by it, and
:func:`lvd.kernels.rms_norm_rope.rms_norm_rope` does the QK-norm and the rotation in one autograd op (the same
numbers, fewer passes over q/k in the backward).
"""

from __future__ import annotations

import torch


__all__ = ["default_axes_dims", "rope_3d"]


def default_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """Split ``head_dim`` into even ``(d_t, d_h, d_w)``: about 1/4 for time, 3/8 each for h and w."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"RoPE needs an even head_dim >= 6, got {head_dim}")
    d_hw = 2 * ((3 * head_dim) // 16)  # 3/8 of head_dim, rounded down to even
    d_t = head_dim - 2 * d_hw
    if d_t <= 0 or d_hw <= 0:
        raise ValueError(f"cannot split head_dim={head_dim} into positive even (t, h, w) parts")
    return d_t, d_hw, d_hw


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles (N, dim/2) for integer positions (N,): one per channel pair."""
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)  # (dim/2,)
    return positions.to(torch.float64)[:, None] * freqs[None, :]  # (N, dim/2)


def rope_3d(
    grid: tuple[int, int, int],
    axes_dims: tuple[int, int, int],
    *,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The rotation table (N, D/2, 2) holding (cos φ, sin φ), N = t·h·w in (t h w) order, D = sum(axes_dims).

    ``grid`` is the patch grid (T', H', W') after patchify, ``axes_dims`` the (d_t, d_h, d_w) split.
    """
    t, h, w = grid
    if min(axes_dims) < 0 or any(d % 2 for d in axes_dims):
        raise ValueError(f"RoPE axes_dims must be non-negative and even, got {axes_dims}")
    pos = torch.stack(
        torch.meshgrid(
            torch.arange(t, device=device),
            torch.arange(h, device=device),
            torch.arange(w, device=device),
            indexing="ij",
        ),
        dim=-1,
    ).reshape(-1, 3)  # (N, 3) with N = t·h·w, rows in (t h w) order
    angles = torch.cat([_axis_angles(pos[:, i], d, theta) for i, d in enumerate(axes_dims)], dim=-1)  # (N, D/2)
    return torch.stack((angles.cos(), angles.sin()), dim=-1).float()  # (N, D/2, 2): cos φ, sin φ
