"""3D RoPE: relative positions per axis, norm preservation, the head-dim split."""

import pytest
import torch

from lvd.dit.rope import default_axes_dims, rope_3d
from lvd.kernels.rms_norm_rope import apply_rope


@pytest.mark.parametrize("head_dim", [6, 32, 64, 72, 128])
def test_default_split_is_even_and_sums_to_head_dim(head_dim):
    dims = default_axes_dims(head_dim)
    assert sum(dims) == head_dim and all(d > 0 and d % 2 == 0 for d in dims)


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="even head_dim"):
        default_axes_dims(33)


def test_rotation_preserves_norm_and_is_identity_at_origin():
    grid, dims = (3, 4, 5), (8, 12, 12)
    freqs = rope_3d(grid, dims)
    assert freqs.shape == (60, 16, 2) and freqs.dtype == torch.float32
    x = torch.randn(2, 3, 60, 32)
    y = apply_rope(x, freqs)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position (0, 0, 0): no rotation


def test_scores_depend_only_on_the_offset_along_each_axis():
    """q_m · k_n after RoPE is the same for (m, n) and (m + Δ, n + Δ), Δ along t, h or w."""
    grid, dims = (4, 5, 6), (8, 12, 12)
    freqs = rope_3d(grid, dims)
    q, k = torch.randn(32), torch.randn(32)

    def index(t, h, w):
        return (t * grid[1] + h) * grid[2] + w

    def score(m, n):
        return (apply_rope(q, freqs[index(*m)]) * apply_rope(k, freqs[index(*n)])).sum()

    base = score((0, 1, 2), (2, 3, 1))
    for delta in [(1, 0, 0), (0, 1, 0), (0, 0, 3), (1, 1, 2)]:
        m = tuple(a + d for a, d in zip((0, 1, 2), delta))
        n = tuple(a + d for a, d in zip((2, 3, 1), delta))
        torch.testing.assert_close(score(m, n), base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score((0, 1, 2), (3, 3, 1)), base, atol=1e-3)  # a different offset


def test_each_axis_rotates_only_its_own_channels():
    grid, dims = (2, 2, 2), (4, 6, 6)
    freqs = rope_3d(grid, dims)
    x = torch.randn(16)
    moved_in_time = apply_rope(x, freqs[4]) - x  # position (1, 0, 0)
    assert moved_in_time[:4].abs().max() > 0 and moved_in_time[4:].abs().max() < 1e-6
    moved_in_w = apply_rope(x, freqs[1]) - x  # position (0, 0, 1)
    assert moved_in_w[:10].abs().max() < 1e-6 and moved_in_w[10:].abs().max() > 0


def test_compiled_real_form_equals_the_complex_form(monkeypatch):
    freqs = rope_3d((2, 3, 4), (4, 6, 6))
    x = torch.randn(2, 2, 24, 16)
    eager = apply_rope(x, freqs)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(apply_rope(x, freqs), eager)
