"""The fused QK-norm + RoPE op (lvd.kernels.rms_norm_rope) against its PyTorch reference: forward and every
gradient, odd shapes, strided inputs, fp64 gradcheck and per-dtype tolerances."""

import pytest
import torch

from lvd.dit.rope import rope_3d
from lvd.kernels import apply_rope, rms_norm_reference, rms_norm_rope


@pytest.mark.parametrize("with_rope", [True, False])
@pytest.mark.parametrize("heads_inner", [True, False])
def test_fused_rms_norm_rope_matches_the_plain_ops(with_rope, heads_inner):
    """Forward and both gradients of the one-op QK-norm + RoPE equal the plain composition, on a
    strided k view cut out of a fused qkv tensor (as in the model) with odd sizes, in the model's
    (B, N, H, Dh) layout and in (B, H, N, Dh)."""
    grid, dims = (3, 5, 7), (4, 6, 8)
    rope = rope_3d(grid, dims) if with_rope else None
    if with_rope and heads_inner:
        rope = rope[:, None]  # (N, 1, Dh/2, 2)
    torch.manual_seed(0)
    qkv = torch.randn(2, 105, 3 * 3 * 18, requires_grad=True)  # (B, N, 3·H·Dh), H=3, Dh=18
    weight = torch.nn.Parameter(torch.randn(18))
    grad = torch.randn(2, 105, 3, 18) if heads_inner else torch.randn(2, 3, 105, 18)
    results = []
    for fn in (rms_norm_rope, rms_norm_reference):
        k = qkv.unflatten(-1, (3, 3, 18)).unbind(2)[1]  # (B, N, H, Dh), not contiguous
        out = fn(k if heads_inner else k.transpose(1, 2), weight, 1e-6, rope)
        results.append((out, *torch.autograd.grad(out, (qkv, weight), grad)))
    for fused, ref in zip(*results):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_fused_rms_norm_rope_gradcheck_fp64():
    rope = rope_3d((2, 3, 2), (4, 4, 4)).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm_rope(x, w, 1e-6, rope), (x, w))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_fused_rms_norm_rope_half_precision_matches_the_reference_and_keeps_the_dtype(dtype, tol):
    rope = rope_3d((1, 5, 7), (4, 6, 8))
    x = (torch.randn(1, 35, 2, 18) * 3).to(dtype).requires_grad_()
    w = torch.randn(18).requires_grad_()
    dy = torch.randn(1, 35, 2, 18).to(dtype)
    results = []
    for fn in (rms_norm_rope, rms_norm_reference):
        out = fn(x, w, 1e-6, rope[:, None])
        assert out.dtype == dtype
        results.append((out, *torch.autograd.grad(out, (x, w), dy)))
    for fused, ref in zip(*results):
        torch.testing.assert_close(fused.float(), ref.float(), rtol=tol, atol=tol)


def test_rope_alone_is_a_rotation():
    """apply_rope keeps each channel pair's norm (a rotation), and on already RMS-normalised input with unit
    weight the fused op is that rotation alone."""
    rope = rope_3d((2, 3, 4), (4, 6, 6))
    x = torch.randn(2, 24, 16)
    y = apply_rope(x, rope)
    torch.testing.assert_close(y.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))
    xn = x / x.square().mean(-1, keepdim=True).sqrt()  # already RMS-normalised
    torch.testing.assert_close(rms_norm_rope(xn, torch.ones(16), 0.0, rope), apply_rope(xn, rope), rtol=1e-5, atol=1e-5)
