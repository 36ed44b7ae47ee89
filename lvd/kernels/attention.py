"""Attention: O = softmax(Q Kᵀ · scale + mask) V over (B, H, N, D) tensors.

The Triton path is FlashAttention-2 (Dao, 2023, arXiv:2307.08691): the forward streams K/V blocks
through an online softmax (running max m and sum l, rescaled by 2^(m_old − m_new)) and saves the
log-sum-exp L = m + log l per query row; the backward recomputes P = exp(S − L) block by block:

    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − δ),  δ = rowsum(dO ∘ O),   dQ = dS K · scale,   dK = dSᵀ Q · scale

dK/dV come from one kernel (a program per key block, looping over query blocks) and dQ from another
(a program per query block, looping over key blocks), so no gradient needs atomics and the result is
deterministic. Any N_q, N_k (tails masked), head dims up to 128 (padded to a power-of-2 block and
masked), a boolean key-padding mask (B, N_k) with True = keep, causal masking aligned bottom-right
(query i sees keys j ≤ i + N_k − N_q, as ``tril(N_k − N_q)``), and strided inputs (strides are kernel
arguments, so ``rearrange(x, "b n (h d) -> b h n d")`` views need no copy). Softmax statistics and
accumulators are fp32 (fp64 for fp64 inputs, which only the interpreter runs, for gradcheck); fp16 and
bf16 feed the tensor cores directly. A fully masked query row gives zeros and L = +inf.

On a GPU the block sizes are autotuned per (length bucket, D, causal, mask, dtype) from FlashAttention-2-style
candidates (see :func:`_tune`); the grid is one flat axis (B·H may exceed CUDA's 65,535 limit on the other
axes). Throughput against SDPA is in benchmarks/results/ and README.

Autograd and torch.compile go through ``torch.library.custom_op`` (``lvd::flash_attention_fwd`` /
``_bwd``) with fake and autograd registrations, so compiled graphs do not break at the kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lvd.kernels import dispatch

if dispatch.HAS_TRITON:
    import triton
    import triton.language as tl

    # Lengths are not specialised on (Triton would compile a variant per N % 16 == 0 and N == 1): one binary
    # serves every sequence length. The buckets exist only as autotuning keys (see _tune).
    _jit = triton.jit(do_not_specialize=["N_Q", "N_K", "N_Q_BUCKET", "N_K_BUCKET"])
else:  # pragma: no cover - no Triton wheel on this platform; dispatch never picks "triton"
    triton = tl = None

    def _jit(fn):
        return fn


# ----------------------------------------------------------------------------------------------
# PyTorch paths


def _reference_scores(q, k, mask, scale, causal) -> torch.Tensor:
    """q kᵀ · scale in fp32 (fp64 for fp64 inputs), (B, H, Nq, Nk), with dropped keys at −inf."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), k.to(acc)) * scale  # (B, H, Nq, Nk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        nq, nk = scores.shape[-2:]
        keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def attention_reference(q, k, v, *, mask=None, scale=None, causal=False):
    """Plain PyTorch attention in fp32 (fp64 for fp64 inputs); the test oracle.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); mask: (B, Nk) bool, True where a key is kept.
    """
    scores = _reference_scores(q, k, mask, scale, causal)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row gives zeros
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.to(scores.dtype)).to(q.dtype)


def attention_reference_lse(q, k, v, *, mask=None, scale=None, causal=False):
    """:func:`attention_reference` that also returns the log-sum-exp of each query's kept scores:
    ``(out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32, fp64 for fp64 inputs)``; −inf for a fully masked row."""
    scores = _reference_scores(q, k, mask, scale, causal)
    peak = scores.amax(dim=-1, keepdim=True).detach()
    peak = peak.masked_fill(peak == float("-inf"), 0.0)  # an empty row: every exp is 0 (not NaN), its sum too
    exps = torch.exp(scores - peak)
    total = exps.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)  # no 0/0 in the backward
    lse = torch.where(exps.sum(dim=-1) > 0, total.log().squeeze(-1) + peak.squeeze(-1), float("-inf"))  # (B, H, Nq)
    return torch.einsum("bhqk,bhkd->bhqd", exps / total, v.to(scores.dtype)).to(q.dtype), lse


def _attention_sdpa(q, k, v, mask, scale, causal):
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Nk)
    if causal and attn_mask is not None:
        nq, nk = q.shape[-2], k.shape[-2]
        attn_mask = attn_mask & torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)


