"""Triton GroupNorm (+SiLU) against the PyTorch reference: forward, dx, dweight and dbias.

Runs on CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before kernels is
imported). Every launcher buffer starts as NaN (dispatch.nan_filled_outputs), so an element a kernel
never writes fails. The `gpu` set at the bottom covers bf16 and the benchmark's video-VAE shapes.
"""

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lvd.kernels import GroupNorm, dispatch, group_norm, group_norm_reference

gn_mod = importlib.import_module("lvd.kernels.group_norm")  # the module (kernels.group_norm is the function)
gn_torch = importlib.import_module("lvd.kernels.group_norm_torch")


@pytest.fixture(autouse=True)
def _right_triton_mode(request):
    """CPU tests run the kernels in the interpreter; the `gpu` set needs CUDA and TRITON_INTERPRET=0."""
    if request.node.get_closest_marker("gpu"):
        if gn_mod._INTERPRETED or not torch.cuda.is_available():
            pytest.skip("needs CUDA and TRITON_INTERPRET=0 (tests/conftest.py defaults it to 1)")
    elif not gn_mod._INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 before lvd.kernels is imported (tests/conftest.py sets it)")


def _inputs(shape, dtype, *, channels_last=False, mean=0.5, std=1.0, affine=True, device="cpu"):
    """x with a non-zero mean, weight ≈ 1 ± 0.5, bias ≈ ±0.5; all leaves requiring grad."""
    x = torch.randn(shape, dtype=torch.float64, device=device) * std + mean
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    x = x.to(dtype).requires_grad_()
    c = shape[1]
    if not affine:
        return x, None, None
    w = (torch.randn(c, dtype=torch.float64, device=device) * 0.5 + 1).to(dtype).requires_grad_()
    b = (torch.randn(c, dtype=torch.float64, device=device) * 0.5).to(dtype).requires_grad_()
    return x, w, b


def _run(fn, x, w, b, dy):
    leaves = [t for t in (x, w, b) if t is not None]
    y = fn(x, w, b)
    return [y] + list(torch.autograd.grad(y, leaves, dy))


def _triton(groups, silu, per_frame, **options):
    def fn(x, w, b):
        with dispatch.nan_filled_outputs():
            return group_norm(x, groups, w, b, silu=silu, per_frame=per_frame, backend="triton", **options)
    return fn


def _fp64_ref(x, w, b, dy, groups, silu, per_frame):
    x64, w64, b64 = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b))
    fn = lambda x_, w_, b_: group_norm_reference(x_, groups, w_, b_, silu=silu, per_frame=per_frame)  # noqa: E731
    return _run(fn, x64, w64, b64, dy.double())


