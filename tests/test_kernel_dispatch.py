"""lvd.kernels.dispatch: which backend runs, forced backends that cannot run, LVD_KERNELS, import safety."""

import importlib
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lvd import kernels
from lvd.kernels import BackendUnavailableError, dispatch
from lvd.kernels.dispatch import Machine

attn_mod = importlib.import_module("lvd.kernels.attention")


def _q(dtype=torch.float32):
    return torch.randn(1, 2, 5, 8, dtype=dtype)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("LVD_KERNELS", raising=False)
    dispatch._logged.clear()


def test_auto_on_cpu_uses_sdpa_for_attention_and_reference_for_group_norm():
    q = _q()
    assert dispatch.attention_backend(q, q, q, None, backend="auto", interpreted=True) == "sdpa"
    assert dispatch.group_norm_backend(torch.randn(1, 4, 3, 3), backend="auto", interpreted=True) == "torch"


def test_lvd_kernels_env_sets_the_default(monkeypatch):
    q = _q()
    monkeypatch.setenv("LVD_KERNELS", "torch")
    assert dispatch.attention_backend(q, q, q, None, backend="auto", interpreted=True) == "torch"
    monkeypatch.setenv("LVD_KERNELS", "triton")
    assert dispatch.attention_backend(q, q, q, None, backend="auto", interpreted=True) == "triton"
    # an explicit argument beats the environment
    assert dispatch.attention_backend(q, q, q, None, backend="sdpa", interpreted=True) == "sdpa"


def test_env_and_argument_typos_are_errors(monkeypatch):
    q = _q()
    with pytest.raises(ValueError, match="not one of"):
        kernels.attention(q, q, q, backend="flash")
    monkeypatch.setenv("LVD_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LVD_KERNELS='cuda'"):
        kernels.attention(q, q, q)


def test_group_norm_treats_sdpa_and_xformers_as_the_reference(monkeypatch):
    x = torch.randn(1, 4, 3, 3)
    for name in ("sdpa", "xformers"):
        assert dispatch.group_norm_backend(x, backend=name, interpreted=True) == "torch"
    monkeypatch.setenv("LVD_KERNELS", "sdpa")  # one setting for the whole library: "no Triton"
    torch.testing.assert_close(kernels.group_norm(x, 2), kernels.group_norm_reference(x, 2))


def test_forcing_xformers_without_it_or_without_cuda_raises():
    q = _q()
    with pytest.raises(BackendUnavailableError, match="xformers is not installed"):
        dispatch.attention_backend(q, q, q, None, backend="xformers", interpreted=True,
                                   machine=Machine(has_xformers=False))
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):  # installed, but CPU tensors
        dispatch.attention_backend(q, q, q, None, backend="xformers", interpreted=True,
                                   machine=Machine(has_xformers=True))
    if not dispatch.has_xformers():  # the same through the public op, with this machine's own facts
        with pytest.raises(BackendUnavailableError, match="xformers is not installed"):
            kernels.attention(q, q, q, backend="xformers")


def test_env_preference_that_cannot_run_falls_back_with_one_warning(monkeypatch, caplog):
    """LVD_KERNELS states a preference; only the backend= argument forces (and raises)."""
    q = _q()
    big = torch.randn(1, 1, 4, 256)  # a 256-wide head, like the VAE's single-head frame attention
    monkeypatch.setenv("LVD_KERNELS", "triton")
    with caplog.at_level(logging.WARNING, logger="lvd.kernels.dispatch"):
        for _ in range(2):
            assert dispatch.attention_backend(big, big, big, None, backend="auto", interpreted=True) == "sdpa"
    assert len([r for r in caplog.records if "head dim 256" in r.getMessage()]) == 1
    monkeypatch.setenv("LVD_KERNELS", "xformers")
    assert dispatch.attention_backend(q, q, q, None, backend="auto", interpreted=True,
                                      machine=Machine(has_xformers=False)) == "sdpa"
    with pytest.raises(BackendUnavailableError, match="head dim 256"):
        dispatch.attention_backend(big, big, big, None, backend="triton", interpreted=True)


