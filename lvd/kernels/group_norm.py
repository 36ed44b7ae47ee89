"""GroupNorm (+ optional fused SiLU) over (B, C, H, W) or (B, C, T, H, W) tensors.

y = (x − μ) / sqrt(σ² + eps) · weight + bias, then silu(y) = y · sigmoid(y) when ``silu=True``
(Wu & He, 2018, arXiv:1803.08494). μ, σ² are taken per (b, group) over (C/G, T, H, W), or with
``per_frame=True`` per (b, group, t) over (C/G, H, W): a causal video VAE can then decode a long clip
in chunks and get exactly the result of decoding it whole.

The Triton path. A statistics *unit* is one (b, g) (or (b, g, t)); its elements form a (C/G, L) grid
with L = T·H·W (or H·W), addressed through strides, so contiguous and channels_last(_3d) tensors are
read in place. Each unit's L axis is cut into NS chunks and every (unit, chunk) is one program, so a
batch-1 video fills the GPU (torch's GroupNorm launches only B·G blocks):

1. ``_gn_stats_kernel``: per chunk, count n, mean and M2 = Σ(x − mean)²: Welford's update in every
   lane of the tile as the chunk streams through, then Chan et al.'s (1979) merge across lanes,
   M2 = Σ M2_l + Σ n_l (m_l − m)², all in fp32 (fp64 for fp64 inputs, interpreter only).
   Σx² − (Σx)²/n is not used: it lost everything (0.8 relative error) at mean/std = 1000.
2. ``_gn_fwd_kernel``: each program merges its unit's NS partials (the same Chan formula in
   vector form, in a fixed order), normalises its chunk, applies weight, bias and SiLU. Chunk 0 also
   stores μ and 1/σ for the backward.
3. Backward, with ĝ = dy · silu'(y_pre) (or dy) and x̂ = (x − μ)/σ:
   ``_gn_bwd_reduce_kernel`` writes per-chunk partials of Σ ĝw and Σ ĝw x̂ per unit and Σ ĝ x̂, Σ ĝ per
   channel; ``_gn_bwd_dx_kernel`` sums the unit partials and writes
   dx = (ĝw − (Σ ĝw + x̂ Σ ĝw x̂) / N) / σ. dweight, dbias are sums of the per-channel partial buffers
   (torch.sum, fixed order): deterministic, no atomics.

Autograd and torch.compile go through ``torch.library.custom_op`` (``lvd::group_norm_fwd`` / ``_bwd``).

The PyTorch path (CPU, or where Triton is not chosen) is :func:`group_norm_reference`, except for per-frame
inference on fp32 input: :func:`lvd.kernels.group_norm_torch.per_frame_no_grad` takes row sums in x's own layout and hands
back to the reference whenever its one-pass variance could lose precision (|mean| ≫ std).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from lvd.kernels import dispatch
from lvd.kernels.group_norm_torch import (_check_inputs, group_norm_reference, per_frame_no_grad,
                                          per_frame_no_grad_channels_last)

if dispatch.HAS_TRITON:
    import triton
    import triton.language as tl

    _jit = triton.jit
else:  # pragma: no cover - no Triton wheel on this platform; dispatch never picks "triton"
    triton = tl = None

    def _jit(fn):
        return fn


# ----------------------------------------------------------------------------------------------
# Triton kernels. Shared arguments: X strides (sb, sc, st, ss) address x[b, g·Cg + c, t, s]; a unit
# u = ((b·G + g)·TU + t) has Cg × L elements; program (u, j) owns s ∈ [j·CHUNK, (j+1)·CHUNK).


@_jit
def _gn_stats_kernel(
    X, PART, sb, sc, st, ss, G, TU, Cg, L, CHUNK, NS,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)  # unit offsets may pass 2³¹ elements (within a sample they may not)
    j = tl.program_id(1)
    base = (u // TU // G) * sb + (u // TU % G) * Cg * sc + (u % TU) * st
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < Cg
    # Welford per lane (each lane sees one element per tile), then one Chan merge across lanes
    n_l = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    mean_l = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    m2_l = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for i in range(0, CHUNK, BLOCK_S):
        offs_s = j * CHUNK + i + tl.arange(0, BLOCK_S)
        ok = c_ok[:, None] & (offs_s < L)[None, :]
        x = tl.load(X + base + offs_c[:, None] * sc + offs_s[None, :] * ss, mask=ok, other=0.0).to(ACC)
        okf = ok.to(ACC)
        n_l += okf
        d = x - mean_l
        mean_l += okf * d / tl.maximum(n_l, 1.0)
        m2_l += okf * d * (x - mean_l)
    # Chan et al. (1979): n = Σ n_l, mean = Σ n_l m_l / n, M2 = Σ M2_l + Σ n_l (m_l − mean)²
    n_a = tl.sum(n_l)
    mean_a = tl.sum(n_l * mean_l) / tl.maximum(n_a, 1.0)
    dm = mean_l - mean_a
    m2_a = tl.sum(m2_l + n_l * dm * dm)
    p = PART + (u * NS + j) * 3
    tl.store(p, n_a)
    tl.store(p + 1, mean_a)
    tl.store(p + 2, m2_a)


@_jit
def _gn_fwd_kernel(
    X, Y, W, B, PART, MEAN, RSTD,
    sb, sc, st, ss, yb, yc, yt, ys, G, TU, Cg, L, CHUNK, NS, MS, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)  # unit offsets may pass 2³¹ elements (within a sample they may not)
    j = tl.program_id(1)
    # 1. merge the unit's NS partials: mean = Σ n_i m_i / n, M2 = Σ M2_i + Σ n_i (m_i − mean)²
    offs_p = tl.arange(0, BLOCK_P)
    n_sum = tl.zeros([BLOCK_P], ACC)
    nm_sum = tl.zeros([BLOCK_P], ACC)
    for p0 in range(0, NS, BLOCK_P):
        ok = p0 + offs_p < NS
        pp = PART + (u * NS + p0 + offs_p) * 3
        n_i = tl.load(pp, mask=ok, other=0.0)
        n_sum += n_i
        nm_sum += n_i * tl.load(pp + 1, mask=ok, other=0.0)
    n = tl.sum(n_sum, 0)
    mean = tl.sum(nm_sum, 0) / n
    m2_sum = tl.zeros([BLOCK_P], ACC)
    for p0 in range(0, NS, BLOCK_P):
        ok = p0 + offs_p < NS
        pp = PART + (u * NS + p0 + offs_p) * 3
        n_i = tl.load(pp, mask=ok, other=0.0)
        d = tl.load(pp + 1, mask=ok, other=0.0) - mean
        m2_sum += tl.load(pp + 2, mask=ok, other=0.0) + n_i * d * d
    rstd = 1.0 / tl.sqrt(tl.sum(m2_sum, 0) / n + eps)
    if j == 0:  # MEAN/RSTD are (B·G, T) buffers, possibly a frame slice with row stride MS
        tl.store(MEAN + (u // TU) * MS + u % TU, mean)
        tl.store(RSTD + (u // TU) * MS + u % TU, rstd)
    # 2. normalise this program's chunk
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < Cg
    ch = ((u // TU) % G) * Cg + offs_c
    scale = tl.zeros([BLOCK_C], ACC) + rstd
    shift = tl.zeros([BLOCK_C], ACC)
    if HAS_W:
        scale = scale * tl.load(W + ch, mask=c_ok, other=0.0).to(ACC)
    if HAS_B:
        shift = tl.load(B + ch, mask=c_ok, other=0.0).to(ACC)
    xbase = (u // TU // G) * sb + (u // TU % G) * Cg * sc + (u % TU) * st
    ybase = (u // TU // G) * yb + (u // TU % G) * Cg * yc + (u % TU) * yt
    for i in range(0, CHUNK, BLOCK_S):
        offs_s = j * CHUNK + i + tl.arange(0, BLOCK_S)
        ok = c_ok[:, None] & (offs_s < L)[None, :]
        x = tl.load(X + xbase + offs_c[:, None] * sc + offs_s[None, :] * ss, mask=ok, other=0.0).to(ACC)
        y = (x - mean) * scale[:, None] + shift[:, None]  # not x·scale + (b − μ·scale): cancels at |μ| ≫ σ
        if SILU:
            y = y / (1.0 + tl.exp(-tl.maximum(y, -60.0)))  # clamp: no exp overflow; σ(−60) ≈ 1e-26
        tl.store(Y + ybase + offs_c[:, None] * yc + offs_s[None, :] * ys, y.to(Y.dtype.element_ty), mask=ok)


@_jit
def _gn_bwd_reduce_kernel(
    X, DY, W, B, MEAN, RSTD, PART, DWP, DBP,
    sb, sc, st, ss, db_, dc, dt, ds, G, TU, Cg, L, CHUNK, NS, MS,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)  # unit offsets may pass 2³¹ elements (within a sample they may not)
    j = tl.program_id(1)
    mean = tl.load(MEAN + (u // TU) * MS + u % TU)
    rstd = tl.load(RSTD + (u // TU) * MS + u % TU)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < Cg
    ch = ((u // TU) % G) * Cg + offs_c
    w = tl.zeros([BLOCK_C], ACC) + 1.0
    bb = tl.zeros([BLOCK_C], ACC)
    if HAS_W:
        w = tl.load(W + ch, mask=c_ok, other=0.0).to(ACC)
    if HAS_B:
        bb = tl.load(B + ch, mask=c_ok, other=0.0).to(ACC)
    xbase = (u // TU // G) * sb + (u // TU % G) * Cg * sc + (u % TU) * st
    dbase = (u // TU // G) * db_ + (u // TU % G) * Cg * dc + (u % TU) * dt
    dw = tl.zeros([BLOCK_C, BLOCK_S], ACC)  # Σ ĝ x̂, per lane until the end
    dbias = tl.zeros([BLOCK_C, BLOCK_S], ACC)  # Σ ĝ
    for i in range(0, CHUNK, BLOCK_S):
        offs_s = j * CHUNK + i + tl.arange(0, BLOCK_S)
        ok = c_ok[:, None] & (offs_s < L)[None, :]
        x = tl.load(X + xbase + offs_c[:, None] * sc + offs_s[None, :] * ss, mask=ok, other=0.0).to(ACC)
        dy = tl.load(DY + dbase + offs_c[:, None] * dc + offs_s[None, :] * ds, mask=ok, other=0.0).to(ACC)
        xhat = (x - mean) * rstd
        g = dy
        if SILU:  # ĝ = dy · silu'(y) = dy · σ(y) (1 + y (1 − σ(y)))
            y = xhat * w[:, None] + bb[:, None]
            sig = 1.0 / (1.0 + tl.exp(-tl.maximum(y, -60.0)))
            g = dy * sig * (1.0 + y * (1.0 - sig))
        g = tl.where(ok, g, 0.0)
        dw += g * xhat
        dbias += g
    dw = tl.sum(dw, 1)  # per channel
    dbias = tl.sum(dbias, 1)
    tl.store(PART + (u * NS + j) * 2, tl.sum(dbias * w, 0))  # Σ ĝw over the chunk
    tl.store(PART + (u * NS + j) * 2 + 1, tl.sum(dw * w, 0))  # Σ ĝw x̂ over the chunk
    tl.store(DWP + (u * NS + j) * Cg + offs_c, dw, mask=c_ok)
    tl.store(DBP + (u * NS + j) * Cg + offs_c, dbias, mask=c_ok)


@_jit
def _gn_bwd_dx_kernel(
    X, DY, DX, W, B, MEAN, RSTD, PART,
    sb, sc, st, ss, db_, dc, dt, ds, xb, xc, xt, xs, G, TU, Cg, L, CHUNK, NS, MS,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)  # unit offsets may pass 2³¹ elements (within a sample they may not)
    j = tl.program_id(1)
    mean = tl.load(MEAN + (u // TU) * MS + u % TU)
    rstd = tl.load(RSTD + (u // TU) * MS + u % TU)
    offs_p = tl.arange(0, BLOCK_P)
    a1 = tl.zeros([BLOCK_P], ACC)
    a2 = tl.zeros([BLOCK_P], ACC)
    for p0 in range(0, NS, BLOCK_P):
        ok = p0 + offs_p < NS
        pp = PART + (u * NS + p0 + offs_p) * 2
        a1 += tl.load(pp, mask=ok, other=0.0)
        a2 += tl.load(pp + 1, mask=ok, other=0.0)
    inv_n = 1.0 / (Cg * L)
    c1 = tl.sum(a1, 0) * inv_n  # mean of ĝw over the unit
    c2 = tl.sum(a2, 0) * inv_n  # mean of ĝw x̂ over the unit
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < Cg
    ch = ((u // TU) % G) * Cg + offs_c
    w = tl.zeros([BLOCK_C], ACC) + 1.0
    bb = tl.zeros([BLOCK_C], ACC)
    if HAS_W:
        w = tl.load(W + ch, mask=c_ok, other=0.0).to(ACC)
    if HAS_B:
        bb = tl.load(B + ch, mask=c_ok, other=0.0).to(ACC)
    xbase = (u // TU // G) * sb + (u // TU % G) * Cg * sc + (u % TU) * st
    dbase = (u // TU // G) * db_ + (u // TU % G) * Cg * dc + (u % TU) * dt
    obase = (u // TU // G) * xb + (u // TU % G) * Cg * xc + (u % TU) * xt
    for i in range(0, CHUNK, BLOCK_S):
        offs_s = j * CHUNK + i + tl.arange(0, BLOCK_S)
        ok = c_ok[:, None] & (offs_s < L)[None, :]
        x = tl.load(X + xbase + offs_c[:, None] * sc + offs_s[None, :] * ss, mask=ok, other=0.0).to(ACC)
        dy = tl.load(DY + dbase + offs_c[:, None] * dc + offs_s[None, :] * ds, mask=ok, other=0.0).to(ACC)
        xhat = (x - mean) * rstd
        g = dy
        if SILU:  # ĝ = dy · silu'(y) = dy · σ(y) (1 + y (1 − σ(y)))
            y = xhat * w[:, None] + bb[:, None]
            sig = 1.0 / (1.0 + tl.exp(-tl.maximum(y, -60.0)))
            g = dy * sig * (1.0 + y * (1.0 - sig))
        dx = (g * w[:, None] - c1 - xhat * c2) * rstd
        tl.store(DX + obase + offs_c[:, None] * xc + offs_s[None, :] * xs, dx.to(DX.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Launchers

_INTERPRETED = dispatch.HAS_TRITON and dispatch.triton_interpreter_requested()  # read at decoration, as Triton does
# Interpreter tiling: elements per tile (BLOCK_C·BLOCK_S) and tiles per chunk. Big tiles because each interpreted
# program costs ~3 ms; two tiles per chunk so chunk loops, tails and the partial merge all run in tests.
_INTERPRETER_TILE = 128
_INTERPRETER_TILES_PER_CHUNK = 2
# 2048-element tiles over 8 warps: 8 elements (16 B of bf16) per thread per load, and the statistics
# kernel's three per-lane Welford accumulators stay in registers (compiled for sm_90, 4096-element tiles
# on 4 warps need 243 registers a thread, close to the 255 limit).
_GPU_TILE = 2048
_GPU_WARPS = 8
_GPU_TARGET_PROGRAMS = 1024  # ≈ 8 programs per SM on a 132-SM H100; a batch-1 video still fills it


def _unit_strides(t, per_frame):
    """(sb, sc, st, ss) so that t[b, c, t, s] sits at b·sb + c·sc + t·st + s·ss, with s running over
    H·W (per_frame) or T·H·W (global), or None when t's layout cannot be flattened that way."""
    if t.ndim == 4:
        _, _, h, w = t.shape
        sb, sc, sh, sw = t.stride()
        tt, st = 1, 0
    else:
        _, _, tt, h, w = t.shape
        sb, sc, st, sh, sw = t.stride()
    ss = sw if w > 1 else sh
    if h > 1 and w > 1 and sh != w * sw:
        return None
    if t.ndim == 5 and not per_frame:
        if tt > 1 and h * w > 1 and st != h * w * ss:
            return None
        if h * w == 1:
            ss = st
        st = 0
    return sb, sc, st, ss


