"""Training losses and metrics for the video VAE.

Generator (autoencoder) objective, all terms on video tensors (B, 3, T, H, W) in [−1, 1]:

    L = w_l1 · mean|x − x̂| + w_mse · mean (x − x̂)²
      + w_kl · Σ KL(q(z|x) ‖ N(0, I)) / numel(x)            (SD's "sum over latents / sum over pixels")
      + w_p  · [(1 − SSIM(x, x̂)) + mean|∇x − ∇x̂|]          ("perceptual" substitute, see below)
      + w_adv · λ · (−mean D(x̂))                           (hinge GAN, from cfg.adv_start_step on)

**The perceptual term is not LPIPS.** LPIPS and VGG-feature losses need pretrained VGG/AlexNet
weights, which cannot be downloaded here. The substitute is structural: one minus per-frame SSIM
(Wang et al. 2004, Gaussian 11×11 window, σ = 1.5) plus the L1 difference of spatial (x, y) and
temporal (t) finite differences, which penalises blur and flicker. It has no learned features.

The adversarial part is a 3D PatchGAN (Isola et al. 2017, as in VQGAN / MAGVIT) with hinge losses
(Lim & Ye 2017). Before ``adv_start_step`` neither the generator term nor the discriminator should be
trained; :func:`adversarial_active` says when. λ is VQGAN's adaptive weight
(Esser et al. 2021, eq. 7) ``‖∇_last L_rec‖ / (‖∇_last L_adv‖ + 1e-4)``, clamped to [0, 1e4], when the
decoder's last layer weight is passed as ``last_layer``; otherwise λ = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from lvd import kernels


@dataclass
class VAELossConfig:
    """Weights of the VAE loss terms; a weight of 0 switches its term off.

    mse_weight: weight of mean (x − x̂)². On sparse clips (a small shape on black) L1's per-pixel sign
    gradients let the background outvote the shape, so training sits on an all-background plateau;
    MSE's gradient grows with the residual. The shapes recipe uses MSE alone.
    perceptual_weight: weight of the SSIM + gradient substitute for LPIPS (not LPIPS: no pretrained
    weights can be downloaded here). adv_weight: generator hinge term; adv_start_step: first step at
    which the adversarial terms (both generator and discriminator) are active. adaptive_adv_weight:
    scale the generator term by VQGAN's gradient-norm ratio when ``last_layer`` is given.
    """

    l1_weight: float = 1.0
    mse_weight: float = 0.0
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    adv_weight: float = 0.0
    adv_start_step: int = 2000
    adaptive_adv_weight: bool = True

    def __post_init__(self):
        bad = [k for k in ("l1_weight", "mse_weight", "kl_weight", "perceptual_weight", "adv_weight") if getattr(self, k) < 0]
        if bad or self.adv_start_step < 0:
            raise ValueError(f"VAELossConfig: weights and adv_start_step must be >= 0, got "
                             f"{ {k: getattr(self, k) for k in bad + ['adv_start_step']} }")


# ----- metrics ----------------------------------------------------------------------------------
def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 4:
        return x[None]  # a single clip (C, T, H, W)
    if x.ndim != 5:
        raise ValueError(f"expected video (B, C, T, H, W) or (C, T, H, W), got shape {tuple(x.shape)}")
    return x


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for videos in [−1, 1] (peak-to-peak range 2):
    10·log10(2² / MSE) per clip, averaged over the batch. Identical clips give +inf."""
    a, b = _as_batch(a).float(), _as_batch(b).float()
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(1)  # (B,)
    return (10.0 * torch.log10(4.0 / mse)).mean()


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004) over all frames, for videos in [−1, 1].

    Per frame and channel, Gaussian window (11, σ = 1.5; shrunk to fit frames smaller than 11 px),
    valid positions only, C1 = (0.01·2)², C2 = (0.03·2)². Inputs are shifted to [0, 2] first: SSIM's
    luminance term (2μxμy + C1)/(μx² + μy² + C1) assumes non-negative intensities and collapses
    for means near 0. Identical clips give 1.
    """
    a, b = _as_batch(a).float() + 1.0, _as_batch(b).float() + 1.0
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    c = a.shape[1]
    x = rearrange(a, "b c t h w -> (b t) c h w")  # (B·T, C, H, W)
    y = rearrange(b, "b c t h w -> (b t) c h w")
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma, x.device, x.dtype)
    gh, gw = g.view(1, 1, size, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, size).repeat(c, 1, 1, 1)

    def blur(t):  # separable depthwise Gaussian, valid padding
        return F.conv2d(F.conv2d(t, gh, groups=c), gw, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x.pow(2)
    syy = blur(y * y) - mu_y.pow(2)
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (sxx + syy + c2))
    return s.mean()


def structure_loss(video: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """The perceptual substitute (not LPIPS): (1 − SSIM) + mean L1 of the t, y, x finite differences."""
    grad = 0.0
    for dim in (2, 3, 4):
        if video.shape[dim] > 1:
            grad = grad + (torch.diff(recon, dim=dim) - torch.diff(video, dim=dim)).abs().mean()
    return (1.0 - ssim(video, recon)) + grad


# ----- adversarial --------------------------------------------------------------------------------
class PatchDiscriminator3D(ModelMixin, ConfigMixin):
    """3D PatchGAN: video (B, C, T, H, W) → real/fake logits per spatio-temporal patch (B, 1, T', H', W').

    pix2pix's N-layer discriminator with 3D convs: kernel (3, 4, 4); stride 2 in space in the first
    ``num_layers`` convs and in time in the first two; GroupNorm (not BatchNorm, which misbehaves
    under DDP and small batches) and LeakyReLU(0.2); weights N(0, 0.02).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm_num_groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(in_channels, base_channels, (3, 4, 4), stride=(2, 2, 2), padding=1),
                                   nn.LeakyReLU(0.2)]
        ch = base_channels
        for i in range(1, num_layers + 1):
            out = base_channels * 2 ** min(i, 3)
            stride = (2 if i < 2 else 1, 2 if i < num_layers else 1, 2 if i < num_layers else 1)
            layers += [nn.Conv3d(ch, out, (3, 4, 4), stride=stride, padding=1, bias=False),
                       kernels.GroupNorm(min(norm_num_groups, out), out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv3d(ch, 1, (3, 4, 4), stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂))); 0 once D separates real ≥ 1 and fake ≤ −1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """−mean D(x̂)."""
    return -logits_fake.mean()


