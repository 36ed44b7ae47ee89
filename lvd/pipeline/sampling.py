"""The denoising loop: one pure function, :func:`sample`, for every sampler and every caller.

``LVDPipeline.__call__`` runs it, and through the pipeline so do ``python -m lvd.generate``, the training
recipes' sample hooks, :mod:`lvd.eval.shapes` and ``benchmarks/bench_generate.py``. As in k-diffusion's
``sampling.py``, the network knows nothing of diffusion: :func:`sample` takes a ``denoise_fn(x, t, text)``
that returns the model's raw prediction (velocity for flow, ε or v for DDPM objectives; the objective is
the scheduler's business), and a diffusers scheduler that turns predictions into steps. One signature
serves every sampler ("euler", "ddim", "dpm++", "unipc"; :func:`sampler_scheduler` builds them).

Step ``i`` at timestep ``t_i``, with classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) of
weight ``w`` on the model output, both halves in one batch of 2B::

    [p_u; p_c] = denoise_fn([x_i; x_i], [t_i; t_i], [uncond; cond])
    p̂          = p_u + w · (p_c − p_u)                 (w ≤ 1: p̂ = denoise_fn(x_i, t_i, cond), one batch of B)
    x_{i+1}    = scheduler.step(p̂, t_i, x_i)

Clean first frames (image-to-video, continuation): with ``clean_latents`` (the first k latent frames, given),
``x_i[:, :, :k]`` is set to them before every model call (after the scheduler's input scaling, so the model
sees exactly the clean latents it was trained with) and after every step, for every sampler, and the
denoiser is told k (``denoise_fn(x, t, text, clean_frames=k)``). The loop stays one pure function.

For rectified flow the Euler step is ``x_{i+1} = x_i + (σ_{i+1} − σ_i) · p̂`` with ``t = 1000 σ``; DDIM,
DPM-Solver++(2M) and UniPC are the diffusers schedulers' own updates. ``uncond`` is exactly what CFG
dropout trained with (:func:`lvd.diffusion.null_text_embeddings`) unless a negative prompt replaces it.
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from lvd.diffusion import (
    diffusion_config_from_scheduler,
    flow_shift_mu,
    make_sampling_scheduler,
    num_tokens,
)
from lvd.text_embeddings import TextEmbeddings

__all__ = ["DenoiseFn", "StepCallback", "dynamic_shift_mu", "sample", "sampler_scheduler", "scheduler_objective",
           "transformer_denoiser"]

#: ``denoise_fn(x (N, C, T, H, W) float32, timestep (N,) float32 in [0, 1000], text with N rows) -> (N, C, T, H, W)``;
#: with clean latent frames it is also given ``clean_frames=k`` (a keyword, only then).
DenoiseFn = Callable[..., torch.Tensor]
#: ``callback(i, t, state) -> dict | None`` after step i; see :func:`sample`.
StepCallback = Callable[[int, torch.Tensor, dict], "dict | None"]


# --------------------------------------------------------------------------------------------------
# Samplers: the objective is read from the saved scheduler config (lvd.diffusion owns the table)
# --------------------------------------------------------------------------------------------------


def scheduler_objective(scheduler: SchedulerMixin) -> str:
    """The objective ("flow", "eps" or "v") a scheduler's config records, e.g. ``scheduler/scheduler_config.json``."""
    return diffusion_config_from_scheduler(scheduler.config).objective


def sampler_scheduler(scheduler: SchedulerMixin, sampler: str) -> SchedulerMixin:
    """A new scheduler for ``sampler`` ("euler", "ddim", "dpm++", "unipc") that fits the objective and noise
    schedule recorded in ``scheduler``'s config (see :func:`lvd.diffusion.make_sampling_scheduler` for the
    table). ValueError when the sampler is unknown or does not fit (ddim on a flow model)."""
    return make_sampling_scheduler(sampler, diffusion_config_from_scheduler(scheduler.config))


def dynamic_shift_mu(scheduler: SchedulerMixin, latent_shape, patch_size=(1, 1, 1)) -> float | None:
    """μ for a flow schedule with ``use_dynamic_shifting`` (it grows with the token count of latents
    ``(…, T', H', W')`` cut into ``patch_size`` patches, see :func:`lvd.diffusion.flow_shift_mu`); None for
    every other schedule."""
    if not scheduler.config.get("use_dynamic_shifting", False):
        return None
    cfg = diffusion_config_from_scheduler(scheduler.config)
    return flow_shift_mu(cfg, num_tokens(latent_shape, patch_size))


