"""The building blocks of :class:`lvd.vae.model.CausalVideoVAE`: causal 3D convolutions with a streaming
cache, residual and attention blocks, down/up-sampling, and the encoder and decoder they make.

Every block takes ``(x, cache=None)``: with a cache dict it carries its causal convolutions' last frames from one
temporal chunk to the next (:mod:`lvd.vae.tiling`), so chunked encode/decode equals the whole clip's.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from lvd import kernels
from lvd.kernels.conv3d import conv3d, conv3d_split_window
from lvd.vae.layout import cat_frames, memory_format_of, pad_right_bottom


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))); ``params`` is (B, 2C, T', H', W') = [mean | logvar]."""

    def __init__(self, params: torch.Tensor):
        self.mean, logvar = params.chunk(2, dim=1)  # (B, C, T', H', W') each
        self.logvar = logvar.clamp(-30.0, 20.0)  # exp() stays finite in fp32
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std · ε, ε ~ N(0, I) (the reparameterisation trick)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over all latent elements: shape (B,)."""
        kl = 0.5 * (self.mean.float().pow(2) + self.logvar.float().exp() - 1.0 - self.logvar.float())
        return kl.flatten(1).sum(1)


# A streaming call convolves its chunk in pieces of at most this many input bytes, taken as views of
# the chunk where they can be: oneDNN copies its input into a blocked layout, so one call on a whole
# 4-frame chunk with its cached frames would hold the chunk three times (the caller's, the concatenation and
# oneDNN's copy), the decode's memory peak (benchmarks/bench_vae.py measures it). In the channels-last CPU
# inference layout oneDNN reads the pieces in place, and they still lower the peak of the base preset's encode
# of 17×256² in 4-frame chunks by about 10% (measured with and without them). Encoder calls of one frame, the
# default, never need them.
STREAM_PIECE_BYTES = 32 * 2**20


class CausalConv3d(nn.Module):
    """Conv3d that is causal in time: output frame t sees input frames ≤ t·stride_t.

    Whole clip (``cache=None``): the front is padded with ``k_t − 1`` copies of frame 0.
    Streaming (``cache`` a dict): the input frames the previous chunk left unconsumed are prepended;
    the first chunk pads like the whole clip. The leftover frames are stored under ``cache[self]``.
    A strided conv given too few frames to complete its next window stores them and returns 0 frames.
    Space is zero-padded to keep H and W (``k//2`` on each side). ``stream_piece_bytes``: see
    :data:`STREAM_PIECE_BYTES` (:meth:`CausalVideoVAE.set_stream_piece_bytes` sets it for a whole VAE).
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, *, stream_piece_bytes=None):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        st = stride if isinstance(stride, int) else stride[0]
        self.kt, self.st = kt, st
        self.stream_piece_bytes = STREAM_PIECE_BYTES if stream_piece_bytes is None else int(stream_piece_bytes)
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=(st, 1, 1), padding=(0, kh // 2, kw // 2))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        if cache is not None:
            return self._stream(x, cache)
        if self.kt > 1:
            x = cat_frames([x[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1), x], like=x)  # replicate frame 0
        return conv3d(self.conv, x)

    def _stream(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        kt, st = self.kt, self.st
        left = cache.pop(self, None)  # popped, so that it is freed as soon as the pieces that read it are done
        first = left is None
        if first:  # the clip's first chunk
            left = x[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
        n_left, total = left.shape[2], left.shape[2] + x.shape[2]

        def frames(a: int, b: int) -> torch.Tensor:  # frames [a, b) of cat([left, x]), a view where possible
            if a >= n_left:
                return x[:, :, a - n_left:b - n_left]
            if b <= n_left:
                return left[:, :, a:b]
            return cat_frames([left[:, :, a:], x[:, :, :b - n_left]], like=x)

        def frames_copy(a: int, b: int) -> torch.Tensor:  # the same in memory of their own, for the cache
            return frames(a, b) if a < n_left < b else frames(a, b).clone()  # a concatenation is new already

        n_out = (total - kt) // st + 1
        if n_out < 1:  # a strided conv still waiting for its window's last frames: nothing to output yet
            cache[self] = frames_copy(0, total)
            b, _, _, h, w = x.shape
            return x.new_empty((b, self.conv.out_channels, 0, h, w))
        keep_from = n_out * st  # frames [keep_from, total) are what the next chunk's windows still need
        kept = frames_copy(keep_from, total)  # what the next chunk's windows need of this one's frames
        frame_bytes = x[:, :, :1].numel() * x.element_size()
        # The first output frames' windows start in `left` and end in x. When a window's frames outweigh the
        # kernel (the high-resolution layers), each of them is two convolutions summed (conv3d_split_window)
        # instead of one over a concatenated copy of the window: on one-frame chunks that copy costs 13% of an
        # encode of 9×256² (profiled on 2 CPU threads). Not on the first chunk, whose `left` is frame 0 repeated.
        weight_bytes = self.conv.weight.numel() * self.conv.weight.element_size()
        n_split = min(n_out, -(-n_left // st)) if kt * frame_bytes > weight_bytes and not first else 0
        per_piece = max(1, (self.stream_piece_bytes // max(frame_bytes, 1) - kt) // st + 1)  # output frames
        spans = [(i, i + 1) for i in range(n_split)]
        spans += [(i, min(i + per_piece, n_out)) for i in range(n_split, n_out, per_piece)]
        out = None
        for i, j in spans:
            a = i * st
            if i < n_split:
                piece = conv3d_split_window(self.conv, left[:, :, a:], x[:, :, :a + kt - n_left])
            else:
                piece = conv3d(self.conv, frames(a, (j - 1) * st + kt))  # (B, C_out, j - i, H', W')
            if len(spans) == 1:
                out = piece
                break
            if out is None:
                out = torch.empty(piece.shape[:2] + (n_out,) + piece.shape[3:], dtype=piece.dtype,
                                  device=piece.device, memory_format=memory_format_of(piece))
            out[:, :, i:j] = piece
            if j * st >= n_left:
                left = None  # later pieces read x only
        cache[self] = kept
        return out


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), per-frame GroupNorm, causal 3×3×3 convs."""

    def __init__(self, in_channels, out_channels, groups, eps, dropout=0.0):
        super().__init__()
        self.norm1 = kernels.GroupNorm(groups, in_channels, eps, silu=True, per_frame=True)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = kernels.GroupNorm(groups, out_channels, eps, silu=True, per_frame=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, cache=None):
        h = self.norm2(self.conv1(self.norm1(x), cache))  # conv1's output is freed once normed
        h = self.conv2(self.dropout(h), cache)
        return (x if self.shortcut is None else conv3d(self.shortcut, x)) + h


class FrameAttention(nn.Module):
    """Single-head self-attention over the H·W positions of each frame (never across frames)."""

    def __init__(self, channels, groups, eps):
        super().__init__()
        self.norm = kernels.GroupNorm(groups, channels, eps, per_frame=True)
        self.to_qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x, cache=None):
        b, c, t, h, w = x.shape
        qkv = conv3d(self.to_qkv, self.norm(x))
        q, k, v = rearrange(qkv, "b (n c) t h w -> n (b t) 1 (h w) c", n=3)  # each (B·T, 1, H·W, C)
        o = kernels.attention(q, k, v)
        if memory_format_of(x) == torch.channels_last_3d:  # o's memory is already channels-last: a view
            o = rearrange(o, "(b t) 1 (h w) c -> b t h w c", b=b, h=h).permute(0, 4, 1, 2, 3)
        else:
            o = rearrange(o, "(b t) 1 (h w) c -> b c t h w", b=b, h=h)  # (B, C, T, H, W)
        return x + conv3d(self.proj, o)


class Downsample(nn.Module):
    """Stride-2 conv in space (pad right/bottom by 1, like diffusers), then a causal stride-2 conv in time.

    Time: y_0 = f(x_0, x_0, x_0), y_i = f(x_{2i−2}, x_{2i−1}, x_{2i}), so 1 + 2k frames → 1 + k.
    """

    def __init__(self, channels, spatial: bool, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2)) if spatial else None
        self.temporal = CausalConv3d(channels, channels, (3, 1, 1), stride=2) if temporal else None

    def forward(self, x, cache=None):
        if self.spatial is not None:
            x = conv3d(self.spatial, pad_right_bottom(x))  # (B, C, T, H/2, W/2)
        if self.temporal is not None:
            x = self.temporal(x, cache)  # (B, C, 1 + (T−1)/2, H, W)
        return x


class Upsample(nn.Module):
    """Causal ×2 in time (conv to 2C channels, depth-to-time; the clip's first frame yields one frame),
    then nearest ×2 in space followed by a 3×3 conv. 1 + k frames → 1 + 2k.

    The temporal conv starts as "repeat each frame twice" (identity on its last tap), which makes a
    fresh model reconstruct sensibly from step 0.
    """

    def __init__(self, channels, spatial: bool, temporal: bool):
        super().__init__()
        self.temporal = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1)) if spatial else None
        if temporal:
            with torch.no_grad():
                wgt = self.temporal.conv.weight  # (2C, C, 3, 1, 1)
                wgt.zero_()
                eye = torch.eye(channels)
                wgt[:channels, :, -1, 0, 0] = eye
                wgt[channels:, :, -1, 0, 0] = eye
                self.temporal.conv.bias.zero_()

    def forward(self, x, cache=None):
        if self.temporal is not None:
            first = cache is None or (self, "started") not in cache
            if cache is not None:
                cache[(self, "started")] = True
            x = self.temporal(x, cache)  # (B, 2C, T, H, W)
            if memory_format_of(x) == torch.channels_last_3d:  # the same, written channels-last
                x = rearrange(x.permute(0, 2, 3, 4, 1), "b t h w (r c) -> b (t r) h w c", r=2)
                x = x.contiguous().permute(0, 4, 1, 2, 3)  # (a view, not channels-last, when T = 1)
            else:
                x = rearrange(x, "b (r c) t h w -> b c (t r) h w", r=2)  # (B, C, 2T, H, W)
            if first:
                x = x[:, :, 1:]  # frame 0 of the clip maps to one frame: 1 + k → 1 + 2k
        if self.spatial is not None:
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")  # (B, C, T, 2H, 2W)
            x = conv3d(self.spatial, x)
        return x


class Stage(nn.Module):
    """A list of blocks run in order, each taking ``(x, cache)``; with optional activation checkpointing."""

    def __init__(self, blocks: Iterable[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(b for b in blocks if b is not None)
        self.gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing()

    def forward(self, x, cache=None):
        for block in self.blocks:
            if x.shape[2] == 0:  # streaming: a strided causal conv kept this piece's frames for its next window
                return x
            if self.gradient_checkpointing and cache is None and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x)
            else:
                x = block(x, cache)
        return x


class NormAct(nn.Module):
    """``block`` → per-frame GroupNorm → SiLU: the ``"conv"`` layout's unit (post-norm, no residual).
    ``block`` takes ``(x, cache)``: a :class:`SpatialConv`, a :class:`CausalConv3d` or an :class:`Upsample`."""

    def __init__(self, block, channels, groups, eps):
        super().__init__()
        self.block = block
        self.norm = kernels.GroupNorm(groups, channels, eps, silu=True, per_frame=True)

    def forward(self, x, cache=None):
        return self.norm(self.block(x, cache))


class SpatialConv(nn.Module):
    """A 1×3×3 conv with symmetric padding, optionally stride 2 in space (``(H + 1) // 2`` out). It has no
    temporal extent, so no cache; it takes ``(x, cache)`` like the other blocks."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1))

    def forward(self, x, cache=None):
        return conv3d(self.conv, x)


class NearestUp(nn.Module):
    """Nearest-neighbour ×2 in space."""

    def forward(self, x, cache=None):
        return F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")  # (B, C, T, 2H, 2W)


class ConvEncoder(nn.Module):
    """``"conv"`` layout, (B, 3, 1 + r·k, H, W) → moments (B, 2C, 1 + k, H/s, W/s).

    A conv to ``ch[0]``; then per stage i ≥ 1: a 1×3×3 conv to ``ch[i]`` (stride 2 while space is still
    to be compressed), then a causal stride-2 temporal conv while time is; every conv but the last
    followed by GroupNorm+SiLU.
    """

    def __init__(self, in_channels, out_channels, block_out_channels, n_spatial, n_temporal, groups, eps):
        super().__init__()
        ch = block_out_channels
        blocks = [NormAct(SpatialConv(in_channels, ch[0]), ch[0], groups, eps)]
        for i in range(1, len(ch)):
            blocks.append(NormAct(SpatialConv(ch[i - 1], ch[i], stride=2 if i <= n_spatial else 1), ch[i], groups, eps))
            if i <= n_temporal:
                blocks.append(NormAct(CausalConv3d(ch[i], ch[i], (3, 1, 1), stride=2), ch[i], groups, eps))
        self.body = Stage(blocks)
        self.conv_out = SpatialConv(ch[-1], out_channels)

    def forward(self, x, cache=None):
        x = self.body(x, cache)
        return None if x.shape[2] == 0 else self.conv_out(x, cache)  # None: see Encoder.forward


class ConvDecoder(nn.Module):
    """``"conv"`` layout, z (B, C, 1 + k, h, w) → video (B, 3, 1 + r·k, h·s, w·s); mirrors :class:`ConvEncoder`
    (time first at each stage, as the encoder compressed it last)."""

    def __init__(self, in_channels, out_channels, block_out_channels, n_spatial, n_temporal, groups, eps):
        super().__init__()
        ch = block_out_channels
        blocks = [NormAct(SpatialConv(in_channels, ch[-1]), ch[-1], groups, eps)]
        for i in reversed(range(1, len(ch))):
            if i <= n_temporal:
                blocks.append(NormAct(Upsample(ch[i], spatial=False, temporal=True), ch[i], groups, eps))
            if i <= n_spatial:
                blocks.append(NearestUp())
            blocks.append(NormAct(SpatialConv(ch[i], ch[i - 1]), ch[i - 1], groups, eps))
        self.body = Stage(blocks)
        self.conv_out = SpatialConv(ch[0], out_channels)

    def forward(self, z, cache=None):
        return self.conv_out(self.body(z, cache), cache)


class Encoder(nn.Module):
    """(B, 3, 1 + r·k, H, W) → moments (B, 2C, 1 + k, H/s, W/s)."""

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, n_spatial, n_temporal,
                 groups, eps, dropout, mid_attention):
        super().__init__()
        ch = block_out_channels
        self.conv_in = CausalConv3d(in_channels, ch[0], 3)
        self.stages = nn.ModuleList()
        for i, c in enumerate(ch):
            blocks = [ResBlock(ch[max(i - 1, 0)] if j == 0 else c, c, groups, eps, dropout) for j in range(layers_per_block)]
            if i < len(ch) - 1 and (i < n_spatial or i < n_temporal):
                blocks.append(Downsample(c, spatial=i < n_spatial, temporal=i < n_temporal))
            self.stages.append(Stage(blocks))
        self.mid = Stage([ResBlock(ch[-1], ch[-1], groups, eps, dropout),
                          FrameAttention(ch[-1], groups, eps) if mid_attention else None,
                          ResBlock(ch[-1], ch[-1], groups, eps, dropout)])
        self.norm_out = kernels.GroupNorm(groups, ch[-1], eps, silu=True, per_frame=True)
        self.conv_out = CausalConv3d(ch[-1], out_channels, 3)

    def forward(self, x, cache=None):
        """Moments of x; streaming (``cache`` given), None when the chunk's frames all went into the caches of
        strided convs, still waiting for the frames that complete their windows."""
        x = self.conv_in(x, cache)
        for stage in self.stages:
            x = stage(x, cache)
            if x.shape[2] == 0:
                return None
        x = self.mid(x, cache)
        return self.conv_out(self.norm_out(x), cache)


class Decoder(nn.Module):
    """z (B, C, 1 + k, h, w) → video (B, 3, 1 + r·k, h·s, w·s). Time is upsampled in the low-resolution
    stages first (as in CogVideoX), space mirrors the encoder."""

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, n_spatial, n_temporal,
                 groups, eps, dropout, mid_attention):
        super().__init__()
        ch = block_out_channels
        n = len(ch)
        self.conv_in = CausalConv3d(in_channels, ch[-1], 3)
        self.mid = Stage([ResBlock(ch[-1], ch[-1], groups, eps, dropout),
                          FrameAttention(ch[-1], groups, eps) if mid_attention else None,
                          ResBlock(ch[-1], ch[-1], groups, eps, dropout)])
        self.stages = nn.ModuleList()
        for j, i in enumerate(reversed(range(n))):  # j = 0 is the lowest resolution
            c_in = ch[min(i + 1, n - 1)]
            blocks = [ResBlock(c_in if k == 0 else ch[i], ch[i], groups, eps, dropout) for k in range(layers_per_block + 1)]
            spatial, temporal = i >= 1 and i - 1 < n_spatial, j < n_temporal
            if i >= 1 and (spatial or temporal):
                blocks.append(Upsample(ch[i], spatial=spatial, temporal=temporal))
            self.stages.append(Stage(blocks))
        self.norm_out = kernels.GroupNorm(groups, ch[0], eps, silu=True, per_frame=True)
        self.conv_out = CausalConv3d(ch[0], out_channels, 3)

    def forward(self, z, cache=None):
        x = self.conv_in(z, cache)
        x = self.mid(x, cache)
        for stage in self.stages:
            x = stage(x, cache)
        return self.conv_out(self.norm_out(x), cache)