def adversarial_active(cfg: VAELossConfig, step: int) -> bool:
    """True when the GAN terms are on: ``adv_weight > 0`` and ``step >= adv_start_step``."""
    return cfg.adv_weight > 0 and step >= cfg.adv_start_step


def discriminator_loss(discriminator: nn.Module, video: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hinge loss for the discriminator step (the reconstruction is detached). Call it only when
    :func:`adversarial_active`. Returns ``(loss, metrics)`` with detached scalar tensors."""
    logits_real = discriminator(video)
    logits_fake = discriminator(recon.detach())
    loss = hinge_d_loss(logits_real, logits_fake)
    return loss, {"d_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                  "logits_fake": logits_fake.detach().mean()}


def _adaptive_weight(rec_loss, g_loss, last_layer):
    """VQGAN eq. 7: ‖∇ L_rec‖ / (‖∇ L_G‖ + 1e-4) at the decoder's last layer, clamped to [0, 1e4]."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def vae_loss(video: torch.Tensor, recon: torch.Tensor, posterior, cfg: VAELossConfig, *, step: int,
             discriminator: nn.Module | None = None, last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The autoencoder's loss (module docstring) and a dict of detached scalar tensors for logging.

    posterior: a :class:`~lvd.vae.layers.DiagonalGaussian` (anything with ``kl() -> (B,)``).
    discriminator: used for the generator term when :func:`adversarial_active`; its parameters get
    gradients from this loss, so zero them (or freeze D) before its own step.
    last_layer: e.g. ``vae.decoder.conv_out.conv.weight`` for the adaptive GAN weight.
    """
    if video.shape != recon.shape:
        raise ValueError(f"vae_loss: video {tuple(video.shape)} and recon {tuple(recon.shape)} differ")
    l1 = (recon - video).abs().mean()
    kl = posterior.kl().sum() / video.numel()
    rec = cfg.l1_weight * l1
    metrics = {"l1": l1.detach(), "kl": kl.detach()}
    if cfg.mse_weight > 0:
        mse = (recon - video).square().mean()
        rec = rec + cfg.mse_weight * mse
        metrics["mse"] = mse.detach()
    if cfg.perceptual_weight > 0:
        p = structure_loss(video, recon)
        rec = rec + cfg.perceptual_weight * p
        metrics["perceptual"] = p.detach()
    loss = rec + cfg.kl_weight * kl
    if discriminator is not None and adversarial_active(cfg, step):
        g = hinge_g_loss(discriminator(recon))
        factor = torch.ones((), device=video.device)
        if cfg.adaptive_adv_weight and last_layer is not None and torch.is_grad_enabled():
            factor = _adaptive_weight(rec, g, last_layer)
        loss = loss + cfg.adv_weight * factor * g
        metrics.update(g_adv=g.detach(), adv_factor=factor)
    metrics["loss"] = loss.detach()
    return loss, metrics