def _attention_xformers(q, k, v, mask, scale, causal):
    """xformers memory-efficient attention; CUDA only (checked by dispatch)."""
    import xformers.ops as xops

    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, H, D), xformers' layout
    bias = None
    if mask is not None or (causal and nq != nk):
        keep = torch.ones(b, 1, nq, nk, dtype=torch.bool, device=q.device)
        if mask is not None:
            keep = keep & mask[:, None, None, :]
        if causal:
            keep = keep & torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        pad = -nk % 8  # xformers wants the bias' last dim 8-aligned in memory
        bias = torch.zeros(b, h, nq, nk + pad, dtype=q.dtype, device=q.device)[..., :nk]
        bias.masked_fill_(~keep, float("-inf"))
    elif causal:
        bias = xops.LowerTriangularMask()
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Triton kernels


@_jit
def _attn_fwd_kernel(
    Q, K, V, Mask, O, LSE,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, smb, smn,
    H, N_Q, N_K, N_Q_BUCKET, N_K_BUCKET, D, qk_scale,  # qk_scale = scale · log2(e): the softmax runs in base 2
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one flat grid axis (CUDA caps axis 1 at 65,535; factorized video attention has B·H in the 100ks),
    # query blocks fastest so neighbouring programs share their head's K/V in L2
    num_m = (N_Q + BLOCK_M - 1) // BLOCK_M
    pid_m = tl.program_id(0) % num_m
    pid_bh = (tl.program_id(0) // num_m).to(tl.int64)  # batch/head offsets may pass 2³¹ elements
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < N_Q) & d_ok[None, :], other=0.0)
    if UPCAST:  # bf16 arithmetic is broken in the interpreter: compute in fp32 there
        q = q.to(tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    hi = N_K
    if CAUSAL:  # keys past the last row's diagonal are never seen by this block
        hi = tl.minimum(N_K, tl.maximum((pid_m + 1) * BLOCK_M + N_K - N_Q, 0))
    for start_n in range(0, hi, BLOCK_N):
        offs_kn = start_n + offs_n
        kn_ok = offs_kn < N_K
        kt = tl.load(k_base + offs_kn[None, :] * skn + offs_d[:, None] * skd,
                     mask=kn_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(v_base + offs_kn[:, None] * svn + offs_d[None, :] * svd,
                    mask=kn_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC, out_dtype=ACC) * qk_scale  # (BLOCK_M, BLOCK_N)
        keep = kn_ok[None, :]
        if HAS_MASK:
            km = tl.load(Mask + b * smb + offs_kn * smn, mask=kn_ok, other=0)
            keep = keep & (km != 0)[None, :]
        if CAUSAL:
            keep = keep & (offs_kn[None, :] <= offs_m[:, None] + (N_K - N_Q))
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: avoid −inf − (−inf)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    m_ok = offs_m < N_Q
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * N_Q + offs_m, lse.to(LSE.dtype.element_ty), mask=m_ok)


@_jit
def _attn_bwd_dq_kernel(
    Q, K, V, Mask, O, DO, LSE, DLSE, DELTA, DQ,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd, smb, smn,
    H, N_Q, N_K, N_Q_BUCKET, N_K_BUCKET, D, scale, qk_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DLSE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ for one query block; also writes δ = rowsum(dO ∘ O) − dL for the dK/dV kernel (dL: the gradient of the
    log-sum-exp output, when the caller used it; ∂L_i/∂s_ij = p_ij, so it enters dS = P ∘ (dP − δ) through δ)."""
    # one flat grid axis (CUDA caps axis 1 at 65,535; factorized video attention has B·H in the 100ks),
    # query blocks fastest so neighbouring programs share their head's K/V in L2
    num_m = (N_Q + BLOCK_M - 1) // BLOCK_M
    pid_m = tl.program_id(0) % num_m
    pid_bh = (tl.program_id(0) // num_m).to(tl.int64)  # batch/head offsets may pass 2³¹ elements
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < N_Q
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=md_ok, other=0.0)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=md_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0).to(ACC)
    tl.store(DELTA + pid_bh * N_Q + offs_m, delta, mask=m_ok)
    lse2 = tl.load(LSE + pid_bh * N_Q + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, tl.maximum((pid_m + 1) * BLOCK_M + N_K - N_Q, 0))
    for start_n in range(0, hi, BLOCK_N):
        offs_kn = start_n + offs_n
        kn_ok = offs_kn < N_K
        k = tl.load(k_base + offs_kn[:, None] * skn + offs_d[None, :] * skd,
                    mask=kn_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        vt = tl.load(v_base + offs_kn[None, :] * svn + offs_d[:, None] * svd,
                     mask=kn_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        keep = kn_ok[None, :] & m_ok[:, None]
        if HAS_MASK:
            km = tl.load(Mask + b * smb + offs_kn * smn, mask=kn_ok, other=0)
            keep = keep & (km != 0)[None, :]
        if CAUSAL:
            keep = keep & (offs_kn[None, :] <= offs_m[:, None] + (N_K - N_Q))
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, vt, input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=md_ok)


@_jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, Mask, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smn,
    H, N_Q, N_K, N_Q_BUCKET, N_K_BUCKET, D, scale, qk_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK and dV for one key block, looping over the query blocks that see it (Sᵀ layout)."""
    num_n = (N_K + BLOCK_N - 1) // BLOCK_N  # flat grid, key blocks fastest (see the forward)
    pid_n = tl.program_id(0) % num_n
    pid_bh = (tl.program_id(0) // num_n).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < N_K
    nd_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    keep_n = n_ok
    if HAS_MASK:
        km = tl.load(Mask + b * smb + offs_n * smn, mask=n_ok, other=0)
        keep_n = keep_n & (km != 0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    lo = 0
    if CAUSAL:  # query rows above this block's first key's diagonal never see it
        lo = tl.maximum(pid_n * BLOCK_N - (N_K - N_Q), 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, N_Q, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < N_Q
        qt = tl.load(q_base + offs_m[None, :] * sqm + offs_d[:, None] * sqd,
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_M)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(LSE + pid_bh * N_Q + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=PREC, out_dtype=ACC) * qk_scale  # (BLOCK_N, BLOCK_M) = Sᵀ
        keep = keep_n[:, None] & m_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[:, None] <= offs_m[None, :] + (N_K - N_Q))
        pt = tl.where(keep, tl.math.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC, out_dtype=ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=ACC)  # (BLOCK_N, BLOCK_M) = dPᵀ
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PREC, out_dtype=ACC)
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             (dk * scale).to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=nd_ok)


# ----------------------------------------------------------------------------------------------
# Launchers

_INTERPRETED = dispatch.HAS_TRITON and dispatch.triton_interpreter_requested()  # read at decoration, as Triton does
# The interpreter gets fixed 32×32 blocks: each program instance costs ~3 ms there, and 32 still exercises
# tails and multi-block loops at the test shapes (N = 37, 129). Autotune would need a CPU timer there.
_INTERPRETER_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
# Tuned once per (length bucket, head dim, flags, dtype): a new sequence length in a tuned bucket costs nothing.
_TUNE_KEY = ["N_Q_BUCKET", "N_K_BUCKET", "D", "CAUSAL", "HAS_MASK", "PREC", "BLOCK_D"]  # + tensor dtypes (Triton adds them; they fix ACC)
# Autotuning times each candidate for 5 + 20 ms (Triton's default 25 + 100 ms made each new shape cost tens of
# seconds over 3 kernels × 6 candidates); results are also kept on disk, so other processes reuse them.
_TUNE_WARMUP_MS, _TUNE_REP_MS = 5, 20


def length_bucket(n: int) -> int:
    """The autotuning key for a sequence length: the power of two at or above n (at least 128)."""
    return max(128, 1 << (max(n, 1) - 1).bit_length())


def _shared_memory_limit() -> int:
    """Bytes of shared memory one program may use on the current GPU (opt-in maximum)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024


def fitting_configs(configs, *, block_d: int, element_size: int, limit: int):
    """The candidates whose tiles fit in ``limit`` bytes of shared memory (or the smallest one if none does): a
    query tile plus num_stages key and value tiles of ``block_d`` columns at ``element_size`` bytes."""

    def footprint(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return (m + 2 * max(c.num_stages, 1) * n) * block_d * element_size

    return [c for c in configs if footprint(c) <= limit] or [min(configs, key=footprint)]


def _prune_by_shared_memory(configs, named_args, **kwargs):
    """Autotuner hook: drop candidates that cannot fit for this head dim and dtype (they would fail or spill)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    return fitting_configs(configs, block_d=block_d, element_size=named_args["Q"].element_size(),
                           limit=_shared_memory_limit())


def _tune(kernel, shapes):
    """On a GPU, autotune over (BLOCK_M, BLOCK_N, warps, stages) from FlashAttention-2-style candidates, pruned
    by shared memory, keyed by length bucket, timed briefly and cached on disk where this Triton can."""
    if _INTERPRETED or not dispatch.HAS_TRITON:
        return kernel
    import inspect

    import triton.testing

    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st) for m, n, w, st in shapes]
    options = inspect.signature(triton.autotune).parameters
    extra = {}
    if "do_bench" in options:
        extra["do_bench"] = lambda fn, quantiles: triton.testing.do_bench(
            fn, warmup=_TUNE_WARMUP_MS, rep=_TUNE_REP_MS, quantiles=quantiles)
    else:  # pragma: no cover - older Triton
        extra.update(warmup=_TUNE_WARMUP_MS, rep=_TUNE_REP_MS)
    if "cache_results" in options:
        extra["cache_results"] = True
    prune = {"early_config_prune": _prune_by_shared_memory}
    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by=prune, **extra)(kernel)


