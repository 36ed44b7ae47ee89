"""Triton flash attention against the PyTorch reference: forward and every gradient.

Runs on CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before kernels is
imported). Every launcher buffer starts as NaN (dispatch.nan_filled_outputs), so an element a kernel
never writes fails. The `gpu` set at the bottom covers bf16 and realistic sizes on a CUDA device.
"""

import importlib
import math

import pytest
import torch
from einops import rearrange

from lvd import kernels
from lvd.kernels import attention, attention_reference, dispatch

attn_mod = importlib.import_module("lvd.kernels.attention")  # the module (kernels.attention is the function)


@pytest.fixture(autouse=True)
def _right_triton_mode(request):
    """CPU tests run the kernels in the interpreter; the `gpu` set needs CUDA and TRITON_INTERPRET=0."""
    if request.node.get_closest_marker("gpu"):
        if attn_mod._INTERPRETED or not torch.cuda.is_available():
            pytest.skip("needs CUDA and TRITON_INTERPRET=0 (tests/conftest.py defaults it to 1)")
    elif not attn_mod._INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 before lvd.kernels is imported (tests/conftest.py sets it)")


def _qkv(b, h, nq, nk, d, dtype, device="cpu"):
    """Fresh random q, k, v with a non-zero mean (0.5), made in fp64 then cast, requiring grad."""
    return [(torch.randn(b, h, n, d, dtype=torch.float64, device=device) + 0.5).to(dtype).requires_grad_()
            for n in (nq, nk, nk)]


def _mask(b, nk, *, all_masked_row=False):
    keep = torch.rand(b, nk) > 0.3
    keep[:, 0] = True
    if all_masked_row:
        keep[-1] = False  # the last batch element sees no key at all: its output must be zeros
    return keep


