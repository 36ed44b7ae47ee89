"""Training objectives on top of diffusers' schedulers: rectified flow (default), DDPM eps and v.

The network predicts one tensor the size of the latents; this file says what that tensor is.

- ``"flow"`` (rectified flow, Liu et al. 2022; SD3, Esser et al. 2024): ``x_t = (1 − σ)·x₀ + σ·ε``, target
  ``ε − x₀`` (the velocity ``dx_t/dσ``), model timestep ``1000·σ``: exactly
  ``FlowMatchEulerDiscreteScheduler.scale_noise`` and the velocity its ``step`` integrates. σ is drawn
  from a logit-normal (SD3 §3.1, via ``diffusers.training_utils``) and then shifted,
  ``σ' = e^μ / (e^μ + 1/σ − 1)`` (the scheduler's ``time_shift``): μ = ln(shift), or with
  ``dynamic_shift`` μ grows linearly with the token count from ``base_shift`` at ``base_seq_len`` to
  ``max_shift`` at ``max_seq_len`` (Flux), so larger / longer videos spend more steps at high noise.
- ``"eps"`` / ``"v"`` (DDPM, Ho et al. 2020; v: Salimans & Ho 2022): integer t uniform in [0, 1000),
  ``x_t = DDPMScheduler.add_noise(x₀, ε, t)``, target ε or ``DDPMScheduler.get_velocity(x₀, ε, t)``.
  ``zero_terminal_snr`` rescales the betas with diffusers' ``rescale_zero_terminal_snr``
  (Lin et al. 2024), which needs v-prediction.

Classifier-free guidance (Ho & Salimans 2022): with probability ``cfg_dropout`` a sample's whole text
conditioning (states, mask and pooled vector) is replaced by the **empty-prompt embedding**
``encode_text(model, tokenizer, [""])`` (= ``TextEncoder.empty()``), passed to the objective as
``uncond``. At sampling the unconditional branch must use the same thing:
:func:`null_text_embeddings` (what ``LVDPipeline`` does when there is no negative prompt).

Clean first frames (image-to-video, video continuation; :class:`CleanFramesConfig`, YAML key ``clean_frames``):
with probability ``prob`` a training sample keeps its first k latent frames clean (k drawn from ``frames``;
k = 1 is an image, since the causal VAE encodes frame 0 alone). Those frames get no noise (x_t = x₀ there, for
every objective), the model is told k (``model(..., clean_frames=k)``, see :class:`lvd.dit.VideoDiT`), and the
loss is the mean over the noisy frames only: the clean ones have nothing to predict. Sampling keeps them clean
the same way (:func:`lvd.pipeline.sampling.sample`'s ``clean_latents``).

The objective travels with an export as the scheduler config (:func:`scheduler_config`) that goes in
``scheduler/``; :func:`diffusion_config_from_scheduler` reads it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from lvd.text_embeddings import TextEmbeddings
from lvd.text import encode_text

OBJECTIVES = ("flow", "eps", "v")
SAMPLERS = ("euler", "ddim", "dpm++", "unipc")
_PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction"}


@dataclass
class DiffusionConfig:
    """The training objective and its noise schedule (YAML key ``diffusion``)."""

    objective: str = "flow"  # "flow" | "eps" | "v"
    num_train_timesteps: int = 1000
    # flow: σ ~ sigmoid(N(logit_mean, logit_std)) ("logit_normal") or U(0, 1) ("uniform"), then shifted
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # static shift (SD3 uses 3.0 at 1024²); ignored when dynamic_shift
    dynamic_shift: bool = False  # μ by token count, Flux-style
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    # eps / v: the DDPM beta schedule
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    # classifier-free guidance: probability of replacing a sample's text by the empty prompt
    cfg_dropout: float = 0.1

    def __post_init__(self):
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"diffusion.objective={self.objective!r} is not one of {OBJECTIVES}")
        if self.timestep_sampling not in ("logit_normal", "uniform"):
            problems.append(f"diffusion.timestep_sampling={self.timestep_sampling!r} is not 'logit_normal' or 'uniform'")
        if not 0.0 <= self.cfg_dropout < 1.0:
            problems.append(f"diffusion.cfg_dropout={self.cfg_dropout} must be in [0, 1)")
        if self.shift <= 0:
            problems.append(f"diffusion.shift={self.shift} must be > 0")
        if self.zero_terminal_snr and self.objective != "v":
            problems.append(
                f"diffusion.zero_terminal_snr needs objective 'v' (got {self.objective!r}): at zero SNR "
                "x₀ = (x_t − σ·ε)/α divides by α = 0"
            )
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class CleanFramesConfig:
    """Clean first latent frames during training (YAML key ``clean_frames``): with probability ``prob`` a sample
    keeps its first k latent frames clean, k drawn uniformly from ``frames`` (1 = an image); 0 turns it off.
    The default k = 3 matches the 9 frames (1 + 4·2) that ``LVDPipeline.extend`` and ``generate --video``
    continue from by default: with a 4× VAE, enough frames to carry the speed as well as the place."""

    prob: float = 0.0
    frames: list[int] = field(default_factory=lambda: [1, 3])

    def __post_init__(self):
        problems = []
        if not 0.0 <= self.prob <= 1.0:
            problems.append(f"clean_frames.prob={self.prob} must be in [0, 1]")
        if not self.frames or any(not isinstance(k, int) or k < 1 for k in self.frames):
            problems.append(f"clean_frames.frames={self.frames} must be a non-empty list of latent frame counts >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.prob > 0


def num_tokens(latent_shape, patch_size=(1, 1, 1)) -> int:
    """Transformer tokens for latents (…, T, H, W) split into (pt, ph, pw) patches."""
    t, h, w = latent_shape[-3:]
    return (t // patch_size[0]) * (h // patch_size[1]) * (w // patch_size[2])


def flow_shift_mu(cfg: DiffusionConfig, seq_len: int | None = None) -> float:
    """μ of the time shift: ln(shift), or with ``dynamic_shift`` the Flux line through
    (base_seq_len, base_shift) and (max_seq_len, max_shift) at ``seq_len`` tokens."""
    if not cfg.dynamic_shift:
        return math.log(cfg.shift)
    if seq_len is None:
        raise ValueError("diffusion.dynamic_shift needs the token count (seq_len) of the latents")
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq_len - cfg.base_seq_len)
    return cfg.base_shift + slope * (seq_len - cfg.base_seq_len)


def flow_scheduler(cfg: DiffusionConfig) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching scheduler the objective is defined by (and that samples with "euler")."""
    return FlowMatchEulerDiscreteScheduler(**_flow_match_kwargs(cfg))