_attn_fwd = _tune(_attn_fwd_kernel, [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                                     (64, 64, 4, 4), (64, 32, 4, 3)])
_attn_bwd_dq = _tune(_attn_bwd_dq_kernel, [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2),
                                           (32, 64, 4, 2), (32, 32, 4, 2)])
_attn_bwd_dkdv = _tune(_attn_bwd_dkdv_kernel, [(64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2),
                                               (64, 32, 4, 2), (32, 32, 4, 2)])


def _consts(q):
    """Typing constexprs: fp32 accumulation (fp64 for fp64, interpreter only), head dim block."""
    wide = q.dtype in (torch.float32, torch.float64)
    return dict(
        UPCAST=_INTERPRETED and q.dtype == torch.bfloat16,  # bf16 arithmetic is broken in the interpreter
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
        PREC="ieee" if wide else "tf32",  # fp32 stays fp32 (tf32 would cost ~1e-3 relative error); 16-bit ignores it
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        **(_INTERPRETER_BLOCKS if _INTERPRETED else {}),
    )


def _mask_args(mask, q):
    if mask is None:
        return q, 0, 0  # dummy pointer, never read (HAS_MASK=False)
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, m.stride(0), m.stride(1)


def _stat_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _flash_fwd_impl(q, k, v, mask, scale, causal):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    o = dispatch.new_empty(q.shape, dtype=q.dtype, device=q.device)
    lse = dispatch.new_empty((b, h, nq), dtype=_stat_dtype(q), device=q.device)
    m, smb, smn = _mask_args(mask, q)
    _attn_fwd[lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]) * b * h,)](
        q, k, v, m, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), smb, smn,
        h, nq, nk, length_bucket(nq), length_bucket(nk), d, scale * 1.4426950408889634,
        CAUSAL=causal, HAS_MASK=mask is not None, **_consts(q),
    )
    return o, lse