def _naive(q, k, v, mask, causal):
    """PyTorch attention computed entirely in the input dtype: 'PyTorch's own error' for fp16."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril(nk - nq), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _run(fn, q, k, v, do):
    out = fn(q, k, v)
    return [out] + list(torch.autograd.grad(out, (q, k, v), do))


def _triton(mask, causal):
    def fn(q, k, v):
        with dispatch.nan_filled_outputs():
            return attention(q, k, v, mask=mask, causal=causal, backend="triton")
    return fn


def _fp64_ref(q, k, v, do, mask, causal):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    return _run(lambda a, b_, c: attention_reference(a, b_, c, mask=mask, causal=causal), q64, k64, v64, do.double())


NAMES = ("out", "dq", "dk", "dv")


@pytest.mark.parametrize(
    "b, h, nq, nk, d, masked, causal",
    [
        (1, 2, 37, 37, 64, False, False),
        (2, 1, 129, 37, 80, True, False),  # N_q ≠ N_k, head dim padded 80 → 128, a fully masked batch row
        (1, 2, 37, 129, 32, False, True),  # causal with more keys than queries
        (2, 1, 129, 37, 96, True, True),  # causal with more queries than keys: early rows see nothing
        (1, 1, 37, 37, 128, True, False),
    ],
)
def test_fp32_matches_reference_forward_and_gradients(b, h, nq, nk, d, masked, causal):
    q, k, v = _qkv(b, h, nq, nk, d, torch.float32)
    mask = _mask(b, nk, all_masked_row=masked and b > 1) if masked else None
    do = torch.randn(b, h, nq, d) + 0.1
    got = _run(_triton(mask, causal), q, k, v, do)
    want = _fp64_ref(q, k, v, do, mask, causal)
    for name, g, w in zip(NAMES, got, want):
        assert not g.isnan().any(), f"{name} has unwritten (NaN) elements"
        err = (g.double() - w).abs().max() / w.abs().max()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"


def test_fully_masked_rows_give_zero_output_and_gradients():
    q, k, v = _qkv(2, 1, 37, 37, 32, torch.float32)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1] = False
    out, dq, dk, dv = _run(_triton(mask, False), q, k, v, torch.randn(2, 1, 37, 32))
    for t in (out, dq, dk, dv):
        assert torch.equal(t[1], torch.zeros_like(t[1]))


@pytest.mark.parametrize("masked, causal", [(False, False), (True, True)])
def test_fp16_error_at_most_twice_pytorch_fp16_error(masked, causal):
    """FlashAttention's rule: our fp16 error vs an fp64 reference ≤ 2× PyTorch's own fp16 error."""
    b, h, nq, nk, d = 1, 2, 129, 37, 64
    q, k, v = _qkv(b, h, nq, nk, d, torch.float16)
    mask = _mask(b, nk) if masked else None
    do = (torch.randn(b, h, nq, d) + 0.1).half()
    got = _run(_triton(mask, causal), q, k, v, do)
    torch_fp16 = _run(lambda a, b_, c: _naive(a, b_, c, mask, causal), q, k, v, do)
    want = _fp64_ref(q, k, v, do, mask, causal)
    for name, g, p, w in zip(NAMES, got, torch_fp16, want):
        ours, theirs = (g.double() - w).abs().max(), (p.double() - w).abs().max()
        assert ours <= 2 * theirs + 1e-6, f"{name}: ours {ours:.2e} vs PyTorch fp16 {theirs:.2e}"


def test_strided_views_are_read_in_place():
    """q, k, v as views of (B, N, H·D) projections, and a strided dO, match the contiguous result."""
    b, n, h, d = 2, 37, 2, 32
    x = (torch.randn(b, n, 3 * h * d, dtype=torch.float64) + 0.5).float().requires_grad_()
    q, k, v = rearrange(x, "b n (three h d) -> three b h n d", three=3, h=h).unbind(0)  # (B, H, N, D) views
    assert not q.is_contiguous()
    do = rearrange(torch.randn(b, n, h, d), "b n h d -> b h n d")  # strided gradient too
    fn = _triton(None, False)
    out = fn(q, k, v)
    (gx,) = torch.autograd.grad(out, x, do)
    ref = attention_reference(q.double(), k.double(), v.double())
    (gx_ref,) = torch.autograd.grad(ref, x, do.double())
    assert (out.double() - ref).abs().max() / ref.abs().max() <= 1e-4
    assert (gx.double() - gx_ref).abs().max() / gx_ref.abs().max() <= 1e-4


def test_scale_argument_is_used():
    q, k, v = _qkv(1, 1, 37, 37, 32, torch.float32)
    got = attention(q, k, v, scale=0.3, backend="triton")
    want = attention_reference(q, k, v, scale=0.3)
    assert (got - want).abs().max() / want.abs().max() <= 1e-4


def test_gradcheck_fp64_through_the_kernel():
    q, k, v = (t.detach().double().requires_grad_() for t in _qkv(2, 1, 5, 7, 4, torch.float64))
    mask = torch.tensor([[True] * 7, [True, False, True, True, False, True, True]])
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b_, c: attention(a, b_, c, mask=mask, causal=causal, backend="triton"), (q, k, v),
            fast_mode=True)


def test_gradcheck_fp64_reference():
    q, k, v = (t.detach().double().requires_grad_() for t in _qkv(1, 2, 5, 7, 4, torch.float64))
    mask = torch.tensor([[True, False, True, True, False, True, True]])
    assert torch.autograd.gradcheck(lambda a, b_, c: attention_reference(a, b_, c, mask=mask, causal=True), (q, k, v),
                                    fast_mode=True)


def test_custom_op_registrations_pass_opcheck():
    """Fake (meta) and autograd registrations agree with the kernel: what torch.compile relies on."""
    q, k, v = _qkv(1, 1, 37, 21, 32, torch.float32)
    mask = _mask(1, 21)
    torch.library.opcheck(attn_mod._flash_fwd_op, (q, k, v, mask, 0.2, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _lse_reference(q, k, v, mask, causal):
    """(out, lse) in float64 by autograd-friendly plain ops; lse = -inf for a query with no kept key."""
    q, k, v = (t.double() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v, lse


def _loss_with_lse(out, lse, w, u):
    """A loss that uses both outputs, as ring attention's merge does (empty rows' -inf left out)."""
    return (out.double() * w).sum() + (torch.where(torch.isinf(lse), 0.0, lse.double()) * u).sum()


@pytest.mark.parametrize("backend", ["triton", "torch", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_return_lse_matches_reference_forward_and_gradients_through_both_outputs(backend, causal):
    q, k, v = _qkv(2, 3, 37, 45, 24, torch.float32)
    mask = _mask(2, 45, all_masked_row=True)
    w, u = torch.randn(2, 3, 37, 24, dtype=torch.float64), torch.randn(2, 3, 37, dtype=torch.float64)
    out, lse = attention(q, k, v, mask=mask, causal=causal, backend=backend, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 37)
    assert torch.isinf(lse[-1]).all() and (lse[-1] < 0).all() and (out[-1] == 0).all()  # the row with no key
    got = torch.autograd.grad(_loss_with_lse(out, lse, w, u), (q, k, v))
    ref_out, ref_lse = _lse_reference(q, k, v, mask, causal)
    expected = torch.autograd.grad(_loss_with_lse(ref_out, ref_lse, w, u), (q, k, v))
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=0)
    finite = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=2e-6, rtol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_blocks_of_keys_merged_by_lse_equal_attention_over_all_keys(backend):
    """Ring attention's merge: out = Σ_b exp(lse_b − lse) out_b, lse = logsumexp_b lse_b, forward and gradients."""
    q, k, v = _qkv(1, 2, 19, 40, 16, torch.float32)
    mask = _mask(1, 40)
    do = torch.randn(1, 2, 19, 16)
    whole = _run(lambda a, b_, c: attention(a, b_, c, mask=mask, backend=backend), q, k, v, do)

    def merged(a, b_, c):
        parts = [attention(a, kb, vb, mask=mb, backend=backend, return_lse=True)
                 for kb, vb, mb in zip(b_.split(25, dim=2), c.split(25, dim=2), mask.split(25, dim=1))]
        lse = torch.logsumexp(torch.stack([l for _, l in parts]), dim=0)
        return sum(o * torch.exp(l - lse)[..., None] for o, l in parts)

    for got, expected in zip(_run(merged, q, k, v, do), whole):
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_other_backends_agree_with_reference(backend):
    q, k, v = _qkv(2, 2, 37, 21, 32, torch.float32)
    mask = _mask(2, 21)
    for causal in (False, True):
        got = attention(q, k, v, mask=mask, causal=causal, backend=backend)
        want = attention_reference(q, k, v, mask=mask, causal=causal)
        assert (got - want).abs().max() / want.abs().max() <= 1e-4


