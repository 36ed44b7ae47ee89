"""Our causal VAE and a wrapped diffusers VAE both satisfy the VideoVAE protocol, with the same shape checks."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from lvd.vae import CausalVideoVAE, PretrainedVideoVAE, VideoVAE, as_video_vae, nearest_frame_counts


def tiny_causal():
    return CausalVideoVAE.from_preset("tiny", block_out_channels=(8, 16, 16), norm_num_groups=4,
                                      latent_channels=4).eval()


def tiny_wan():  # 4× time, 8× space
    return as_video_vae(AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                         latents_std=[1.0] * 4)).eval()


BUILDERS = {"causal": tiny_causal, "wan": tiny_wan}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_both_vaes_are_video_vaes(name):
    vae = BUILDERS[name]()
    assert isinstance(vae, VideoVAE)
    assert isinstance(vae, (CausalVideoVAE, PretrainedVideoVAE))
    assert not isinstance(torch.nn.Linear(2, 2), VideoVAE)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_latent_shape_and_frames_for_round_trip_and_match_encode_decode(name):
    vae = BUILDERS[name]()
    r, s = vae.temporal_compression, vae.spatial_compression
    for latent_frames in (1, 2, 3):
        frames = vae.frames_for(latent_frames)
        assert frames == 1 + r * (latent_frames - 1)
        assert vae.latent_shape(frames, 2 * s, 3 * s) == (vae.latent_channels, latent_frames, 2, 3)
    video = torch.rand(1, 3, vae.frames_for(2), 2 * s, 2 * s) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        assert tuple(z.shape[1:]) == vae.latent_shape(*video.shape[2:])
        assert vae.decode(z).shape == video.shape


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bad_shapes_raise_value_errors_naming_the_valid_values(name):
    vae = BUILDERS[name]()
    r, s = vae.temporal_compression, vae.spatial_compression
    bad = 1 + r + 1  # one past a valid count
    with pytest.raises(ValueError, match=rf"frame count must be 1 \+ {r}·k .*got {bad} \(nearest: {1 + r} or {1 + 2 * r}\)"):
        vae.latent_shape(bad, s, s)
    with pytest.raises(ValueError, match=f"multiples of {s}"):
        vae.check_input(1, s + 1, s)
    with pytest.raises(ValueError, match="latent frame count must be >= 1"):
        vae.frames_for(0)
    with pytest.raises(ValueError, match="expects video"):
        vae.encode(torch.zeros(1, 2, 1, s, s))
    with pytest.raises(ValueError, match="expects latents"):
        vae.decode(torch.zeros(1, vae.latent_channels + 1, 1, 1, 1))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_tiling_switches_on_and_off(name):
    vae = BUILDERS[name]()
    assert not vae.tiling_enabled
    vae.enable_tiling()
    assert vae.tiling_enabled
    vae.disable_tiling()
    assert not vae.tiling_enabled


def test_nearest_frame_counts():
    assert nearest_frame_counts(9, 4) == (9,)
    assert nearest_frame_counts(10, 4) == (9, 13)
    assert nearest_frame_counts(0, 4) == (1,)
    assert nearest_frame_counts(7, 8) == (1, 9)
