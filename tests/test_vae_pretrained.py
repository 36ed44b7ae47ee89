"""Diffusers video VAEs behind lvd's interface: tiny random models saved to a temp folder, loaded offline."""

import json

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo, AutoencoderKLLTXVideo, AutoencoderKLWan

from lvd.vae import CausalVideoVAE, PretrainedVideoVAE, as_video_vae, load_vae


def tiny_cogvideox():  # 3 blocks → 4× space (the factor follows the block count)
    return AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8), down_block_types=("CogVideoXDownBlock3D",) * 3,
                                  up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=4, layers_per_block=1,
                                  norm_num_groups=4, temporal_compression_ratio=4)


def tiny_wan():
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                            latents_std=[1.5, 0.5, 2.0, 1.0])


def tiny_hunyuan():
    return AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                     norm_num_groups=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                     up_block_types=("HunyuanVideoUpBlock3D",) * 4)


def tiny_ltx():
    model = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                  layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
                                  decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                  upsample_factor=(1,) * 4, scaling_factor=0.7)
    with torch.no_grad():  # non-trivial statistics, saved as buffers in the weights file
        model.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        model.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
    return model


# builder, (temporal, spatial), frames, size, (shift, mul) as each model's own pipeline normalises
CASES = {
    "cogvideox": (tiny_cogvideox, (4, 4), 9, 32, lambda m: (0.0, m.config.scaling_factor)),
    "wan": (tiny_wan, (4, 8), 9, 32,
            lambda m: (torch.tensor(m.config.latents_mean), 1 / torch.tensor(m.config.latents_std))),
    "hunyuanvideo": (tiny_hunyuan, (4, 8), 5, 32, lambda m: (0.0, m.config.scaling_factor)),
    "ltx": (tiny_ltx, (8, 32), 9, 64, lambda m: (m.latents_mean, m.config.scaling_factor / m.latents_std)),
}


def _bcast(v):
    return torch.as_tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1, 1) if torch.as_tensor(v).ndim else v


@pytest.mark.parametrize("name", sorted(CASES))
def test_wrapper_gives_what_the_diffusers_model_gives(name, tmp_path):
    build, (r, s), frames, size, norm = CASES[name]
    build().save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    assert isinstance(vae, PretrainedVideoVAE)
    assert (vae.temporal_compression, vae.spatial_compression) == (r, s)
    ref = type(vae.model).from_pretrained(tmp_path).eval()  # an independent copy, read offline
    x = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shift, mul = (_bcast(v) for v in norm(ref))
    assert not torch.all(torch.as_tensor(mul) == 1)  # the normalisation under test is not the identity
    with torch.no_grad():
        z = vae.encode(x)
        z_ref = (ref.encode(x).latent_dist.mode() - shift) * mul
        assert z.shape == (1, *vae.latent_shape(frames, size, size))
        torch.testing.assert_close(z, z_ref)
        video = vae.decode(z)
        torch.testing.assert_close(video, ref.decode(z_ref / mul + shift).sample)
    assert video.shape == x.shape


def test_frame_rule_follows_the_temporal_factor(tmp_path):
    tiny_ltx().save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    with pytest.raises(ValueError, match=r"1 \+ 8·k"):
        vae.check_input(13, 64, 64)
    with pytest.raises(ValueError, match="multiples of 32"):
        vae.check_input(9, 48, 64)
    assert vae.latent_shape(17, 64, 96) == (8, 3, 2, 3)


def test_load_vae_accepts_presets_our_folders_and_pipeline_folders(tmp_path):
    assert isinstance(load_vae("tiny"), CausalVideoVAE)
    ours = CausalVideoVAE.from_preset("tiny", block_out_channels=(8, 16, 16), norm_num_groups=4)
    ours.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = load_vae(tmp_path / "pipe", dtype=torch.float64)
    assert isinstance(loaded, CausalVideoVAE) and loaded.dtype == torch.float64
    assert as_video_vae(loaded) is loaded
    wrapped = as_video_vae(tiny_wan())
    assert isinstance(wrapped, PretrainedVideoVAE) and as_video_vae(wrapped) is wrapped


def test_load_vae_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_vae(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKL'"):
        load_vae(tmp_path)
    with pytest.raises(TypeError, match="unsupported"):
        as_video_vae(torch.nn.Linear(2, 2))