def transformer_denoiser(transformer: torch.nn.Module) -> DenoiseFn:
    """The ``denoise_fn`` of a :class:`lvd.dit.VideoDiT` (or any model called as ``model(x, t, states, mask,
    pooled)``): the latents go in the model's dtype, the prediction comes back as float32. ``clean_frames`` goes
    to a model built with ``clean_frame_conditioning`` and is left out for any other (such a model was never told
    which frames are clean; the sampler still keeps them clean)."""
    dtype = next(transformer.parameters()).dtype
    takes_clean = bool(getattr(transformer, "config", {}).get("clean_frame_conditioning", False))

    def denoise(x: torch.Tensor, timestep: torch.Tensor, text: TextEmbeddings, clean_frames: int = 0) -> torch.Tensor:
        extra = {"clean_frames": clean_frames} if clean_frames and takes_clean else {}
        return transformer(x.to(dtype), timestep, text.states, text.mask, text.pooled, **extra).float()

    return denoise


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _clean_prefix(clean_latents: torch.Tensor | None, latents: torch.Tensor):
    """``(k, keep_clean)``: the clean latent frame count and a function that writes the clean frames into
    latents of B or 2B (CFG) rows; the identity when there are none."""
    k = 0 if clean_latents is None else clean_latents.shape[2]
    if clean_latents is not None and (clean_latents.ndim != 5 or not 0 < k < latents.shape[2]
                                      or clean_latents.shape[0] not in (1, latents.shape[0])
                                      or clean_latents.shape[3:] != latents.shape[3:]
                                      or clean_latents.shape[1] != latents.shape[1]):
        raise ValueError(f"sample: clean_latents {tuple(clean_latents.shape)} must be (B or 1, C', k, H', W') with "
                         f"0 < k < T' for latents {tuple(latents.shape)}")

    def keep_clean(x: torch.Tensor) -> torch.Tensor:
        if not k:
            return x
        prefix = clean_latents.to(x)
        prefix = prefix.repeat(x.shape[0] // prefix.shape[0], 1, 1, 1, 1)  # (1 or B rows) → the B or 2B of x
        return torch.cat([prefix, x[:, :, k:]], dim=2)

    return k, keep_clean


def sample(
    denoise_fn: DenoiseFn,
    latents: torch.Tensor,
    scheduler: SchedulerMixin,
    *,
    cond: TextEmbeddings,
    uncond: TextEmbeddings | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    mu: float | None = None,
    callback: StepCallback | None = None,
    clean_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` (B, C', T', H', W') float32 from the scheduler's first timestep to its last.

    Args:
        denoise_fn: the network, see :data:`DenoiseFn` (:func:`transformer_denoiser` wraps a VideoDiT).
        latents: the initial noise, already scaled by the scheduler's ``init_noise_sigma``.
        scheduler: any diffusers scheduler; it is copied, so the caller's one is left as it was.
        cond, uncond: text for the conditional and unconditional branch, B rows each (same L and D).
        guidance_scale: w; above 1 runs [uncond; cond] as one batch of 2B and needs ``uncond``.
        num_inference_steps: passed to ``scheduler.set_timesteps``.
        generator: for stochastic scheduler steps (a list of per-video generators is not passed on).
        mu: the time shift of a dynamically shifted flow schedule (:func:`dynamic_shift_mu`); required there.
        callback: ``callback(i, t, state)`` after step i with ``state = {"latents", "noise_pred",
            "num_timesteps"}``; it may return a dict with ``"latents"`` (replaces the latents),
            ``"guidance_scale"`` (w for the following steps) and ``"interrupt"`` (True stops after this step).
        clean_latents: (B or 1, C', k, H', W'), the first k latent frames, kept exactly (see the module docstring);
            ``denoise_fn`` then gets ``clean_frames=k``. k must be below T'.

    Returns the denoised latents (B, C', T', H', W') float32; with ``clean_latents`` the first k frames are them.
    """
    k, keep_clean = _clean_prefix(clean_latents, latents)
    if guidance_scale > 1 and uncond is None:
        raise ValueError(f"sample: guidance_scale={guidance_scale} > 1 needs uncond (the unconditional text)")
    if scheduler.config.get("use_dynamic_shifting", False) and mu is None:
        raise ValueError("sample: the scheduler shifts its schedule by the token count; pass mu=dynamic_shift_mu(…)")
    scheduler = copy.deepcopy(scheduler)  # set_timesteps and step keep state: leave the caller's scheduler alone
    scheduler.set_timesteps(num_inference_steps, device=latents.device, **({} if mu is None else {"mu": mu}))
    timesteps = scheduler.timesteps
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator if not isinstance(generator, list) else None
    both = TextEmbeddings.cat([uncond, cond]) if uncond is not None else None  # (2B, …) = [uncond; cond]
    clean_kwargs = {"clean_frames": k} if k else {}
    latents = keep_clean(latents)

    for i, t in enumerate(timesteps):
        guided = guidance_scale > 1
        if guided and both is None:
            raise ValueError(f"sample: step {i} has guidance_scale={guidance_scale} > 1 but no uncond was given")
        model_input = torch.cat([latents, latents]) if guided else latents  # (2B or B, C', T', H', W')
        if hasattr(scheduler, "scale_model_input"):
            model_input = keep_clean(scheduler.scale_model_input(model_input, t))
        timestep = t.to(device=latents.device, dtype=torch.float32).expand(model_input.shape[0])  # (2B or B,)
        noise_pred = denoise_fn(model_input, timestep, both if guided else cond, **clean_kwargs)
        if guided:
            pred_uncond, pred_cond = noise_pred.chunk(2)
            noise_pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        latents = keep_clean(scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0])

        if callback is not None:
            state = {"latents": latents, "noise_pred": noise_pred, "num_timesteps": len(timesteps)}
            update = callback(i, t, state) or {}
            latents = keep_clean(update.get("latents", latents))
            guidance_scale = update.get("guidance_scale", guidance_scale)
            if update.get("interrupt", False):
                break
    return latents