def ddpm_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The DDPM noise schedule for eps / v training."""
    return DDPMScheduler(**_ddpm_kwargs(cfg))


def _flow_match_kwargs(cfg):
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        shift=cfg.shift,
        use_dynamic_shifting=cfg.dynamic_shift,
        base_shift=cfg.base_shift,
        max_shift=cfg.max_shift,
        base_image_seq_len=cfg.base_seq_len,
        max_image_seq_len=cfg.max_seq_len,
    )


def _ddpm_kwargs(cfg):
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=_PREDICTION_TYPE.get(cfg.objective, "epsilon"),
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        # zero terminal SNR needs sampling to start at t = T (Lin et al. 2024, §3.3)
        timestep_spacing="trailing" if cfg.zero_terminal_snr else "leading",
        clip_sample=False,
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def sample_flow_sigmas(cfg: DiffusionConfig, batch: int, *, seq_len=None, generator=None, device=None) -> torch.Tensor:
    """σ ∈ (0, 1) per sample: logit-normal (or uniform) u, then the time shift of :func:`flow_shift_mu`."""
    from diffusers.training_utils import compute_density_for_timestep_sampling  # heavy import, training only

    device = generator.device if generator is not None else device
    u = compute_density_for_timestep_sampling(
        cfg.timestep_sampling, batch, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
        device=device, generator=generator,
    )  # (B,) in (0, 1)
    mu = flow_shift_mu(cfg, seq_len)
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # = FlowMatchEulerDiscreteScheduler.time_shift(mu, 1, u)


def drop_text(text: TextEmbeddings, uncond: TextEmbeddings, drop: torch.Tensor) -> TextEmbeddings:
    """Rows of ``text`` where ``drop`` (B,) is True replaced by ``uncond`` (1 or B rows, same L and D)."""
    if uncond.states.shape[1:] != text.states.shape[1:] or uncond.pooled.shape[1:] != text.pooled.shape[1:]:
        raise ValueError(
            f"CFG uncond embedding states {tuple(uncond.states.shape)} / pooled {tuple(uncond.pooled.shape)} do not "
            f"match the text {tuple(text.states.shape)} / {tuple(text.pooled.shape)}: encode '' with the same "
            "encoder and max_length"
        )
    uncond = uncond.to(device=text.states.device, dtype=text.states.dtype)
    keep = ~drop.to(text.states.device)
    return TextEmbeddings(
        torch.where(keep[:, None, None], text.states, uncond.states),
        torch.where(keep[:, None], text.mask, uncond.mask),
        torch.where(keep[:, None], text.pooled, uncond.pooled),
    )


class DiffusionObjective:
    """The training objective of one run, built once: noise the latents, predict, MSE against the target.

    ``patch_size`` (the denoiser's (pt, ph, pw)) gives the token count that ``dynamic_shift`` needs;
    each batch's own latent shape is used, so mixed-resolution buckets each get their shift. The
    DDPM schedule of eps / v is built here, once, not on every step.
    """

    def __init__(self, cfg: DiffusionConfig, *, patch_size: tuple[int, int, int] | None = None,
                 clean_frames: CleanFramesConfig | None = None):
        if cfg.objective == "flow" and cfg.dynamic_shift and patch_size is None:
            raise ValueError("diffusion.dynamic_shift needs the denoiser's patch_size (the token count sets the shift)")
        self.cfg = cfg
        self.patch_size = tuple(patch_size) if patch_size is not None else None
        self.scheduler = ddpm_scheduler(cfg) if cfg.objective != "flow" else None
        self.clean_frames = clean_frames if clean_frames is not None and clean_frames.enabled else None
        pt = self.patch_size[0] if self.patch_size is not None else 1
        if self.clean_frames is not None and any(k % pt for k in self.clean_frames.frames):
            raise ValueError(f"clean_frames.frames={self.clean_frames.frames} must be multiples of the denoiser's "
                             f"temporal patch {pt} (a patch is either clean or noisy)")

    def __call__(self, model, latents: torch.Tensor, text: TextEmbeddings, *, uncond: TextEmbeddings | None = None,
                 generator: torch.Generator | None = None):
        """One loss.

        Args:
            model: called as ``model(x_t, timestep, **text.as_dict())``.
            latents: clean latents x₀ (B, C, T, H, W), normalised by the VAE.
            text: the captions' :class:`TextEmbeddings` (B rows).
            uncond: the empty-prompt embedding (1 or B rows) that CFG dropout substitutes; required when
                ``cfg.cfg_dropout > 0``.
            generator: a torch.Generator for dropout, timesteps and noise (reproducible resume).

        Returns ``(loss, metrics)``: a scalar loss and detached scalars ``{"loss", "sigma" or "timestep",
        "cfg_dropped"}`` (averages over the batch).
        """
        cfg = self.cfg
        b, device = latents.shape[0], latents.device
        rand_device = generator.device if generator is not None else device

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=rand_device).to(device)

        # 1. Text, with CFG dropout
        drop = torch.zeros(b, dtype=torch.bool, device=device)
        if cfg.cfg_dropout > 0:
            if uncond is None:
                raise ValueError(
                    "training objective: cfg_dropout > 0 needs uncond=, the empty-prompt embedding (TextEncoder.empty(), "
                    "or encode_text(model, tokenizer, ['']) with the encoder and max_length the latents were cached with)"
                )
            drop = rand(b) < cfg.cfg_dropout
            text = drop_text(text, uncond, drop)

        # 2. Timesteps and noise
        noise = torch.randn(latents.shape, generator=generator, device=rand_device, dtype=latents.dtype).to(device)
        if cfg.objective == "flow":
            seq_len = num_tokens(latents.shape, self.patch_size) if self.patch_size is not None else None
            sigmas = sample_flow_sigmas(cfg, b, seq_len=seq_len, generator=generator).to(device)
            s = sigmas.view(b, 1, 1, 1, 1).to(latents.dtype)
            noisy = (1 - s) * latents + s * noise  # FlowMatchEulerDiscreteScheduler.scale_noise
            target = noise - latents
            timesteps = sigmas * cfg.num_train_timesteps
            metrics = {"sigma": sigmas.mean()}
        else:
            timesteps = (rand(b) * cfg.num_train_timesteps).long().clamp(max=cfg.num_train_timesteps - 1)
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            target = noise if cfg.objective == "eps" else self.scheduler.get_velocity(latents, noise, timesteps)
            metrics = {"timestep": timesteps.float().mean()}

        # 3. Predict and compare
        if self.clean_frames is None:
            pred = model(noisy, timesteps.to(latents.dtype), **text.as_dict())
            loss = F.mse_loss(pred.float(), target.float())
        else:
            clean_frames, clean = self._draw_clean_frames(latents.shape, generator, device)
            noisy = torch.where(clean, latents, noisy)  # clean frames: x_t = x₀, whatever the noise level
            pred = model(noisy, timesteps.to(latents.dtype), **text.as_dict(), clean_frames=clean_frames)
            loss = masked_mse(pred.float(), target.float(), ~clean)
            metrics["clean_frames"] = clean_frames.float().mean()
        metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}, "cfg_dropped": drop.float().mean()}
        return loss, metrics

    def _draw_clean_frames(self, shape, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, k clean latent frames (0 with probability 1 − prob, else drawn from ``frames``): returns k
        (B,) long and the mask of clean frames (B, 1, T, 1, 1) bool."""
        cond, (b, _, t) = self.clean_frames, shape[:3]
        if max(cond.frames) >= t:
            raise ValueError(f"clean_frames.frames={cond.frames}: k={max(cond.frames)} clean latent frames leave no "
                             f"frame to denoise in latents of {t} frames")
        rand_device = generator.device if generator is not None else device
        keep = torch.rand(b, generator=generator, device=rand_device) < cond.prob
        pick = torch.randint(len(cond.frames), (b,), generator=generator, device=rand_device)
        k = torch.where(keep, torch.tensor(cond.frames, device=rand_device)[pick], 0).to(device)  # (B,)
        clean = torch.arange(t, device=device)[None] < k[:, None]  # (B, T)
        return k, clean[:, None, :, None, None]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the elements where ``keep`` (broadcast to ``pred``'s shape) is True."""
    weight = keep.to(pred.dtype).expand_as(pred)
    return ((pred - target).square() * weight).sum() / weight.sum().clamp(min=1)


def training_loss(model, latents: torch.Tensor, text: TextEmbeddings, cfg: DiffusionConfig, *,
                  patch_size: tuple[int, int, int] | None = None, uncond: TextEmbeddings | None = None,
                  generator: torch.Generator | None = None, clean_frames: CleanFramesConfig | None = None):
    """One loss of :class:`DiffusionObjective` for a one-off call; a training loop builds the objective once."""
    objective = DiffusionObjective(cfg, patch_size=patch_size, clean_frames=clean_frames)
    return objective(model, latents, text, uncond=uncond, generator=generator)


# --------------------------------------------------------------------------------------------------
# Sampling and export
# --------------------------------------------------------------------------------------------------


def null_text_embeddings(text_model, tokenizer, batch_size: int = 1, *, max_length: int | None = None) -> TextEmbeddings:
    """The unconditional text input CFG dropout trained with: the empty prompt, ``batch_size`` rows."""
    return encode_text(text_model, tokenizer, [""], max_length=max_length).repeat(batch_size)


def scheduler_config(cfg: DiffusionConfig, *, seq_len: int | None = None) -> dict:
    """The diffusers scheduler config an export writes to ``scheduler/scheduler_config.json``.

    flow → ``FlowMatchEulerDiscreteScheduler`` (the class records the objective); eps / v →
    ``DDIMScheduler`` with ``prediction_type`` "epsilon" / "v_prediction" and the training betas.
    With ``dynamic_shift`` and a ``seq_len`` (the training token count) the shift is resolved to the
    static ``exp(μ)`` there, so a sampler needs no ``mu``; without ``seq_len`` the config keeps
    ``use_dynamic_shifting`` and ``set_timesteps`` must get ``mu=flow_shift_mu(cfg, tokens)``.
    """
    if cfg.objective == "flow":
        kwargs = _flow_match_kwargs(cfg)
        if cfg.dynamic_shift and seq_len is not None:
            kwargs.update(shift=math.exp(flow_shift_mu(cfg, seq_len)), use_dynamic_shifting=False)
        scheduler = FlowMatchEulerDiscreteScheduler(**kwargs)
    else:
        kwargs = _ddpm_kwargs(cfg)
        kwargs.update(set_alpha_to_one=False, steps_offset=0 if cfg.zero_terminal_snr else 1)
        scheduler = DDIMScheduler(**kwargs)
    return {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}


def diffusion_config_from_scheduler(config) -> DiffusionConfig:
    """Recover the objective and schedule from a saved scheduler config (a dict or ``scheduler.config``)."""
    config = dict(config)
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler" or "shift" in config or (
        config.get("prediction_type") == "flow_prediction"
    ):
        shift = config.get("shift", config.get("flow_shift", 1.0))
        return DiffusionConfig(
            objective="flow",
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            shift=float(shift),
            dynamic_shift=bool(config.get("use_dynamic_shifting", False)),
            base_shift=config.get("base_shift", 0.5) or 0.5,
            max_shift=config.get("max_shift", 1.15) or 1.15,
            base_seq_len=config.get("base_image_seq_len", 256),
            max_seq_len=config.get("max_image_seq_len", 4096),
        )
    objective = {v: k for k, v in _PREDICTION_TYPE.items()}.get(config.get("prediction_type", "epsilon"))
    if objective is None:
        raise ValueError(f"scheduler config prediction_type={config.get('prediction_type')!r} is not epsilon / v_prediction")
    return DiffusionConfig(
        objective=objective,
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_schedule=config.get("beta_schedule", "scaled_linear"),
        beta_start=config.get("beta_start", 0.00085),
        beta_end=config.get("beta_end", 0.012),
        zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
    )


def make_sampling_scheduler(sampler: str, cfg: DiffusionConfig):
    """A diffusers scheduler for ``sampler`` that fits the objective of ``cfg``.

    ======  ===================================================  =======================================
    sampler flow                                                 eps / v
    ======  ===================================================  =======================================
    euler   FlowMatchEulerDiscreteScheduler                      EulerDiscreteScheduler
    ddim    refused: DDIM integrates a noise-prediction ODE      DDIMScheduler (eta 0)
    dpm++   DPMSolverMultistep (2M), flow sigmas + flow_shift    DPMSolverMultistepScheduler (2M)
    unipc   UniPCMultistep, flow sigmas + flow_shift             UniPCMultistepScheduler
    ======  ===================================================  =======================================

    With ``dynamic_shift`` the flow schedulers keep ``use_dynamic_shifting``: pass
    ``mu=flow_shift_mu(cfg, tokens)`` to ``set_timesteps``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if cfg.objective == "flow":
        if sampler == "euler":
            return flow_scheduler(cfg)
        if sampler == "ddim":
            raise ValueError(
                "sampler 'ddim' does not fit objective 'flow' (DDIM assumes an eps/v noise-prediction model); "
                "use 'euler', 'dpm++' or 'unipc'"
            )
        flow = dict(
            num_train_timesteps=cfg.num_train_timesteps, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=cfg.shift, use_dynamic_shifting=cfg.dynamic_shift,
        )
        if sampler == "dpm++":
            return DPMSolverMultistepScheduler(**flow, algorithm_type="dpmsolver++", solver_order=2)
        return UniPCMultistepScheduler(**flow)
    common = {k: v for k, v in _ddpm_kwargs(cfg).items() if k != "clip_sample"}
    common["timestep_spacing"] = "trailing"  # start sampling at t = T (matters most with few steps)
    if sampler == "euler":
        return EulerDiscreteScheduler(**common)
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    return UniPCMultistepScheduler(**common)
