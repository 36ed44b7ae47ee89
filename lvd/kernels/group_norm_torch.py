"""The PyTorch GroupNorm paths: :func:`group_norm_reference` (the fallback and the test oracle) and the
per-frame inference paths for fp32 CPU tensors that :func:`lvd.kernels.group_norm` takes where no gradient
is needed (contiguous and channels_last_3d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def _check_inputs(x, num_groups, weight, bias):
    problems = []
    if x.ndim not in (4, 5):
        problems.append(f"expects (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
    elif x.shape[1] % num_groups:
        problems.append(f"{x.shape[1]} channels are not divisible by {num_groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and x.ndim >= 2 and tuple(p.shape) != (x.shape[1],):
            problems.append(f"{name} must have shape ({x.shape[1]},), got {tuple(p.shape)}")
    if problems:
        raise ValueError("group_norm: " + "; ".join(problems))


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-6, *, silu=False, per_frame=False):
    """PyTorch GroupNorm (statistics in fp32, fp64 for fp64), optionally per frame and followed by SiLU."""
    _check_inputs(x, num_groups, weight, bias)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    if per_frame and x.ndim == 5:
        y = rearrange(x, "b c t h w -> (b t) c h w")
        y = F.group_norm(y.to(acc), num_groups, w, b, eps)
        y = rearrange(y, "(b t) c h w -> b c t h w", b=x.shape[0])
    else:
        y = F.group_norm(x.to(acc), num_groups, w, b, eps)
    if silu:  # in place when nothing needs y's gradient: the CPU VAE path, one pass and no extra tensor
        y = F.silu(y, inplace=not (torch.is_grad_enabled() and y.requires_grad))
    return y.to(x.dtype)


def per_frame_no_grad(x, num_groups, weight, bias, eps, silu):
    """Per-frame GroupNorm (+ SiLU) of a contiguous fp32 (B, C, T, H, W) for inference on the PyTorch path.

    The reference moves time next to batch and back, two copies of the tensor, and leaves a non-contiguous
    result that the next convolution copies again. Here the statistics come from row sums over H·W (fast
    contiguous reductions) and one ``addcmul`` writes y in x's own layout (``benchmarks/bench_group_norm.py``
    times it against the reference).
    The one-pass variance E[x²] − mean² loses precision when |mean| ≫ std, so then it returns None
    and the caller takes the reference.
    """
    b, c, t, h, w = x.shape
    g, cg = num_groups, c // num_groups
    rows = x.view(b, g, cg, t, h * w)
    total = rows.sum(-1).view(b, c, t).transpose(1, 2)  # (B, T, C)
    total_sq = torch.linalg.vector_norm(rows, dim=-1).square().view(b, c, t).transpose(1, 2)
    affine = _frame_affine(total, total_sq, h * w, num_groups, weight, bias, eps)
    if affine is None:
        return None
    # (B, G, C/G, T, 1), contiguous: strided operands would make addcmul pick a strided layout for y
    scale, shift = (a.view(b, t, g, cg).permute(0, 2, 3, 1).contiguous()[..., None] for a in affine)
    y = torch.addcmul(shift, rows, scale).view(b, c, t, h, w)
    return F.silu(y, inplace=True) if silu else y


def _frame_affine(total, total_sq, count, num_groups, weight, bias, eps):
    """Per-frame GroupNorm as an affine map y = x · scale + shift, from per-(b, t, channel) sums of x and x²
    over ``count`` pixels: (scale, shift), each (B, T, C). None when the one-pass variance E[x²] − mean² could
    have lost its precision (|mean| ≫ std); the caller then takes the reference."""
    b, t, c = total.shape
    g, cg = num_groups, c // num_groups
    n = cg * count
    mean = total.view(b, t, g, cg).sum(-1) / n  # (B, T, G)
    var = total_sq.view(b, t, g, cg).sum(-1) / n - mean.square()
    if bool((mean.square() > 1e3 * var).any()):
        return None
    rstd = (var.clamp_min(0) + eps).rsqrt()[..., None]  # (B, T, G, 1)
    scale = rstd * weight.view(g, cg) if weight is not None else rstd.expand(b, t, g, cg)
    shift = -mean[..., None] * scale
    if bias is not None:
        shift = shift + bias.view(g, cg)
    return scale.reshape(b, t, c), shift.reshape(b, t, c)


_CL_BLOCK_BYTES = 1 << 20  # rows per block of the channels-last sums: 1 MiB, cache-sized


def per_frame_no_grad_channels_last(x, num_groups, weight, bias, eps, silu, block_bytes=_CL_BLOCK_BYTES):
    """:func:`per_frame_no_grad` for a channels_last_3d fp32 (B, C, T, H, W): memory (B, T, H·W, C).

    Sums over H·W run on blocks of ``block_bytes`` of rows, so that x² of a block stays in cache (one reduction of x² over
    the strided H·W axis runs 15x slower than the sum of x); y is written channels-last, the layout oneDNN
    convolves without a reorder. Returns None when |mean| ≫ std, like the contiguous version.
    """
    b, c, t, h, w = x.shape
    rows = x.permute(0, 2, 3, 4, 1).view(b, t, h * w, c)
    total = rows.new_zeros(b, t, c)
    total_sq = rows.new_zeros(b, t, c)
    block = max(1, block_bytes // (x.element_size() * c))
    for i in range(0, h * w, block):
        part = rows[:, :, i:i + block]
        total += part.sum(2)
        total_sq += (part * part).sum(2)
    affine = _frame_affine(total, total_sq, h * w, num_groups, weight, bias, eps)
    if affine is None:
        return None
    scale, shift = (a[:, :, None] for a in affine)  # (B, T, 1, C)
    y = torch.addcmul(shift, rows, scale)  # (B, T, H·W, C)
    if silu:
        F.silu(y, inplace=True)
    return y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)