def test_bad_inputs_raise_with_shapes():
    q, k, v = _qkv(2, 1, 5, 7, 4, torch.float32)
    with pytest.raises(ValueError, match=r"mask must be \(B, N_k\)"):
        attention(q, k, v, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        attention(q, k, v, mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="disagree"):
        attention(q, k[:, :, :, :3], v)


@pytest.mark.slow
def test_torch_compile_fullgraph_with_kernel():
    q, k, v = _qkv(1, 1, 37, 21, 32, torch.float32)
    fn = torch.compile(lambda a, b_, c: attention(a, b_, c, backend="triton").sum(), fullgraph=True)
    fn(q, k, v).backward()
    assert q.grad is not None and not q.grad.isnan().any()


# ----------------------------------------------------------------------------------------------
# GPU set: bf16 and realistic sizes (pytest -m gpu on a CUDA machine, TRITON_INTERPRET=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("masked, causal", [(False, False), (True, False), (False, True)])
def test_gpu_matches_reference_at_video_sizes(dtype, d, masked, causal):
    b, h, nq, nk = 2, 8, 4099, 1031 if not causal else 4099
    q, k, v = _qkv(b, h, nq, nk, d, dtype, device="cuda")
    mask = _mask(b, nk).cuda() if masked else None
    do = (torch.randn(b, h, nq, d, device="cuda") + 0.1).to(dtype)
    got = _run(_triton(mask, causal), q, k, v, do)
    torch_lowp = _run(lambda a, b_, c: _naive(a, b_, c, mask, causal), q, k, v, do)
    want = _fp64_ref(q, k, v, do, mask, causal)
    for name, g, p, w in zip(NAMES, got, torch_lowp, want):
        ours, theirs = (g.double() - w).abs().max(), (p.double() - w).abs().max()
        assert ours <= 2 * theirs + 1e-5, f"{name}: ours {ours:.2e} vs PyTorch {dtype} {theirs:.2e}"


@pytest.mark.gpu
def test_gpu_auto_picks_a_fast_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    choice = dispatch.attention_backend(q, q, q, None, backend="auto", interpreted=attn_mod._INTERPRETED)
    major, _ = torch.cuda.get_device_capability()
    assert choice in (("triton", "sdpa") if major >= 8 else ("sdpa",))
    assert kernels.attention(q, q, q).shape == q.shape


def test_autotuning_keys_on_length_buckets_not_lengths():
    """A new sequence length inside a tuned bucket reuses the tuned blocks (the key holds no exact length)."""
    assert [attn_mod.length_bucket(n) for n in (1, 37, 128, 129, 4096, 4097, 20280)] == [
        128, 128, 128, 256, 4096, 8192, 32768]
    assert "N_Q" not in attn_mod._TUNE_KEY and "N_K" not in attn_mod._TUNE_KEY
    assert {"N_Q_BUCKET", "N_K_BUCKET", "D"} <= set(attn_mod._TUNE_KEY)
    for kernel in (attn_mod._attn_fwd_kernel, attn_mod._attn_bwd_dq_kernel, attn_mod._attn_bwd_dkdv_kernel):
        assert {"N_Q_BUCKET", "N_K_BUCKET"} <= set(kernel.arg_names)


def test_tuning_candidates_are_pruned_by_shared_memory():
    import triton

    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=4, num_stages=st)
               for m, n, st in [(128, 128, 3), (128, 64, 3), (64, 32, 2)]]
    limit = 227 * 1024  # H100/H200 opt-in shared memory per block
    sizes = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in cs]  # noqa: E731
    assert sizes(attn_mod.fitting_configs(configs, block_d=128, element_size=2, limit=limit)) == [(128, 128), (128, 64), (64, 32)]
    # tiles (BLOCK_M + 2·stages·BLOCK_N)·D·bytes: fp32 doubles them, and only 64×32 still fits
    assert sizes(attn_mod.fitting_configs(configs, block_d=128, element_size=4, limit=limit)) == [(64, 32)]
    assert sizes(attn_mod.fitting_configs(configs, block_d=64, element_size=2, limit=1024)) == [(64, 32)]  # smallest
