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

:func:`rms_norm_rope` is the QK-norm and the rotation in one autograd op (the same numbers, fewer passes
over q/k in the backward).
"""

from __future__ import annotations

import torch


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


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x_2i, x_2i+1)`` of ``x`` (..., N, D) by the table ``rope`` (N, D/2, 2);
    for heads-inner ``x`` (B, N, H, D) pass ``rope[:, None]`` (N, 1, D/2, 2).

    In fp32 (also under bf16 autocast), cast back to ``x.dtype``. Eager: one complex multiply (on this
    CPU 0.3 ms for a (1, 8, 3328, 64) q, against 8 ms for the real-valued form below); under
    torch.compile the real form, since Inductor generates no code for complex ops and fuses this one.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., N, D/2, 2)
    if torch.compiler.is_compiling():
        cos, sin = rope.unbind(-1)
        x0, x1 = pairs.unbind(-1)
        rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rope))
    return rotated.flatten(-2).to(x.dtype)  # (..., N, D)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, rope: torch.Tensor | None = None):
    """``rope(x / sqrt(mean(x²) + eps) · weight)`` in plain autograd ops, in fp32 and cast back to ``x.dtype``
    as :func:`rms_norm_rope` does: the oracle of that op and its path under torch.compile (Inductor fuses
    it itself). Returning x's dtype matters under autocast, where the fp32 weight would otherwise promote
    bf16 q and k to fp32 while v stays bf16."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32, fp64 for fp64
    rms = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)  # (..., N, 1)
    y = xf * rms * weight.to(xf.dtype)
    return (y if rope is None else apply_rope(y, rope)).to(x.dtype)


class _RMSNormRope(torch.autograd.Function):
    """Forward ``y = R(x̂ · w)``, ``x̂ = x · r``, ``r = 1 / sqrt(mean(x²) + eps)``, R the RoPE rotation
    (or the identity). Backward, with ``g`` the output gradient and ``Rᵀ`` the inverse rotation:

        g_y = Rᵀ g,   g_w = Σ g_y ⊙ x̂,   g_x̂ = g_y ⊙ w,   g_x = r · (g_x̂ − x̂ · mean(g_x̂ ⊙ x̂))

    It saves only x (a view into the qkv Linear's output, no new memory) and r (one float per row)
    and recomputes x̂ (autograd saves x̂, x̂·w and the fp32 pairs). On this CPU, one thread, a
    (1, 8, 3328, 64) q view of the qkv output: forward + backward 9.1 ms, against 10.3 ms as plain ops.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, rope):
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, fp64 for fp64 (gradcheck)
        xf = x.to(acc)
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)  # (..., N, 1)
        y = (xf * r).mul_(weight.to(acc))  # (..., N, D) fp32
        if rope is not None:
            y = _rotate(y, rope)
        ctx.save_for_backward(x, weight, r, rope)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r, rope = ctx.saved_tensors
        acc = r.dtype
        g = grad.to(acc).contiguous()
        if rope is not None:
            g = _rotate(g, rope, inverse=True)  # Rᵀ g: the rotation by −φ
        xhat = x.to(acc) * r  # (..., N, D)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)  # (D,)
        g = g * weight.to(acc) if g is grad else g.mul_(weight.to(acc))  # g_x̂, never the caller's grad in place
        dot = (g * xhat).mean(-1, keepdim=True)  # (..., N, 1)
        grad_x = g.sub_(xhat.mul_(dot)).mul_(r).to(x.dtype)
        return grad_x, grad_w, None, None


def _rotate(x: torch.Tensor, rope: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x`` (..., N, D) fp32, contiguous pairs, rotated by the table (N, D/2, 2); ``inverse``: by −φ."""
    table = torch.view_as_complex(rope)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * (table.conj() if inverse else table)).flatten(-2)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, rope: torch.Tensor | None = None):
    """QK-norm then RoPE: ``apply_rope(x / sqrt(mean(x²) + eps) · weight, rope)`` (no rotation when
    ``rope`` is None) for x (..., N, D), weight (D,), in fp32, cast back to ``x.dtype``. The same values
    as :func:`rms_norm_reference` to float rounding, through one autograd op with a hand-written backward."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return rms_norm_reference(x, weight, eps, rope)
    return _RMSNormRope.apply(x, weight, eps, rope)
