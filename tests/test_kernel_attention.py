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


def _plain_lse(q, k, v, mask, causal):
    """(out, lse) by plain autograd ops in the inputs' dtype; lse = -inf for a query with no kept key."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril(nk - nq), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v, torch.logsumexp(s, -1)


def _loss_with_lse(out, lse, w, u):
    """A loss of out (weights w) and lse (weights u; empty rows' -inf left out), as ring attention's merge uses
    both; a weight None leaves that output out of the graph."""
    loss = 0.0 if w is None else (out.double() * w).sum()
    return loss + (0.0 if u is None else (torch.where(torch.isinf(lse), 0.0, lse.double()) * u).sum())


def _lse_run(fn, q, k, v, w, u):
    """[out, lse, dq, dk, dv] of ``fn(q, k, v) -> (out, lse)`` under the loss ``_loss_with_lse``."""
    out, lse = fn(q, k, v)
    return [out, lse, *torch.autograd.grad(_loss_with_lse(out, lse, w, u), (q, k, v), materialize_grads=True)]


def _lse_case(backend, dtype, mask, causal, loss_uses=("out", "lse")):
    """(B, H, Nq, Nk, D) = (2, 3, 37, 45, 24): ([out, lse, dq, dk, dv] of ``attention(return_lse=True)``,
    the same from the float64 reference, the inputs and loss weights) for a loss of out, lse or both."""
    q, k, v = _qkv(2, 3, 37, 45, 24, dtype)
    w, u = torch.randn(2, 3, 37, 24, dtype=torch.float64), torch.randn(2, 3, 37, dtype=torch.float64)
    w, u = (w if "out" in loss_uses else None), (u if "lse" in loss_uses else None)

    def ours(a, b_, c):
        with dispatch.nan_filled_outputs():
            return attention(a, b_, c, mask=mask, causal=causal, backend=backend, return_lse=True)

    got = _lse_run(ours, q, k, v, w, u)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = _lse_run(lambda a, b_, c: _plain_lse(a, b_, c, mask, causal), *ref_inputs, w, u)
    return got, want, (q, k, v, w, u)


def _max_errors(got, want):
    """Max absolute error per tensor over finite reference entries (an empty row's lse is -inf in both)."""
    errors = {}
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        finite = torch.isfinite(w)
        assert torch.equal(torch.isfinite(g), finite), f"{name}: non-finite entries differ from the reference"
        errors[name] = (g.double() - w)[finite].abs().max().item()
    return errors


@pytest.mark.parametrize("backend", ["triton", "torch", "sdpa", "auto"])
@pytest.mark.parametrize("masked, causal", [(False, False), (True, False), (False, True), (True, True)])
def test_return_lse_matches_reference_forward_and_gradients_through_both_outputs(backend, masked, causal):
    mask = _mask(2, 45, all_masked_row=True) if masked else None
    got, want, _ = _lse_case(backend, torch.float32, mask, causal)
    out, lse = got[:2]
    assert out.shape == (2, 3, 37, 24) and lse.shape == (2, 3, 37) and lse.dtype == torch.float32
    if masked:  # the last batch element sees no key: zeros and lse = -inf, so a merge weighs it exp(-inf) = 0
        assert (lse[-1] == float("-inf")).all() and (out[-1] == 0).all()
    else:
        assert torch.isfinite(lse).all()
    errors = _max_errors(got, want)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_return_lse_in_half_precision_is_fp32_and_within_pytorch_low_precision_error(dtype):
    """16-bit inputs: lse is fp32, and every error ≤ 2× that of PyTorch computing the same in the input dtype."""
    mask = _mask(2, 45, all_masked_row=True)
    got, want, (q, k, v, w, u) = _lse_case("triton", dtype, mask, False)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    lowp = _lse_run(lambda a, b_, c: _plain_lse(a, b_, c, mask, False), q, k, v, w, u)
    ours, theirs = _max_errors(got, want), _max_errors(lowp, want)
    for name in ours:
        assert ours[name] <= 2 * theirs[name] + 1e-6, f"{name}: ours {ours[name]:.2e} vs PyTorch {theirs[name]:.2e}"


@pytest.mark.parametrize("loss_uses", [("out",), ("lse",)])
def test_each_output_alone_carries_its_gradient(loss_uses, monkeypatch):
    """A loss of out alone runs the backward without the lse term (dlse None, the kernel's HAS_DLSE off);
    a loss of lse alone runs it with a zero dO."""
    seen = []
    real = attn_mod._flash_bwd_impl

    def spy(do, q, k, v, o, lse, dlse, *rest):
        seen.append(dlse)
        return real(do, q, k, v, o, lse, dlse, *rest)

    monkeypatch.setattr(attn_mod, "_flash_bwd_impl", spy)
    got, want, _ = _lse_case("triton", torch.float32, _mask(2, 45, all_masked_row=True), True, loss_uses)
    assert len(seen) == 1 and (seen[0] is None) == (loss_uses == ("out",))
    errors = _max_errors(got, want)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_blocks_of_keys_merged_by_lse_equal_attention_over_all_keys(backend):
    """Ring attention's merge: out = Σ_b exp(lse_b − lse) out_b, lse = logsumexp_b lse_b, forward and gradients.
    Batch element 0 has no kept key in the first block, so that block's lse is -inf there and weighs 0."""
    q, k, v = _qkv(2, 2, 19, 40, 16, torch.float32)
    mask = _mask(2, 40)
    mask[0, :25] = False
    mask[0, 30] = True
    do = torch.randn(2, 2, 19, 16)
    whole = _run(lambda a, b_, c: attention(a, b_, c, mask=mask, backend=backend), q, k, v, do)

    merged_lse = []

    def merged(a, b_, c):
        parts = [attention(a, kb, vb, mask=mb, backend=backend, return_lse=True)
                 for kb, vb, mb in zip(b_.split(25, dim=2), c.split(25, dim=2), mask.split(25, dim=1))]
        lse = torch.logsumexp(torch.stack([l for _, l in parts]), dim=0)
        merged_lse.append(lse)
        return sum(o * torch.exp(l - lse)[..., None] for o, l in parts)

    for got, expected in zip(_run(merged, q, k, v, do), whole):
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    _, whole_lse = attention(q, k, v, mask=mask, backend=backend, return_lse=True)
    torch.testing.assert_close(merged_lse[0], whole_lse, atol=2e-6, rtol=0)


def test_auto_with_return_lse_takes_the_kernel_wherever_it_runs():
    """SDPA does not return the lse, so with return_lse "auto" takes Triton even where the table says SDPA and
    for fp32, and the reference (not SDPA) where Triton cannot run."""
    from types import SimpleNamespace

    from lvd.kernels.dispatch import Machine

    def fake_cuda(dtype):
        return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(1, 2, 64, 128),
                               stride=lambda: (2 * 64 * 128, 64 * 128, 128, 1))

    def choose(q, machine, **kw):
        return dispatch.attention_backend(q, q, q, None, backend="auto", interpreted=False, machine=machine, **kw)

    h200, turing = Machine(cuda_capability=(9, 0), cuda_name="NVIDIA H200"), Machine(cuda_capability=(7, 5))
    assert choose(fake_cuda(torch.bfloat16), h200) == "sdpa"  # the shipped table, without the lse
    assert choose(fake_cuda(torch.bfloat16), h200, return_lse=True) == "triton"
    assert choose(fake_cuda(torch.float32), h200, return_lse=True) == "triton"
    assert choose(fake_cuda(torch.bfloat16), turing, return_lse=True) == "torch"
    cpu = torch.zeros(1, 2, 5, 8)
    assert dispatch.attention_backend(cpu, cpu, cpu, None, backend="auto", interpreted=attn_mod._INTERPRETED,
                                      return_lse=True) == "torch"


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
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_return_lse_within_pytorch_bf16_error(masked):
    """bf16 at a video-like size: out, the fp32 lse and the gradients of a loss of both, each ≤ 2× PyTorch's
    own bf16 error against float64 (auto takes the kernel, SDPA returning no lse)."""
    b, h, nq, nk, d = 2, 8, 4099, 1031, 64
    q, k, v = _qkv(b, h, nq, nk, d, torch.bfloat16, device="cuda")
    mask = _mask(b, nk, all_masked_row=True).cuda() if masked else None
    w = torch.randn(b, h, nq, d, dtype=torch.float64, device="cuda")
    u = torch.randn(b, h, nq, dtype=torch.float64, device="cuda")
    got = _lse_run(lambda a, b_, c: attention(a, b_, c, mask=mask, return_lse=True), q, k, v, w, u)
    bf16 = _lse_run(lambda a, b_, c: _plain_lse(a, b_, c, mask, False), q, k, v, w, u)
    want = _lse_run(lambda a, b_, c: _plain_lse(a, b_, c, mask, False),
                    *(t.detach().double().requires_grad_() for t in (q, k, v)), w, u)
    assert got[1].dtype == torch.float32
    ours, theirs = _max_errors(got, want), _max_errors(bf16, want)
    for name in ours:
        assert ours[name] <= 2 * theirs[name] + 1e-5, f"{name}: ours {ours[name]:.2e} vs PyTorch {theirs[name]:.2e}"


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
