"""The oneDNN conv helpers (lvd.kernels.conv3d) against the PyTorch reference: forward and all gradients,
contiguous and channels-last, with odd shapes."""

import pytest
import torch
import torch.nn as nn

from lvd.kernels.conv3d import conv3d, conv3d_reference, conv3d_split_window, uses_onednn


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel,stride", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (2, 1, 1)), ((1, 3, 3), (1, 1, 1))])
def test_conv3d_matches_the_reference(kernel, stride, channels_last, grad):
    torch.manual_seed(0)
    conv = nn.Conv3d(5, 7, kernel, stride=stride, padding=(0, 1, 1))
    x = _layout(torch.randn(1, 5, 9, 11, 13), channels_last).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = conv3d(conv, x)
        ref = conv3d_reference(conv, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if grad:
        dy = torch.randn(out.shape)
        got = torch.autograd.grad(out, (x, conv.weight, conv.bias), dy)
        want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), dy)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n_left", [1, 2])
def test_split_window_conv_equals_the_conv_of_the_concatenated_window(n_left, channels_last, grad):
    """The fused oneDNN sum (no autograd) and the plain two-convolution sum (autograd) both equal one
    convolution over the concatenated window."""
    conv = nn.Conv3d(6, 5, (3, 3, 3), padding=(0, 1, 1))
    left = _layout(torch.randn(1, 6, n_left, 9, 7), channels_last)
    x = _layout(torch.randn(1, 6, 3 - n_left, 9, 7), channels_last).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = conv3d_split_window(conv, left, x)
        ref = conv3d_reference(conv, x, left)
    assert out.shape == (1, 5, 1, 9, 7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if grad:
        dy = torch.randn(out.shape)
        got = torch.autograd.grad(out, (x, conv.weight, conv.bias), dy)
        want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), dy)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_other_dtypes_take_the_plain_convolution():
    conv = nn.Conv3d(3, 4, (3, 3, 3), padding=(0, 1, 1)).double()
    x, left = torch.randn(1, 3, 2, 5, 6, dtype=torch.float64), torch.randn(1, 3, 1, 5, 6, dtype=torch.float64)
    assert not uses_onednn(x)
    torch.testing.assert_close(conv3d(conv, torch.cat([left, x], 2)), conv3d_reference(conv, x, left))
    torch.testing.assert_close(conv3d_split_window(conv, left, x), conv3d_reference(conv, x, left))