def _check_fp32(got, want, names=("y", "dx", "dweight", "dbias"), tol=1e-4):
    for name, g, w in zip(names, got, want):
        assert not g.isnan().any(), f"{name} has unwritten (NaN) elements"
        err = (g.double() - w).abs().max() / w.abs().max()
        assert err <= tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("per_frame", [False, True], ids=["global", "per_frame"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_5d_fp32_matches_reference(channels_last, per_frame, silu):
    x, w, b = _inputs((1, 8, 5, 9, 9), torch.float32, channels_last=channels_last)
    dy = torch.randn(x.shape) + 0.1
    got = _run(_triton(2, silu, per_frame), x, w, b, dy)
    _check_fp32(got, _fp64_ref(x, w, b, dy, 2, silu, per_frame))
    assert got[0].is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


def test_4d_channels_last_96_channels_32_groups():
    x, w, b = _inputs((1, 96, 9, 9), torch.float32, channels_last=True)
    dy = torch.randn(x.shape) + 0.1
    _check_fp32(_run(_triton(32, True, False), x, w, b, dy), _fp64_ref(x, w, b, dy, 32, True, False))


def test_without_affine_parameters():
    x, _, _ = _inputs((1, 8, 5, 9, 9), torch.float32, affine=False)
    dy = torch.randn(x.shape)
    got = _run(_triton(4, True, True), x, None, None, dy)
    _check_fp32(got, _fp64_ref(x, None, None, dy, 4, True, True), names=("y", "dx"))


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_mean_1000_times_std_keeps_precision(silu):
    """Σx² − (Σx)²/n loses everything here (0.8 relative error); Welford/Chan must not."""
    x, w, b = _inputs((2, 8, 9, 9), torch.float32, mean=1000.0, std=1.0)
    dy = torch.randn(x.shape)
    _check_fp32(_run(_triton(2, silu, False), x, w, b, dy), _fp64_ref(x, w, b, dy, 2, silu, False))


@pytest.mark.parametrize("shape,groups", [((1, 8, 5, 6, 7), 4), ((2, 16, 3, 4, 4), 8)])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_torch_path_per_frame_without_grad_matches_reference(shape, groups, silu):
    """The no-grad per-frame fast path (row sums + one addcmul) against the reference; output stays contiguous."""
    x, w, b = _inputs(shape, torch.float32)
    with torch.no_grad():
        assert gn_torch.per_frame_no_grad(x, groups, w, b, 1e-6, silu) is not None  # the fast path ran
        got = group_norm(x, groups, w, b, 1e-6, silu=silu, per_frame=True, backend="torch")
    assert got.is_contiguous()
    torch.testing.assert_close(got, group_norm_reference(x, groups, w, b, 1e-6, silu=silu, per_frame=True),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_bytes", [1 << 20, 64], ids=["one-block", "many-blocks"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_torch_path_per_frame_channels_last_matches_reference_and_stays_channels_last(silu, block_bytes):
    """The channels-last no-grad path (block-wise sums over H·W) against the reference; the output keeps the
    channels-last layout the next oneDNN convolution reads without a reorder."""
    x, w, b = _inputs((2, 8, 3, 5, 7), torch.float32)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        blocks = gn_torch.per_frame_no_grad_channels_last(x, 4, w, b, 1e-6, silu, block_bytes)  # 64 B: 2 rows a block
        got = group_norm(x, 4, w, b, 1e-6, silu=silu, per_frame=True, backend="torch")
        far = (x * 1e-3 + 1000.0).contiguous(memory_format=torch.channels_last_3d)  # |mean| ≫ std: the reference
        assert gn_torch.per_frame_no_grad_channels_last(far, 4, w, b, 1e-6, silu, block_bytes) is None
        far_got = group_norm(far, 4, w, b, 1e-6, silu=silu, per_frame=True, backend="torch")
    ref = group_norm_reference(x, 4, w, b, 1e-6, silu=silu, per_frame=True)
    for y in (blocks, got):
        assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(far_got, group_norm_reference(far, 4, w, b, 1e-6, silu=silu, per_frame=True),
                               rtol=1e-5, atol=1e-5)


def test_torch_path_per_frame_without_grad_refuses_when_mean_dwarfs_std():
    x, w, b = _inputs((1, 8, 3, 9, 9), torch.float32, mean=1000.0, std=1.0)
    with torch.no_grad():
        assert gn_torch.per_frame_no_grad(x, 2, w, b, 1e-6, True) is None  # E[x²] − mean² would be noise
        got = group_norm(x, 2, w, b, 1e-6, silu=True, per_frame=True, backend="torch")
    torch.testing.assert_close(got, group_norm_reference(x, 2, w, b, 1e-6, silu=True, per_frame=True), rtol=0, atol=0)


def test_many_partials_merge():
    """Tiny tiles cut each unit into many chunks: exercises the cross-program Chan merge."""
    x, w, b = _inputs((1, 4, 3, 9, 9), torch.float32, mean=-3.0, std=2.0)
    units, *_, ns = gn_mod._geometry(x, 2, False, tile=16)
    assert ns >= 8
    dy = torch.randn(x.shape)
    _check_fp32(_run(_triton(2, True, False, tile=16), x, w, b, dy), _fp64_ref(x, w, b, dy, 2, True, False))


def test_per_frame_passes_over_frame_slices_match():
    """On a GPU, per-frame passes run a few frames at a time so x is re-read from L2; same result."""
    x, w, b = _inputs((1, 8, 5, 9, 9), torch.float32, channels_last=True)
    dy = torch.randn(x.shape)
    whole = _run(_triton(2, True, True), x, w, b, dy)
    frame_bytes = 8 * 9 * 9 * 4
    assert gn_mod._frame_slices(x, True, 1, 2 * frame_bytes) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert gn_mod._slice_budget(x, True) == 0  # "half the L2" means no slicing off the GPU
    sliced = _run(_triton(2, True, True, frame_slices=2 * frame_bytes), x, w, b, dy)  # forward: 2 frames a slice
    assert torch.equal(sliced[0], whole[0]) and torch.equal(sliced[1], whole[1])  # y, dx
    _check_fp32(sliced, _fp64_ref(x, w, b, dy, 2, True, True))


def test_fp16_error_at_most_twice_pytorch_fp16_error():
    x, w, b = _inputs((2, 8, 5, 9, 9), torch.float16)
    dy = torch.randn(x.shape, dtype=torch.float64).half()
    got = _run(_triton(2, True, False), x, w, b, dy)
    torch_fp16 = _run(lambda x_, w_, b_: F.silu(F.group_norm(x_, 2, w_, b_, 1e-6)), x, w, b, dy)
    want = _fp64_ref(x, w, b, dy, 2, True, False)
    for name, g, p, r in zip(("y", "dx", "dweight", "dbias"), got, torch_fp16, want):
        ours, theirs = (g.double() - r).abs().max(), (p.double() - r).abs().max()
        assert ours <= 2 * theirs + 1e-6, f"{name}: ours {ours:.2e} vs PyTorch fp16 {theirs:.2e}"


def test_per_frame_chunks_equal_whole_clip():
    """What lets a causal VAE decode a long video in pieces: frames 0–1 and 2–4 apart == all 5 at once."""
    x, w, b = _inputs((1, 8, 5, 9, 9), torch.float32)
    x = x.detach()
    whole = group_norm(x, 2, w, b, silu=True, per_frame=True, backend="triton")
    parts = [group_norm(x[:, :, s], 2, w, b, silu=True, per_frame=True, backend="triton")
             for s in (slice(0, 2), slice(2, 5))]
    assert torch.equal(torch.cat(parts, dim=2), whole)


def test_weight_and_bias_gradients_are_deterministic():
    x, w, b = _inputs((1, 8, 3, 9, 9), torch.float32)
    dy = torch.randn(x.shape)
    first = _run(_triton(2, True, False), x, w, b, dy)
    second = _run(_triton(2, True, False), x, w, b, dy)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_gradcheck_fp64_through_the_kernel():
    x, w, b = (t.detach().requires_grad_() for t in _inputs((1, 4, 3, 3, 3), torch.float64))
    for per_frame in (False, True):
        assert torch.autograd.gradcheck(
            lambda x_, w_, b_: group_norm(x_, 2, w_, b_, silu=True, per_frame=per_frame, backend="triton"),
            (x, w, b), fast_mode=True)


def test_gradcheck_fp64_reference():
    x, w, b = (t.detach().requires_grad_() for t in _inputs((1, 4, 3, 3, 3), torch.float64))
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: group_norm_reference(x_, 2, w_, b_, silu=True, per_frame=True), (x, w, b), fast_mode=True)


def test_custom_op_registrations_pass_opcheck():
    x, w, b = _inputs((1, 4, 3, 5, 5), torch.float32, channels_last=True)
    torch.library.opcheck(gn_mod._gn_fwd_op, (x, w, b, 2, 1e-6, True, True, 0, 128),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_module_matches_torch_group_norm_and_silu():
    m = GroupNorm(4, 8, eps=1e-5, silu=True)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    ref = nn.GroupNorm(4, 8, eps=1e-5)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 8, 5, 9, 9) + 0.5
    torch.testing.assert_close(m(x), F.silu(ref(x)))
    assert "silu=True" in repr(m)


def test_bad_inputs_raise_with_shapes():
    with pytest.raises(ValueError, match="not divisible by 32 groups"):
        group_norm(torch.randn(1, 48, 4, 4), 32)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, C, T, H, W\)"):
        group_norm(torch.randn(1, 8, 4), 2)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        group_norm(torch.randn(1, 8, 4, 4), 2, torch.ones(4))


@pytest.mark.slow
def test_torch_compile_fullgraph_with_kernel():
    x, w, b = _inputs((1, 8, 3, 5, 5), torch.float32)
    fn = torch.compile(lambda x_, w_, b_: group_norm(x_, 2, w_, b_, silu=True, backend="triton").sum(),
                       fullgraph=True)
    fn(x, w, b).backward()
    assert x.grad is not None and not x.grad.isnan().any()


# ----------------------------------------------------------------------------------------------
# GPU set: bf16 and video-VAE sizes (pytest -m gpu on a CUDA machine, TRITON_INTERPRET=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, groups", [((1, 128, 17, 64, 64), 32), ((2, 512, 5, 32, 32), 32), ((1, 96, 9, 37, 29), 32)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_frame", [False, True])
def test_gpu_matches_reference_at_vae_sizes(dtype, shape, groups, channels_last, per_frame):
    x, w, b = _inputs(shape, dtype, channels_last=channels_last, device="cuda")
    dy = torch.randn(shape, device="cuda").to(dtype)
    got = _run(_triton(groups, True, per_frame), x, w, b, dy)
    want = _fp64_ref(x, w, b, dy, groups, True, per_frame)
    if dtype == torch.float32:
        _check_fp32(got, want)
        return
    ref_lowp = (lambda x_, w_, b_: group_norm_reference(x_.float(), groups, w_.float(), b_.float(), silu=True,
                                                         per_frame=per_frame).to(dtype))
    theirs_all = _run(ref_lowp, x, w, b, dy)
    for name, g, p, r in zip(("y", "dx", "dweight", "dbias"), got, theirs_all, want):
        ours, theirs = (g.double() - r).abs().max(), (p.double() - r).abs().max()
        assert ours <= 2 * theirs + 1e-5, f"{name}: ours {ours:.2e} vs PyTorch {dtype} {theirs:.2e}"