def _default_tile():
    return _INTERPRETER_TILE if _INTERPRETED else _GPU_TILE


def _geometry(x, num_groups, per_frame, tile):
    """Units, per-unit length L and the tiling: (U, TU, Cg, L, BLOCK_C, BLOCK_S, CHUNK, NS). ``tile``: elements
    per tile (BLOCK_C·BLOCK_S, at least 16 columns on a GPU)."""
    b, c = x.shape[:2]
    tt = x.shape[2] if x.ndim == 5 else 1
    hw = x.shape[-1] * x.shape[-2]
    tu = tt if per_frame and x.ndim == 5 else 1
    length = hw if tu > 1 or x.ndim == 4 or per_frame else tt * hw
    cg = c // num_groups
    units = b * num_groups * tu
    block_c = triton.next_power_of_2(cg)
    if _INTERPRETED:
        block_s = min(triton.next_power_of_2(length), max(tile // block_c, 1))
        chunk = block_s * _INTERPRETER_TILES_PER_CHUNK
    else:  # enough chunks per unit to reach the target program count
        block_s = min(triton.next_power_of_2(length), max(tile // block_c, 16))
        tiles_total = triton.cdiv(length, block_s)
        ns = max(1, min(tiles_total, triton.cdiv(_GPU_TARGET_PROGRAMS, units)))
        chunk = triton.cdiv(tiles_total, ns) * block_s
    ns = triton.cdiv(length, chunk)
    return units, tu, cg, length, block_c, block_s, chunk, ns


def _acc(x):
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _in_place_layout(t, per_frame):
    """t itself if the kernels can address it, else a contiguous copy (e.g. a sliced view)."""
    strides = _unit_strides(t, per_frame)
    if strides is None:
        t = t.contiguous()
        strides = _unit_strides(t, per_frame)
    return t, strides


def _slice_budget(x, frame_slices):
    """Bytes a frame slice may fill, 0 for no slicing: ``frame_slices`` False → 0; True → half the GPU's L2
    cache (0 off the GPU and in the interpreter); an int → that many bytes (any device: tests use it)."""
    if frame_slices is True:
        if _INTERPRETED or x.device.type != "cuda":
            return 0
        return _l2_bytes(x.device.index if x.device.index is not None else torch.cuda.current_device()) // 2
    return int(frame_slices or 0)


@functools.lru_cache(maxsize=None)
def _l2_bytes(index):
    return torch.cuda.get_device_properties(index).L2_cache_size


def _frame_slices(x, per_frame, n_tensors, budget):
    """Frame ranges to run each pass on, each of at most ``budget`` bytes over its ``n_tensors`` tensors (0: no
    slicing). Per-frame statistics let a pass work a few frames at a time, so its second read of x (normalise
    after statistics; dx after the reductions) comes from L2, not HBM: the forward then moves 2|x| instead of
    3|x|, the backward 3|x| instead of 5|x| (not yet measured; off by default, see :func:`group_norm`)."""
    if not (per_frame and x.ndim == 5):
        return [None]
    t = x.shape[2]
    frame_bytes = x[:, :, 0].numel() * x.element_size() * n_tensors
    if not budget or frame_bytes > budget or t * frame_bytes <= budget:
        return [None]  # one frame overflows L2 anyway, or the whole clip fits
    step = budget // frame_bytes
    return [slice(t0, min(t0 + step, t)) for t0 in range(0, t, step)]


def _frames(t, sl):
    return t if sl is None else t[:, :, sl]


def _gn_fwd_impl(x, weight, bias, num_groups, eps, silu, per_frame, slice_bytes, tile):
    acc_torch, acc = _acc(x)
    y = dispatch.new_empty_like(x)
    x, _ = _in_place_layout(x, per_frame)
    if _unit_strides(y, per_frame) is None:  # y follows x's layout, which is now addressable
        y = dispatch.new_empty(x.shape, dtype=x.dtype, device=x.device)
    tu = x.shape[2] if per_frame and x.ndim == 5 else 1
    mean = dispatch.new_empty((x.shape[0] * num_groups, tu), dtype=acc_torch, device=x.device)  # (B·G, T)
    rstd = dispatch.new_empty((x.shape[0] * num_groups, tu), dtype=acc_torch, device=x.device)
    for sl in _frame_slices(x, per_frame, 1, slice_bytes):
        xs, ys = _frames(x, sl), _frames(y, sl)
        m, r = (mean, rstd) if sl is None else (mean[:, sl], rstd[:, sl])
        units, tu_s, cg, length, block_c, block_s, chunk, ns = _geometry(xs, num_groups, per_frame, tile)
        part = dispatch.new_empty((units, ns, 3), dtype=acc_torch, device=x.device)
        shape = dict(G=num_groups, TU=tu_s, Cg=cg, L=length, CHUNK=chunk, NS=ns)
        warps = 1 if _INTERPRETED else _GPU_WARPS
        _gn_stats_kernel[(units, ns)](xs, part, *_unit_strides(xs, per_frame), **shape, ACC=acc, BLOCK_C=block_c,
                                      BLOCK_S=block_s, num_warps=warps)
        _gn_fwd_kernel[(units, ns)](
            xs, ys, weight if weight is not None else x, bias if bias is not None else x, part, m, r,
            *_unit_strides(xs, per_frame), *_unit_strides(ys, per_frame), **shape, MS=m.stride(0), eps=eps,
            HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, ACC=acc, BLOCK_C=block_c,
            BLOCK_S=block_s, BLOCK_P=min(triton.next_power_of_2(ns), 1024), num_warps=warps,
        )
    return y, mean.view(-1), rstd.view(-1)


def _gn_bwd_impl(dy, x, weight, bias, mean, rstd, num_groups, silu, per_frame, slice_bytes, tile):
    acc_torch, acc = _acc(x)
    dx = dispatch.new_empty_like(x)
    x, _ = _in_place_layout(x, per_frame)
    dy, _ = _in_place_layout(dy, per_frame)
    if _unit_strides(dx, per_frame) is None:
        dx = dispatch.new_empty(x.shape, dtype=x.dtype, device=x.device)
    b = x.shape[0]
    mean, rstd = mean.view(b * num_groups, -1), rstd.view(b * num_groups, -1)  # (B·G, T)
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    dw = db = 0.0
    for sl in _frame_slices(x, per_frame, 2, slice_bytes):
        xs, dys, dxs = _frames(x, sl), _frames(dy, sl), _frames(dx, sl)
        m, r = (mean, rstd) if sl is None else (mean[:, sl], rstd[:, sl])
        units, tu, cg, length, block_c, block_s, chunk, ns = _geometry(xs, num_groups, per_frame, tile)
        part = dispatch.new_empty((units, ns, 2), dtype=acc_torch, device=x.device)
        dwp = dispatch.new_empty((units, ns, cg), dtype=acc_torch, device=x.device)
        dbp = dispatch.new_empty((units, ns, cg), dtype=acc_torch, device=x.device)
        shape = dict(G=num_groups, TU=tu, Cg=cg, L=length, CHUNK=chunk, NS=ns, MS=m.stride(0))
        flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, ACC=acc,
                     BLOCK_C=block_c, BLOCK_S=block_s, num_warps=1 if _INTERPRETED else _GPU_WARPS)
        strides = (*_unit_strides(xs, per_frame), *_unit_strides(dys, per_frame))
        _gn_bwd_reduce_kernel[(units, ns)](xs, dys, w_arg, b_arg, m, r, part, dwp, dbp, *strides, **shape, **flags)
        _gn_bwd_dx_kernel[(units, ns)](xs, dys, dxs, w_arg, b_arg, m, r, part, *strides,
                                       *_unit_strides(dxs, per_frame), **shape,
                                       BLOCK_P=min(triton.next_power_of_2(ns), 1024), **flags)
        # (U, NS, Cg) with U = (B, G, TU) → per-channel sums over b, t and chunks, in a fixed order
        dw = dw + dwp.view(b, num_groups, tu * ns, cg).sum((0, 2))
        db = db + dbp.view(b, num_groups, tu * ns, cg).sum((0, 2))
    dw = dw.reshape(-1).to(weight.dtype) if weight is not None else x.new_empty(0)
    db = db.reshape(-1).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# Autograd + torch.compile: custom ops with fake (shape) and autograd registrations


@torch.library.custom_op("lvd::group_norm_fwd", mutates_args=())
def _gn_fwd_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
               eps: float, silu: bool, per_frame: bool, slice_bytes: int,
               tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gn_fwd_impl(x, weight, bias, num_groups, eps, silu, per_frame, slice_bytes, tile)


@_gn_fwd_op.register_fake
def _(x, weight, bias, num_groups, eps, silu, per_frame, slice_bytes, tile):
    units = _geometry_units(x, num_groups, per_frame)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (torch.empty_like(x, memory_format=torch.preserve_format), x.new_empty((units,), dtype=acc),
            x.new_empty((units,), dtype=acc))


def _geometry_units(x, num_groups, per_frame):
    return x.shape[0] * num_groups * (x.shape[2] if per_frame and x.ndim == 5 else 1)


@torch.library.custom_op("lvd::group_norm_bwd", mutates_args=())
def _gn_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, silu: bool, per_frame: bool,
               slice_bytes: int, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gn_bwd_impl(dy, x, weight, bias, mean, rstd, num_groups, silu, per_frame, slice_bytes, tile)


@_gn_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, silu, per_frame, slice_bytes, tile):
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.preserve_format), dw, db


def _gn_setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu, per_frame, slice_bytes, tile = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.per_frame, ctx.slice_bytes, ctx.tile = num_groups, silu, per_frame, slice_bytes, tile


def _gn_backward(ctx, dy, dmean, drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _gn_bwd_op(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu, ctx.per_frame,
                            ctx.slice_bytes, ctx.tile)
    return (dx, (dw if weight is not None else None), (db if bias is not None else None)) + (None,) * 6


_gn_fwd_op.register_autograd(_gn_backward, setup_context=_gn_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function and module


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-6, *, silu=False, per_frame=False, backend="auto",
               frame_slices: bool | int = False, tile: int | None = None):
    """GroupNorm with optional fused SiLU and per-frame statistics; see :func:`group_norm_reference`.

    ``backend``: "auto" | "triton" | "torch" ("sdpa"/"xformers" mean "torch" here; see kernels.dispatch).
    Options of the Triton path (the results are the same to float rounding):

    - ``frame_slices``: per-frame passes over frame slices that fit in cache (see :func:`_frame_slices`).
      False (default) → whole tensors; True → slices of half the GPU's L2; an int → slices of that many bytes.
      Off until a GPU run shows it pays: it saves one HBM read of x per pass but costs two launches per slice,
      and a 256×256×128 bf16 frame (16.7 MB) already fills a third of an H100's L2
      (``benchmarks/bench_group_norm.py`` times both, backend "triton-l2").
    - ``tile``: elements per tile (BLOCK_C·BLOCK_S); default 2048 on a GPU, 128 in the interpreter. Tests
      pass small tiles to cut each unit into many chunks.
    """
    _check_inputs(x, num_groups, weight, bias)
    per_frame = bool(per_frame and x.ndim == 5)
    choice = dispatch.group_norm_backend(x, backend=backend, interpreted=_INTERPRETED)
    if choice == "triton":
        return _gn_fwd_op(x, weight, bias, int(num_groups), float(eps), bool(silu), per_frame,
                          _slice_budget(x, frame_slices), int(tile or _default_tile()))[0]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if per_frame and not needs_grad and x.dtype == torch.float32:
        y = None
        if x.is_contiguous():
            y = per_frame_no_grad(x, num_groups, weight, bias, eps, silu)
        elif x.is_contiguous(memory_format=torch.channels_last_3d):
            y = per_frame_no_grad_channels_last(x, num_groups, weight, bias, eps, silu)
        if y is not None:
            return y
    return group_norm_reference(x, num_groups, weight, bias, eps, silu=silu, per_frame=per_frame)


class GroupNorm(nn.Module):
    """``nn.GroupNorm`` with fused SiLU and per-frame statistics, backed by :func:`group_norm`."""

    def __init__(self, num_groups, num_channels, eps=1e-6, affine=True, *, silu=False, per_frame=False):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.silu, self.per_frame = silu, per_frame
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu, per_frame=self.per_frame)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, silu={self.silu}, per_frame={self.per_frame}"
