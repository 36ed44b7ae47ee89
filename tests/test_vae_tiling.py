"""Chunked decode == full decode; tiled ≈ untiled within the tolerance stated in lvd/vae/tiling.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

from lvd.vae import CausalVideoVAE, TilingConfig
from lvd.vae.layers import CausalConv3d
from lvd.vae.tiling import blend_ramp, decode_latents, tile_starts


LAYOUTS = ("conv", "resnet")  # block_type: the tiny preset's layout, and the small/base one


def small_vae(layout="conv"):
    return CausalVideoVAE.from_preset("tiny", block_type=layout, layers_per_block=1, block_out_channels=(8, 16, 16),
                                      norm_num_groups=4).eval()


class ConvInputs(TorchDispatchMode):
    """Records, for every oneDNN convolution run inside it, whether its inputs are channels-last: the input of
    each ``mkldnn_convolution`` and the cached part (``left``) of each fused split-window sum
    (``lvd.kernels.conv3d``), whose new part is the input of the convolution before it."""

    def __init__(self):
        super().__init__()
        self.channels_last, self.split_windows = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("aten.mkldnn_convolution"):
            self.channels_last.append(args[0].is_contiguous(memory_format=torch.channels_last_3d))
        elif name.startswith("mkldnn._convolution_pointwise_.binary"):
            self.split_windows += 1
            self.channels_last.append(args[1].is_contiguous(memory_format=torch.channels_last_3d))
        return func(*args, **(kwargs or {}))


def smooth_clip(t, h, w):
    """Low-frequency moving patterns in [−0.8, 0.8] (natural-image-like, unlike white noise)."""
    tt = torch.arange(t)[:, None, None]
    y, x = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    rgb = [torch.sin(x / 9.0 + tt * 0.3) * torch.cos(y / 13.0), torch.cos((x + y) / 17.0 - tt * 0.2),
           (torch.sin(y / 7.0 + tt * 0.1) * 0.5).expand(t, h, w)]
    return torch.stack(rgb)[None] * 0.8  # (1, 3, T, H, W)


@pytest.mark.parametrize("piece_bytes", [None, 1])
@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_decode_equals_full_decode(layout, chunk, piece_bytes):
    vae = small_vae(layout)
    if piece_bytes:  # every streaming conv then runs one output frame per oneDNN call
        vae.set_stream_piece_bytes(piece_bytes)
    z = torch.randn(1, 16, 4, 8, 8)
    with torch.no_grad():
        full = vae.decode_raw(z)
        vae.enable_tiling(spatial=False, chunk_latent_frames=chunk)
        chunked = vae.decode_raw(z)
    assert chunked.shape == full.shape == (1, 3, 13, 32, 32)
    assert (chunked - full).abs().max() < 1e-4


@pytest.mark.parametrize("piece_bytes", [None, 1])
@pytest.mark.parametrize("frames_per_call", [1, 3, 4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_encode_equals_full_encode(layout, frames_per_call, piece_bytes):
    """Any number of frames per encoder call, a multiple of the temporal factor (4) or not: strided convs
    wait in their caches for the frames that complete their windows, and calls that yield no latent frame
    are skipped."""
    vae = small_vae(layout)
    if piece_bytes:
        vae.set_stream_piece_bytes(piece_bytes)
    x = smooth_clip(13, 32, 32)
    with torch.no_grad():
        full = vae.encode_posterior(x).mean
        vae.enable_tiling(spatial=False, encode_chunk_frames=frames_per_call)
        chunked = vae.encode_posterior(x).mean
    assert chunked.shape == full.shape == (1, 16, 4, 8, 8)
    assert (chunked - full).abs().max() < 1e-4


def test_encoder_fed_one_frame_yields_a_latent_frame_only_when_one_is_complete():
    vae = small_vae("resnet")
    x = smooth_clip(9, 32, 32)
    cache = {}
    with torch.no_grad():
        outputs = [vae.encoder(vae._inference_layout(x[:, :, t:t + 1]), cache) for t in range(9)]
    # frame 0 alone gives latent frame 0; then frames 1–4 give latent frame 1 on frame 4, 5–8 on frame 8
    assert [o is not None for o in outputs] == [True, False, False, False, True, False, False, False, True]
    assert all(o.shape[2] == 1 for o in outputs if o is not None)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_single_tile_is_exact(layout):
    vae = small_vae(layout)
    z = torch.randn(1, 16, 2, 8, 8)
    with torch.no_grad():
        full = vae.decode_raw(z)
        vae.enable_tiling(tile_size=64, overlap=16)  # 32 px frame < 64 px tile
        assert (vae.decode_raw(z) - full).abs().max() < 1e-4


class _Nearest(nn.Module):
    """A decoder whose output at a pixel depends only on the latent above it (no context)."""

    def forward(self, z, cache=None):
        first = cache is None or "seen" not in cache
        if cache is not None:
            cache["seen"] = True
        frames = z[:, :3].repeat_interleave(4, dim=2)  # (B, 3, 4·T', h, w)
        if first:
            frames = frames[:, :, 3:]  # the clip's first latent frame gives one frame
        return F.interpolate(frames, scale_factor=(1, 4, 4), mode="nearest")


def test_blending_weights_sum_to_one_so_a_context_free_decoder_tiles_exactly():
    z = torch.randn(1, 4, 3, 20, 28)
    cfg = TilingConfig(tile_size=32, overlap=8, chunk_latent_frames=1)
    tiled = decode_latents(_Nearest(), z, cfg, s=4, r=4, out_channels=3)
    full = _Nearest()(z)
    assert tiled.shape == full.shape == (1, 3, 9, 80, 112)
    assert (tiled - full).abs().max() < 1e-5


def test_tiles_cover_the_axis_with_the_requested_overlap():
    for length, tile, overlap in [(40, 16, 4), (16, 16, 4), (10, 16, 4), (33, 8, 2)]:
        starts = tile_starts(length, tile, overlap)
        covered = torch.zeros(length, dtype=torch.bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered.all() and starts[-1] + min(tile, length) == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    w = blend_ramp(8, 16, 40, 4)
    assert w.min() > 0 and w.max() == 1 and w[0] < w[3]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiled_matches_untiled_within_the_stated_tolerance(layout):
    """tiling.py docstring: random-weight tiny model, 96 px clip, 64 px tiles, 32 px overlap:
    decode mean |Δ| ≤ 0.12 and max |Δ| ≤ 2.5; encode mean |Δ| ≤ 0.1. Bigger tiles do better."""
    vae = small_vae(layout)
    x = smooth_clip(5, 96, 96)
    with torch.no_grad():
        z = vae.encode_posterior(x).mean
        full = vae.decode_raw(z)
        vae.enable_tiling(tile_size=64, overlap=32)
        dec_err = (vae.decode_raw(z) - full).abs()
        enc_err = (vae.encode_posterior(x).mean - z).abs()
        vae.enable_tiling(tile_size=80, overlap=32)
        dec_err_big = (vae.decode_raw(z) - full).abs()
    assert dec_err.mean() <= 0.12 and dec_err.max() <= 2.5
    assert enc_err.mean() <= 0.1
    assert dec_err_big.mean() < dec_err.mean()


@pytest.mark.parametrize("stride", [1, 2])
def test_streaming_conv_in_pieces_equals_the_whole_clip_conv(stride):
    conv = CausalConv3d(4, 6, 3, stride=stride)
    x = torch.randn(1, 4, 13, 5, 5)
    with torch.no_grad():
        full = conv(x)
        frame_bytes = 4 * 5 * 5 * 4
        for piece_frames in (3, 4, 7):  # input frames per oneDNN call
            conv.stream_piece_bytes = piece_frames * frame_bytes
            cache = {}
            chunks = [conv(x[:, :, :1], cache)] + [conv(x[:, :, a:a + 4], cache) for a in (1, 5, 9)]
            torch.testing.assert_close(torch.cat(chunks, dim=2), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [5, 16])  # 5 px: windows are concatenated; 16 px: split (frames outweigh the kernel)
@pytest.mark.parametrize("frames_per_call", [1, 2, 4])
@pytest.mark.parametrize("stride", [1, 2])
def test_streaming_conv_in_small_chunks_equals_the_whole_clip_conv(stride, frames_per_call, size):
    """A stride-2 conv fed single frames outputs a frame on every second one (0 frames in between)."""
    conv = CausalConv3d(4, 6, 3, stride=stride)
    x = torch.randn(1, 4, 13, size, size)
    with torch.no_grad():
        full = conv(x)
        cache = {}
        with ConvInputs() as record:
            outs = [conv(x[:, :, :1], cache)] + [conv(x[:, :, t:t + frames_per_call], cache)
                                                 for t in range(1, 13, frames_per_call)]
    if frames_per_call == 1:
        assert [o.shape[2] for o in outs] == ([1] * 13 if stride == 1 else [1, 0] * 6 + [1])
    assert all(o.shape[1] == 6 and o.shape[3:] == (size, size) for o in outs)
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-5, atol=1e-5)
    assert bool(record.split_windows) == (size == 16)


def test_bad_tiling_settings_raise():
    vae = small_vae()
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.enable_tiling(tile_size=30)
    with pytest.raises(ValueError, match="overlap"):
        vae.enable_tiling(tile_size=32, overlap=24)
    with pytest.raises(ValueError, match="chunk_latent_frames"):
        vae.enable_tiling(chunk_latent_frames=0)
    with pytest.raises(ValueError, match="encode_chunk_frames"):
        vae.enable_tiling(encode_chunk_frames=0)


@pytest.mark.parametrize("tiling", ["whole", "chunked", "tiled"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_channels_last_inference_equals_the_default_layout_and_stays_channels_last(layout, tiling):
    """CPU inference runs channels-last (``CausalVideoVAE.set_cpu_channels_last``): the same encode/decode to
    float rounding as the default layout, every convolution reads channels-last input (no fallback to a
    reorder anywhere in the network), and the results come back in the default layout."""
    vae = CausalVideoVAE.from_preset("tiny", block_type=layout, layers_per_block=1, block_out_channels=(8, 16, 16),
                                     norm_num_groups=4, mid_attention=layout == "resnet").eval()
    vae.set_stream_piece_bytes(1)  # pieces are views of the chunk too
    if tiling == "chunked":
        vae.enable_tiling(spatial=False, chunk_latent_frames=1)
    elif tiling == "tiled":
        vae.enable_tiling(tile_size=32, overlap=16, chunk_latent_frames=1)
    x = smooth_clip(9, 48, 48)
    with torch.no_grad(), ConvInputs() as record:  # every conv of the network runs through oneDNN
        z = vae.encode_posterior(x).mean
        video = vae.decode_raw(z)
        vae.set_cpu_channels_last(False)
        z_ref = vae.encode_posterior(x).mean
        video_ref = vae.decode_raw(z_ref)
    layouts = record.channels_last
    assert z.is_contiguous() and video.is_contiguous()
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(video, video_ref, rtol=1e-4, atol=1e-4)
    n = len(layouts) // 2  # the channels-last run's convolutions, then the default layout's
    assert n > 0 and all(layouts[:n]) and not all(layouts[n:])