def test_forcing_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    q = _q()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        dispatch.attention_backend(q, q, q, None, backend="triton", interpreted=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set too late: the kernels were decorated without it
    with pytest.raises(BackendUnavailableError, match="set it before importing lvd.kernels"):
        dispatch.group_norm_backend(torch.randn(1, 4, 3, 3), backend="triton", interpreted=False)


def test_forcing_triton_with_an_unsupported_dtype_or_head_dim_raises():
    q = _q()
    big = torch.randn(1, 1, 4, 256)
    with pytest.raises(BackendUnavailableError, match="head dim 256"):
        dispatch.attention_backend(big, big, big, None, backend="triton", interpreted=True)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    assert dispatch.group_norm_backend(x, backend="triton", interpreted=True) == "triton"  # fp64: interpreter only
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64"):
        dispatch._resolve("group_norm", "triton", True, "dtype torch.float64 (supported: fp16, bf16, fp32)", "torch", q)


def test_auto_falls_back_on_old_gpus_and_logs_the_reason_once(caplog):
    x = torch.empty(1, 4, 3, 3, device="meta")
    fake_cuda = SimpleNamespace(device=torch.device("cuda", 0), dtype=x.dtype, shape=x.shape, stride=x.stride)
    turing, hopper = Machine(cuda_capability=(7, 5)), Machine(cuda_capability=(9, 0))
    with caplog.at_level(logging.INFO, logger="lvd.kernels.dispatch"):
        for _ in range(3):
            assert dispatch.group_norm_backend(fake_cuda, backend="auto", interpreted=False, machine=turing) == "torch"
    records = [r for r in caplog.records if "capability 7.5" in r.getMessage()]
    assert len(records) == 1
    assert dispatch.group_norm_backend(fake_cuda, backend="auto", interpreted=False, machine=hopper) == "triton"


def test_nan_filled_outputs_only_inside_the_block():
    with dispatch.nan_filled_outputs():
        assert dispatch.new_empty((3,), dtype=torch.float32, device="cpu").isnan().all()
        like = dispatch.new_empty_like(torch.randn(1, 4, 3, 3).to(memory_format=torch.channels_last))
        assert like.isnan().all() and like.is_contiguous(memory_format=torch.channels_last)
    assert not dispatch._nan_outputs


def test_import_touches_no_gpu_driver():
    """A fresh interpreter without TRITON_INTERPRET imports lvd.kernels and runs the CPU paths."""
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import torch\nfrom lvd import kernels\n"
        "q = torch.randn(1, 1, 4, 8)\n"
        "kernels.attention(q, q, q); kernels.group_norm(torch.randn(1, 4, 2, 2), 2)\n"
        "assert not torch.cuda.is_initialized()\n"
        "from triton.runtime import driver\n"
        "assert driver._default is None and driver._active is None, 'driver was touched'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_slices_past_int32_indexing_are_refused():
    huge = SimpleNamespace(shape=(1, 1, 2, 1), stride=lambda: (1, 1, 2**31, 1))  # (N−1)·stride = 2³¹
    assert "2³¹" in dispatch._int32_reason([huge], first_dims=2)
    assert dispatch._int32_reason([torch.empty(2, 3, 4, 5)], first_dims=2) is None


COMPILE_CHECK = r'''
import importlib, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

A = importlib.import_module("lvd.kernels.attention")
G = importlib.import_module("lvd.kernels.group_norm")
FLOATS = {"qk_scale", "scale", "eps"}


def build(fn, ptrs, consts, cap, warps, stages):
    sig, cexpr = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], cexpr[(i,)] = "constexpr", consts[name]
        else:
            sig[name] = ptrs.get(name, "fp32" if name in FLOATS else "i32")
    src = ASTSource(fn=fn, signature=sig, constexprs=cexpr)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(num_warps=warps, num_stages=stages))


attn_ptrs = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
attn_ptrs.update(Mask="*u8", LSE="*fp32", DLSE="*fp32", DELTA="*fp32")
gn_ptrs = {n: "*bf16" for n in ("X", "Y", "W", "B", "DY", "DX")}
gn_ptrs.update({n: "*fp32" for n in ("PART", "MEAN", "RSTD", "DWP", "DBP")})
for cap in (80, 90):
    for fn in (A._attn_fwd_kernel, A._attn_bwd_dq_kernel, A._attn_bwd_dkdv_kernel):
        consts = dict(CAUSAL=True, HAS_MASK=True, HAS_DLSE=True, UPCAST=False, ACC=tl.float32, PREC="tf32",
                      BLOCK_M=64, BLOCK_N=64, BLOCK_D=128)
        k = build(fn, attn_ptrs, consts, cap, 8, 2)
        assert k.metadata.shared <= 166912, (fn.__name__, k.metadata.shared)
        # Hopper: tl.dot lowers to warpgroup MMA (wgmma); Ampere: mma.sync
        assert ("wgmma" if cap == 90 else "mma.sync") in k.asm["ptx"], (cap, fn.__name__)
    for fn in (G._gn_stats_kernel, G._gn_fwd_kernel, G._gn_bwd_reduce_kernel, G._gn_bwd_dx_kernel):
        consts = dict(HAS_W=True, HAS_B=True, SILU=True, ACC=tl.float32, BLOCK_C=4, BLOCK_S=512, BLOCK_P=64)
        build(fn, gn_ptrs, {k: v for k, v in consts.items() if k in fn.arg_names}, cap, G._GPU_WARPS, 2)
print("compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90_without_a_gpu():
    """The interpreter is more permissive than the compiler: compile every kernel to a cubin (ptxas ships
    with triton, no GPU needed) so type errors and shared-memory overflows show up on a CPU machine."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE_CHECK], capture_output=True, text=True, timeout=900,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled" in out.stdout


def test_meta_tensors_go_through_the_fake_implementations():
    """Shape-only (meta) tensors work with Triton forced: models checked on meta need no real kernel."""
    q = torch.empty(1, 2, 37, 64, device="meta")
    assert kernels.attention(q, q, q, backend="triton").shape == q.shape
    x = torch.empty(1, 8, 3, 9, 9, device="meta")
    assert kernels.group_norm(x, 2, backend="triton", per_frame=True).shape == x.shape


@pytest.mark.slow
def test_auto_dispatch_compiles_without_graph_breaks():
    """The backend choice (and its one-time log) is traced by torch.compile without breaking the graph."""
    q = torch.randn(1, 2, 16, 32, requires_grad=True)
    x = torch.randn(1, 8, 3, 4, 4, requires_grad=True)
    fn = torch.compile(lambda q_, x_: kernels.attention(q_, q_, q_).sum()
                       + kernels.group_norm(x_, 2, per_frame=True, silu=True).sum(), fullgraph=True)
    fn(q, x).backward()
    assert q.grad is not None and x.grad is not None


def test_triton_36_interpreter_with_numpy_24_is_refused():
    """Triton issue 9171: that pair mis-runs range(0, n, BLOCK) loops, so the kernels would be wrong."""
    x = torch.randn(1, 4, 3, 3)
    buggy = Machine(triton_version="3.6.0", numpy_version="2.4.1")
    with pytest.raises(BackendUnavailableError, match="9171"):
        dispatch.group_norm_backend(x, backend="triton", interpreted=True, machine=buggy)
    for fine in (Machine(triton_version="3.7.1", numpy_version="2.4.1"),
                 Machine(triton_version="3.6.0", numpy_version="2.3.5")):
        assert dispatch.group_norm_backend(x, backend="triton", interpreted=True, machine=fine) == "triton"


# ----------------------------------------------------------------------------------------------
# The attention table


def _fake_cuda(dtype=torch.bfloat16, head_dim=128):
    """Enough of a CUDA tensor for dispatch: device, dtype, shape and strides."""
    shape = (1, 2, 64, head_dim)
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=shape,
                           stride=lambda: (2 * 64 * head_dim, 64 * head_dim, head_dim, 1))


def test_shipped_table_picks_sdpa_unmasked_on_h200_and_defaults_elsewhere():
    table = dispatch.attention_table()
    assert dispatch.fastest_attention("NVIDIA H200", "bfloat16", 128, False, table)[0] == "sdpa"
    assert dispatch.fastest_attention("NVIDIA H200", "bfloat16", 80, False, table)[0] == "sdpa"  # nearest: 64
    assert dispatch.fastest_attention("NVIDIA H200", "bfloat16", 128, True, table)[0] == "sdpa"  # measured 1.13x
    choice, why = dispatch.fastest_attention("NVIDIA A100-SXM4-80GB", "bfloat16", 128, True, table)
    assert choice == "triton" and "no measurement" in why
    assert dispatch.fastest_attention("NVIDIA A100-SXM4-80GB", "float16", 64, False, table)[0] == "sdpa"


def test_users_table_comes_first_and_a_broken_one_is_ignored(tmp_path, monkeypatch, caplog):
    mine = tmp_path / "mine.json"
    mine.write_text('{"entries": [{"gpu": "H200", "dtype": "bfloat16", "head_dim": 128, "masked": false,'
                    ' "fastest": "triton"}]}')
    monkeypatch.setenv("LVD_ATTENTION_TABLE", str(mine))
    assert dispatch.user_attention_table_path() == mine
    assert dispatch.fastest_attention("NVIDIA H200", "bfloat16", 128, False, dispatch.attention_table())[0] == "triton"
    broken = tmp_path / "broken.json"
    broken.write_text('{"entries": [{"gpu": "H200", "fastest": "cudnn"}]}')
    monkeypatch.setenv("LVD_ATTENTION_TABLE", str(broken))
    with caplog.at_level(logging.WARNING, logger="lvd.kernels.dispatch"):
        assert dispatch.fastest_attention("NVIDIA H200", "bfloat16", 128, False, dispatch.attention_table())[0] == "sdpa"
    assert "ignoring attention table" in caplog.text and str(broken) in caplog.text


def test_auto_on_cuda_consults_the_table(tmp_path, monkeypatch):
    """backend='auto' with CUDA tensors where Triton could run takes the table's answer."""
    h200 = Machine(cuda_capability=(9, 0), cuda_name="NVIDIA H200")
    ada = Machine(cuda_capability=(8, 9), cuda_name="NVIDIA RTX 6000 Ada Generation")  # not measured
    monkeypatch.setenv("LVD_ATTENTION_TABLE", str(tmp_path / "none.json"))
    q = _fake_cuda()
    mask = SimpleNamespace(device=q.device, dtype=torch.bool, shape=(1, 64), stride=lambda: (64, 1))

    def choose(mask, backend="auto", machine=h200):
        return dispatch.attention_backend(q, q, q, mask, backend=backend, interpreted=False, machine=machine)

    assert choose(None) == "sdpa"  # the shipped table
    assert choose(mask) == "sdpa"
    assert choose(None, backend="triton") == "triton"  # forced
    mine = tmp_path / "mine.json"
    mine.write_text('{"entries": [{"gpu": "H200", "dtype": "bfloat16", "head_dim": 128, "masked": true,'
                    ' "fastest": "triton"}]}')
    monkeypatch.setenv("LVD_ATTENTION_TABLE", str(mine))
    assert choose(mask) == "triton"
    assert choose(mask, machine=ada) == "triton"
    assert choose(None, machine=ada) == "sdpa"
