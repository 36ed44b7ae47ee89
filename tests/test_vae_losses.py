"""VAE losses and metrics: KL, hinge values, PSNR/SSIM, warm-up of the adversarial term."""

import math

import pytest
import torch

from lvd.vae import CausalVideoVAE, DiagonalGaussian
from lvd.vae.losses import (PatchDiscriminator3D, VAELossConfig, adversarial_active, discriminator_loss,
                            hinge_d_loss, hinge_g_loss, psnr, ssim, structure_loss, vae_loss)


def video(b=2, t=5, h=16, w=16, seed=0):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_kl_of_a_standard_normal_posterior_is_zero_and_grows_away_from_it():
    params = torch.zeros(2, 8, 3, 4, 4)  # mean 0, logvar 0
    assert torch.equal(DiagonalGaussian(params).kl(), torch.zeros(2))
    params[:, :4] = 1.0  # mean 1: KL = ½ · μ² per element
    assert torch.allclose(DiagonalGaussian(params).kl(), torch.full((2,), 0.5 * 4 * 3 * 4 * 4))


def test_hinge_losses_have_their_textbook_values():
    ones = torch.ones(4)
    assert hinge_d_loss(2 * ones, -2 * ones) == 0  # a confident, correct discriminator
    assert hinge_d_loss(0 * ones, 0 * ones) == 1.0
    assert hinge_d_loss(-ones, ones) == 2.0
    assert hinge_g_loss(3 * ones) == -3.0


def test_psnr_and_ssim():
    a = video()
    assert math.isinf(psnr(a, a).item()) and psnr(a, a) > 0
    b = (a + 0.1).clamp(-1, 1)
    mse = (a - b).pow(2).mean()
    assert psnr(a[:1], b[:1]) == pytest.approx(10 * math.log10(4 / (a[:1] - b[:1]).pow(2).mean().item()), rel=1e-5)
    assert 10 * math.log10(4 / mse) - 1 < psnr(a, b) < 10 * math.log10(4 / mse) + 1
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    noisy = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    assert ssim(a, noisy) < ssim(a, b) < 1.0
    assert psnr(a[0], a[0] * 0.5) > 0  # a single clip (C, T, H, W) is accepted
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:, :, :2])


def test_vae_loss_is_weighted_l1_mse_and_kl():
    x, recon = video(), video(seed=1)
    post = DiagonalGaussian(torch.randn(2, 8, 2, 4, 4))
    cfg = VAELossConfig(kl_weight=1e-3)
    loss, metrics = vae_loss(x, recon, post, cfg, step=0)
    l1 = (x - recon).abs().mean()
    kl = post.kl().sum() / x.numel()
    assert torch.allclose(loss, l1 + 1e-3 * kl)
    assert set(metrics) == {"loss", "l1", "kl"}
    _, metrics = vae_loss(x, recon, post, VAELossConfig(perceptual_weight=0.1), step=0)
    assert metrics["perceptual"] == pytest.approx(structure_loss(x, recon).item())
    assert structure_loss(x, x) == pytest.approx(0.0, abs=1e-5)
    loss, metrics = vae_loss(x, recon, post, VAELossConfig(l1_weight=0.0, mse_weight=2.0, kl_weight=1e-3), step=0)
    assert torch.allclose(loss, 2.0 * (x - recon).square().mean() + 1e-3 * kl)
    assert set(metrics) == {"loss", "l1", "kl", "mse"}


def test_adversarial_term_turns_on_after_warm_up():
    cfg = VAELossConfig(adv_weight=0.5, adv_start_step=10)
    assert not adversarial_active(cfg, 9) and adversarial_active(cfg, 10)
    assert not adversarial_active(VAELossConfig(adv_weight=0.0, adv_start_step=0), 100)
    disc = PatchDiscriminator3D(base_channels=8, num_layers=2, norm_num_groups=4)
    vae = CausalVideoVAE.from_preset("tiny", block_out_channels=(8, 16, 16), norm_num_groups=4)
    x = video(1, 5, 16, 16)
    recon, post = vae(x)
    before, m_before = vae_loss(x, recon, post, cfg, step=9, discriminator=disc)
    assert "g_adv" not in m_before
    last = vae.decoder.conv_out.conv.weight
    after, m_after = vae_loss(x, recon, post, cfg, step=10, discriminator=disc, last_layer=last)
    assert m_after["adv_factor"] > 0
    assert torch.allclose(after, before + 0.5 * m_after["adv_factor"] * m_after["g_adv"])
    after.backward()
    assert last.grad is not None and disc.net[0].weight.grad is not None


def test_patch_discriminator_shapes_loss_and_save_load(tmp_path):
    disc = PatchDiscriminator3D(base_channels=8, num_layers=3, norm_num_groups=4)
    x = video(2, 17, 64, 64)
    logits = disc(x)
    assert logits.shape[:2] == (2, 1) and logits.ndim == 5
    loss, metrics = discriminator_loss(disc, x, video(2, 17, 64, 64, seed=1).requires_grad_())
    loss.backward()
    assert set(metrics) == {"d_loss", "logits_real", "logits_fake"} and loss > 0
    disc.save_pretrained(tmp_path)
    again = PatchDiscriminator3D.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), disc(x))


def test_bad_loss_config_raises():
    with pytest.raises(ValueError, match="kl_weight"):
        VAELossConfig(kl_weight=-1.0)
