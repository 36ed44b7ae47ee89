"""Tiled and chunked encode/decode for the causal video VAE, so 512–1024 px clips fit in memory.

Two independent mechanisms, switched on by ``CausalVideoVAE.enable_tiling(...)``:

**Temporal chunks (exact).** The clip is fed through the encoder/decoder a few frames at a time:
the encoder gets ``encode_chunk_frames`` video frames per call (default 1), the decoder latent frame 0,
then ``chunk_latent_frames`` latent frames per call. Every causal conv keeps the input frames its next
windows still need in a cache dict (``CausalConv3d``, like diffusers' CogVideoX/Wan ``feat_cache``); a
strided one that has not yet received its window's last frame outputs nothing, so the encoder accepts
any number of frames per call, and a call may yield no latent frame. GroupNorm/attention work per
frame, so the chunked result *equals the whole-clip result up to float rounding* (tested: max |Δ| ≤
1e-4 in fp32 on the tiny preset). Activations for more than one chunk are never held. One frame per
encoder call keeps the encoder's full-resolution activations to one frame: the base preset's chunked
encode of 9×128² peaks 226 MiB above its start (``benchmarks/results/vae.json``), against 315 MiB with
the 4-frame calls of before.

**Spatial tiles (approximate).** Latents (for decode) or pixels (for encode) are cut into square tiles
of ``tile_size`` pixels overlapping by ``overlap`` pixels; each tile is processed (chunked in time)
and the outputs are blended with linear ramps across the overlaps (weights normalised to sum to 1
at every pixel). A tile does not see its neighbours' context, and per-frame GroupNorm statistics are
computed per tile, so tiled ≠ untiled. **Stated tolerance** (tested in ``tests/test_vae_tiling.py``:
tiny preset at quarter width, *random* weights, smooth 96 px input, 64 px tiles, 32 px overlap,
outputs of std ≈ 0.3): decode mean |Δ| ≤ 0.12 and max |Δ| ≤ 2.5, encode mean |Δ| ≤ 0.1. Random
weights are the worst case (their receptive fields are wide and unsmooth); larger tiles shrink the
error (tested) and trained weights should too (not measured here). The blending itself is exact: a
decoder without spatial context tiles to float rounding (tested). With a single tile
(``tile_size`` ≥ the frame) tiling is exact as above.

Memory: the output tensor, plus one tile × one chunk of activations, plus the causal caches of one
tile (``k_t − 1`` frames per conv). It does not grow with the clip's length, and grows with its area
only through the output tensor itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lvd.vae.layout import memory_format_of


@dataclass
class TilingConfig:
    """How :func:`encode_moments` / :func:`decode_latents` cut a clip.

    tile_size, overlap: spatial tile side and overlap in *pixels* (multiples of the spatial factor s;
    overlap ≤ tile_size / 2). chunk_latent_frames: latent frames per decoder call (≥ 1).
    encode_chunk_frames: video frames per encoder call (≥ 1, any count: it need not be a multiple of
    the temporal factor). spatial / temporal: switch either mechanism off.
    """

    tile_size: int = 256
    overlap: int = 64
    chunk_latent_frames: int = 1
    spatial: bool = True
    temporal: bool = True
    encode_chunk_frames: int = 1

    def validate(self, spatial_compression: int) -> None:
        s, problems = spatial_compression, []
        if self.tile_size <= 0 or self.tile_size % s:
            problems.append(f"tile_size must be a positive multiple of {s}, got {self.tile_size}")
        if self.overlap < 0 or self.overlap % s or 2 * self.overlap > self.tile_size:
            problems.append(f"overlap must be a multiple of {s} in [0, tile_size/2], got {self.overlap}")
        if self.chunk_latent_frames < 1:
            problems.append(f"chunk_latent_frames must be >= 1, got {self.chunk_latent_frames}")
        if self.encode_chunk_frames < 1:
            problems.append(f"encode_chunk_frames must be >= 1, got {self.encode_chunk_frames}")
        if problems:
            raise ValueError("TilingConfig: " + "; ".join(problems))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering [0, length), consecutive ones overlapping by
    ≥ ``overlap``; the last tile is shifted back to end exactly at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def blend_ramp(start: int, size: int, total: int, overlap: int) -> torch.Tensor:
    """1D weights for a tile at [start, start + size) of [0, total): linear ramps (i + ½)/overlap over
    ``overlap`` positions on every side that has a neighbour, 1 elsewhere."""
    w = torch.ones(size)
    if overlap > 0:
        ramp = (torch.arange(overlap) + 0.5) / overlap  # (overlap,) in (0, 1)
        if start > 0:
            w[:overlap] = torch.minimum(w[:overlap], ramp)
        if start + size < total:
            w[size - overlap:] = torch.minimum(w[size - overlap:], ramp.flip(0))
    return w


def _frame_chunks(num_frames: int, first: int, step: int) -> list[tuple[int, int]]:
    """[(0, first), (first, first + step), ...] covering num_frames."""
    bounds = [(0, min(first, num_frames))]
    for t in range(first, num_frames, step):
        bounds.append((t, min(t + step, num_frames)))
    return bounds


def _tiles(h: int, w: int, tile: int, overlap: int, spatial: bool):
    """Yield (y0, x0, th, tw) tiles over an h × w grid (one tile when spatial tiling is off)."""
    if not spatial:
        yield 0, 0, h, w
        return
    for y0 in tile_starts(h, tile, overlap):
        for x0 in tile_starts(w, tile, overlap):
            yield y0, x0, min(tile, h), min(tile, w)


def encode_moments(encoder: nn.Module, video: torch.Tensor, cfg: TilingConfig, s: int) -> torch.Tensor:
    """Encoder moments (B, 2C, 1 + (T−1)/r, H/s, W/s) of video (B, 3, T, H, W), tiled and chunked (r: the
    encoder's temporal factor; any frame count per encoder call works, so it is not needed here)."""
    b, _, t, h, w = video.shape
    hl, wl = h // s, w // s
    tile, ov = cfg.tile_size // s, cfg.overlap // s  # latent units
    out = wsum = None
    for y0, x0, th, tw in _tiles(hl, wl, tile, ov, cfg.spatial):
        clip = video[:, :, :, y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s]  # (B, 3, T, th·s, tw·s)
        clip = clip.contiguous(memory_format=memory_format_of(video))  # a tile of a channels-last clip stays so
        if cfg.temporal:
            cache: dict = {}
            parts = [encoder(clip[:, :, a:e], cache) for a, e in _frame_chunks(t, 1, cfg.encode_chunk_frames)]
            moments = torch.cat([p for p in parts if p is not None], dim=2)  # (B, 2C, T', th, tw)
            del cache
        else:
            moments = encoder(clip)
        if out is None:
            out = moments.new_zeros(b, moments.shape[1], moments.shape[2], hl, wl)
            wsum = moments.new_zeros(hl, wl)
        weight = (blend_ramp(y0, th, hl, ov if cfg.spatial else 0)[:, None]
                  * blend_ramp(x0, tw, wl, ov if cfg.spatial else 0)[None, :]).to(moments)  # (th, tw)
        out[..., y0:y0 + th, x0:x0 + tw] += moments * weight
        wsum[y0:y0 + th, x0:x0 + tw] += weight
    return out.div_(wsum)  # in place: a second output-sized tensor would double the peak at 1024 px


def decode_latents(decoder: nn.Module, z: torch.Tensor, cfg: TilingConfig, s: int, r: int,
                   out_channels: int) -> torch.Tensor:
    """Video (B, out_channels, 1 + r·(T'−1), H'·s, W'·s) from raw latents (B, C, T', H', W'), tiled and
    chunked; each tile's chunks are written straight into the output (no per-tile concatenation)."""
    b, _, tl, hl, wl = z.shape
    h, w, t = hl * s, wl * s, 1 + r * (tl - 1)
    tile, ov = cfg.tile_size // s, cfg.overlap // s  # latent units
    out = z.new_zeros(b, out_channels, t, h, w)
    wsum = z.new_zeros(h, w)
    for y0, x0, th, tw in _tiles(hl, wl, tile, ov, cfg.spatial):
        ys, xs = slice(y0 * s, (y0 + th) * s), slice(x0 * s, (x0 + tw) * s)
        pov = ov * s if cfg.spatial else 0
        weight = (blend_ramp(y0 * s, th * s, h, pov)[:, None] * blend_ramp(x0 * s, tw * s, w, pov)[None, :]).to(z)
        zt = z[..., y0:y0 + th, x0:x0 + tw].contiguous(memory_format=memory_format_of(z))  # (B, C, T', th, tw)
        if cfg.temporal:
            cache: dict = {}
            frame = 0
            for a, e in _frame_chunks(tl, 1, cfg.chunk_latent_frames):
                dec = decoder(zt[:, :, a:e], cache)  # (B, 3, n, th·s, tw·s)
                out[:, :, frame:frame + dec.shape[2], ys, xs] += dec * weight
                frame += dec.shape[2]
                del dec
            del cache
        else:
            out[:, :, :, ys, xs] += decoder(zt) * weight
        wsum[ys, xs] += weight
    return out.div_(wsum)  # in place: a second output-sized tensor would double the peak at 1024 px
