"""CausalVideoVAE: shapes per preset, causality, save/load, calibration, bad input."""

import pytest
import torch

from lvd.vae import VAE_PRESETS, CausalVideoVAE, calibrate_latent_stats, load_vae


LAYOUTS = ("conv", "resnet")  # block_type: the tiny preset's layout, and the small/base one


def tiny(layout="conv", **overrides):
    """The tiny preset at a quarter of its width, in either block layout: every property here holds at any
    width, and 2 CPU cores are shared."""
    layout_args = {"block_type": layout, "layers_per_block": 1}
    return CausalVideoVAE.from_preset("tiny", **{"block_out_channels": (8, 16, 16), "norm_num_groups": 4,
                                                 **layout_args, **overrides}).eval()


def clip(b=1, t=9, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize("name", sorted(VAE_PRESETS))
def test_every_preset_has_documented_shapes_on_meta_device(name):
    with torch.device("meta"):
        vae = CausalVideoVAE.from_preset(name)
        recon, posterior = vae(torch.empty(1, 3, 17, 64, 64))
    s, r = vae.spatial_compression, vae.temporal_compression
    assert (r, vae.latent_channels) == (4, 16)
    assert posterior.mean.shape == (1, 16, 1 + 16 // r, 64 // s, 64 // s) == (1, *vae.latent_shape(17, 64, 64))
    assert recon.shape == (1, 3, 17, 64, 64)


def test_base_preset_is_cogvideox_sized():
    with torch.device("meta"):
        vae = CausalVideoVAE.from_preset("base")
    n = sum(p.numel() for p in vae.parameters())
    assert 150e6 < n < 300e6  # CogVideoX's VAE: 216 M
    assert vae.spatial_compression == 8 and vae.temporal_compression == 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_roundtrip_shapes_and_single_frame(layout):
    vae = tiny(layout)
    with torch.no_grad():
        z = vae.encode(clip(2, 9, 32, 48))
        assert z.shape == (2, 16, 3, 8, 12)
        assert vae.decode(z).shape == (2, 3, 9, 32, 48)
        assert vae.encode(clip(1, 1, 16, 16)).shape == (1, 16, 1, 4, 4)  # an image is a 1-frame clip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_changing_a_frame_never_changes_earlier_latent_frames(layout):
    vae = tiny(layout)
    x = clip(1, 13, 16, 16)
    with torch.no_grad():
        z = vae.encode_posterior(x).mean
        for t in (1, 5, 12):
            y = x.clone()
            y[:, :, t] = -y[:, :, t]
            zy = vae.encode_posterior(y).mean
            k = 1 + (t - 1) // 4  # latent frame that first sees frame t
            assert torch.equal(zy[:, :, :k], z[:, :, :k]), t
            assert not torch.allclose(zy[:, :, k], z[:, :, k])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decoder_is_causal_in_latent_frames(layout):
    vae = tiny(layout)
    with torch.no_grad():
        z = torch.randn(1, 16, 4, 4, 4)
        out = vae.decode_raw(z)
        z2 = z.clone()
        z2[:, :, 2] += 1.0
        out2 = vae.decode_raw(z2)
    first = 1 + 4 * (2 - 1)  # frames decoded from latent frames 0 and 1
    assert torch.equal(out[:, :, :first], out2[:, :, :first])
    assert not torch.allclose(out[:, :, first:], out2[:, :, first:])


def test_sampling_is_deterministic_given_a_generator():
    vae = tiny()
    x = clip()
    with torch.no_grad():
        a, _ = vae(x, generator=torch.Generator().manual_seed(3))
        b, _ = vae(x, generator=torch.Generator().manual_seed(3))
        c, _ = vae(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_load_round_trip_keeps_weights_and_latent_stats(layout, tmp_path):
    vae = tiny(layout)
    vae.register_to_config(latent_mean=[0.5] * 16, latent_std=[2.0] * 16)
    vae.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_vae(tmp_path)
    assert isinstance(loaded, CausalVideoVAE)
    assert list(loaded.config.latent_std) == [2.0] * 16
    x = clip()
    with torch.no_grad():
        assert torch.equal(vae.encode(x), loaded.encode(x))
        z = torch.randn(1, 16, 3, 8, 8)
        assert torch.equal(vae.decode(z), loaded.decode(z))


def test_calibration_normalises_latents_to_zero_mean_unit_std():
    vae = tiny()
    batches = [clip(2, 5, 32, 32, seed=i) * 0.5 + 0.2 for i in range(3)]
    mean, std = calibrate_latent_stats(vae, ({"video": b} for b in batches))
    assert mean.shape == std.shape == (16,)
    assert vae.config.latent_std == pytest.approx(std.tolist())
    with torch.no_grad():
        z = torch.cat([vae.encode(b) for b in batches])  # (B, C, T', H', W')
    per_channel = z.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert (per_channel.std(1, unbiased=False) - 1).abs().max() < 1e-4
    with torch.no_grad():  # decode undoes the normalisation
        raw = vae.encode_posterior(batches[0]).mean
        assert torch.allclose(vae.decode(vae.encode(batches[0])), vae.decode_raw(raw), atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_checkpointing_gives_the_same_gradients(layout):
    x = clip(1, 5, 16, 16)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        vae = tiny(layout).train()
        if ckpt:
            vae.enable_gradient_checkpointing()
        recon, post = vae(x, sample=False)
        ((recon - x).abs().mean() + post.kl().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("shape, expected", [
    ((1, 3, 8, 32, 32), "1 + 4·k"),
    ((1, 3, 9, 30, 32), "multiples of 4"),
    ((1, 4, 9, 32, 32), "(B, 3, T, H, W)"),
    ((3, 9, 32, 32), "(B, 3, T, H, W)"),
])
def test_bad_video_raises_a_clear_error(shape, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        tiny().encode(torch.zeros(shape))


def test_bad_latents_and_config_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, 16, T', H', W'\)"):
        tiny().decode(torch.zeros(1, 8, 2, 4, 4))
    with pytest.raises(ValueError, match="power of 2"):
        CausalVideoVAE(spatial_compression=6)
    with pytest.raises(ValueError, match="at most 4"):
        CausalVideoVAE.from_preset("tiny", spatial_compression=8)
    with pytest.raises(ValueError, match="latent_channels=16"):
        CausalVideoVAE.from_preset("tiny", latent_mean=[0.0] * 4)
    with pytest.raises(ValueError, match="unknown VAE preset"):
        CausalVideoVAE.from_preset("huge")
    with pytest.raises(ValueError, match="block_type"):
        CausalVideoVAE.from_preset("tiny", block_type="unet")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_encoding_a_prefix_gives_the_first_latent_frames_of_the_whole_clip(layout):
    """Image-to-video and continuation rely on it: the first 1 + 4(k − 1) frames alone encode to the first k latent
    frames of the whole clip (an image, k = 1, to latent frame 0)."""
    vae = tiny(layout)
    x = clip(1, 13, 16, 16)
    with torch.no_grad():
        whole = vae.encode(x)  # (1, 16, 4, 4, 4)
        for k in (1, 2, 3):
            prefix = vae.encode(x[:, :, : 1 + 4 * (k - 1)])
            assert prefix.shape[2] == k
            torch.testing.assert_close(prefix, whole[:, :, :k], rtol=1e-5, atol=1e-5)
