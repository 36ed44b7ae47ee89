"""Fused RMSNorm (QK-norm) + rotary position embedding, as one autograd op, with its PyTorch reference.

    y = R(x̂ · w),   x̂ = x · r,   r = 1 / sqrt(mean(x²) + eps)

over the last axis of x (..., N, D), w (D,), with R the RoPE rotation (Su et al., 2021, "RoFormer") of each
channel pair ``(x_2i, x_2i+1)`` by the angle φ of a table ``rope`` (N, D/2, 2) holding (cos φ, sin φ)
(built by :func:`lvd.dit.rope.rope_3d`), or the identity when ``rope`` is None::

    R(x)_(2i) = x_2i cos φ_i − x_2i+1 sin φ_i,   R(x)_(2i+1) = x_2i sin φ_i + x_2i+1 cos φ_i

- :func:`rms_norm_rope`: the public op (a hand-written backward, :class:`_RMSNormRope`), in fp32 and cast
  back to x's dtype;
- :func:`rms_norm_reference`: the same in plain autograd ops, the oracle, and the path under torch.compile;
- :func:`apply_rope`: the rotation alone (the DiT uses it when QK-norm is off).

Pure PyTorch (no Triton kernel yet): it lives with the kernels because it is a fused op with a reference,
a test (tests/test_kernel_rms_norm_rope.py) and a benchmark (benchmarks/bench_rms_norm_rope.py).
"""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x_2i, x_2i+1)`` of ``x`` (..., N, D) by the table ``rope`` (N, D/2, 2);
    for heads-inner ``x`` (B, N, H, D) pass ``rope[:, None]`` (N, 1, D/2, 2).

    In fp32 (also under bf16 autocast), cast back to ``x.dtype``. Eager: one complex multiply (an order of
    magnitude faster on a CPU than the real-valued form below); under
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
    and recomputes x̂ (autograd saves x̂, x̂·w and the fp32 pairs).
    ``benchmarks/bench_rms_norm_rope.py`` times forward + backward against the plain ops.
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