def _flash_bwd_impl(do, q, k, v, o, lse, dlse, mask, scale, causal):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dq = dispatch.new_empty(q.shape, dtype=q.dtype, device=q.device)
    dk = dispatch.new_empty(k.shape, dtype=k.dtype, device=k.device)
    dv = dispatch.new_empty(v.shape, dtype=v.dtype, device=v.device)
    delta = dispatch.new_empty((b, h, nq), dtype=_stat_dtype(q), device=q.device)
    m, smb, smn = _mask_args(mask, q)
    common = dict(CAUSAL=causal, HAS_MASK=mask is not None, **_consts(q))
    dlse = delta if dlse is None else dlse.contiguous()  # a dummy pointer when HAS_DLSE is False
    _attn_bwd_dq[lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]) * b * h,)](  # also writes δ, read below
        q, k, v, m, o, do, lse, dlse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        *do.stride(), *dq.stride(), smb, smn, h, nq, nk, length_bucket(nq), length_bucket(nk), d, scale,
        scale * 1.4426950408889634, HAS_DLSE=dlse is not delta, **common,
    )
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(nk, meta["BLOCK_N"]) * b * h,)](
        q, k, v, m, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dk.stride(), *dv.stride(), smb, smn, h, nq, nk, length_bucket(nq), length_bucket(nk), d, scale,
        scale * 1.4426950408889634, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Autograd + torch.compile: custom ops with fake (shape) and autograd registrations


@torch.library.custom_op("lvd::flash_attention_fwd", mutates_args=())
def _flash_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_fwd_impl(q, k, v, mask, scale, causal)


@_flash_fwd_op.register_fake
def _(q, k, v, mask, scale, causal):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_stat_dtype(q))


@torch.library.custom_op("lvd::flash_attention_bwd", mutates_args=())
def _flash_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, dlse: torch.Tensor | None, mask: torch.Tensor | None, scale: float,
                  causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_bwd_impl(do, q, k, v, o, lse, dlse, mask, scale, causal)


@_flash_bwd_op.register_fake
def _(do, q, k, v, o, lse, dlse, mask, scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_setup_context(ctx, inputs, output):
    q, k, v, mask, scale, causal = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, mask)
    ctx.scale, ctx.causal = scale, causal
    ctx.set_materialize_grads(False)  # an unused lse brings dlse = None: the backward without the dL term


def _flash_backward(ctx, do, dlse):
    q, k, v, o, lse, mask = ctx.saved_tensors
    if do is None:  # only the log-sum-exp reached the loss
        do = torch.zeros_like(o)
    dq, dk, dv = _flash_bwd_op(do, q, k, v, o, lse, dlse, mask, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None, None


_flash_fwd_op.register_autograd(_flash_backward, setup_context=_flash_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function


def _check_inputs(q, k, v, mask):
    problems = []
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        problems.append(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    elif k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        problems.append(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on B, H or D")
    if mask is not None:
        if mask.dtype != torch.bool:
            problems.append(f"mask must be bool (True = keep), got {mask.dtype}")
        if q.ndim == 4 and k.ndim == 4 and tuple(mask.shape) != (q.shape[0], k.shape[2]):
            problems.append(f"mask must be (B, N_k) = {(q.shape[0], k.shape[2])}, got {tuple(mask.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        problems.append(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if problems:
        raise ValueError("lvd.kernels.attention: " + "; ".join(problems))


def attention(q, k, v, *, mask=None, scale=None, causal=False, backend="auto", return_lse=False):
    """Scaled dot-product attention softmax(q kᵀ · scale) v with an optional key-padding mask.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); mask: (B, Nk) bool, True where a key is kept;
    scale defaults to 1/√D; ``causal`` aligns the diagonal bottom-right (``tril(Nk − Nq)``).
    ``backend``: "auto" | "triton" | "sdpa" | "xformers" | "torch" (see :mod:`lvd.kernels.dispatch`).
    Returns (B, H, Nq, D) in q's dtype.

    ``return_lse=True`` returns ``(out, lse)`` with lse (B, H, Nq) fp32 (fp64 for fp64 inputs) the natural
    log-sum-exp of each query's kept scores, ``log Σ_j exp(s_ij)``; a query with no kept key gives zeros and
    lse = −inf. Gradients flow through both, so partial results over blocks of keys merge exactly (ring attention,
    :mod:`lvd.context_parallel`): ``lse = logsumexp_b lse_b``, ``out = Σ_b exp(lse_b − lse) out_b``. The Triton
    kernel returns the lse it already computes, so "auto" picks it wherever it runs; SDPA and xformers do not
    expose it, so elsewhere (the CPU among them) and for a forced "sdpa" or "xformers" the PyTorch math
    (:func:`attention_reference_lse`) runs, which stores the Nq × Nk scores.
    """
    _check_inputs(q, k, v, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    choice = dispatch.attention_backend(q, k, v, mask, backend=backend, interpreted=_INTERPRETED,
                                        return_lse=return_lse)
    if choice == "triton":
        out, lse = _flash_fwd_op(q, k, v, mask, scale, bool(causal))
        if not return_lse:
            return out
        return out, lse.masked_fill(lse == float("inf"), float("-inf"))  # the kernel marks empty rows with +inf
    if return_lse:
        return attention_reference_lse(q, k, v, mask=mask, scale=scale, causal=causal)
    if choice == "sdpa":
        return _attention_sdpa(q, k, v, mask, scale, causal)
    if choice == "xformers":
        return _attention_xformers(q, k, v, mask, scale, causal)
    return attention_reference(q, k, v, mask=mask, scale=scale, causal=causal)
