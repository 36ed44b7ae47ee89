"""LVDPipeline: prompt → video, as a diffusers ``DiffusionPipeline``.

Components (the folder layout ``save_pretrained`` writes and ``from_pretrained`` reads):
``transformer`` (:class:`lvd.dit.VideoDiT`), ``vae`` (our :class:`lvd.vae.CausalVideoVAE` or a diffusers
``AutoencoderKL*`` video VAE), ``text_encoder`` + ``tokenizer`` (any Hugging Face text model), ``scheduler``
(a diffusers scheduler whose saved config records the training objective).

Sampling is classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) on the model output:
``pred = pred_uncond + w · (pred_cond − pred_uncond)``, both halves in one batch. The unconditional
text is exactly what CFG dropout trained with (:func:`lvd.diffusion.null_text_embeddings`).

The VAE is wrapped by :func:`lvd.vae.as_video_vae` at use time, so latent normalisation stays inside
the VAE and this file never touches a scale or shift.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

# model_index.json names our components by module, e.g. ["lvd.dit.model", "VideoDiT"]; diffusers resolves such
# names only from modules already imported (it never imports what a folder names), which these imports do.
import lvd.dit  # noqa: F401
import lvd.vae  # noqa: F401
from lvd.diffusion import (
    SAMPLERS,
    diffusion_config_from_scheduler,
    flow_shift_mu,
    make_sampling_scheduler,
    null_text_embeddings,
    num_tokens,
)
from lvd.text import TextEmbeddings, TextEncoder, encode_text, load_text_model
from lvd.vae import as_video_vae

__all__ = ["LVDPipeline", "LVDPipelineOutput", "SAMPLERS", "sampler_scheduler", "scheduler_objective"]

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


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


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


@dataclass
class LVDPipelineOutput(BaseOutput):
    """``frames``: "np" (B, T, H, W, 3) float32 in [0, 1]; "pt" (B, T, 3, H, W) float in [0, 1]; "pil" a list of
    B lists of T images; "latent" (B, C', T', H', W'). ``timings``: seconds for "text_encoding", "denoising"
    (total), "denoising_per_step" and "decoding"."""

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]
    timings: dict[str, float] | None = None


def _onload(module: torch.nn.Module) -> None:
    """Fire an accelerate offload hook before calling a method that is not ``forward`` (VAE decode)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


def _tiling_enabled(vae) -> bool:
    """Whether a video VAE decodes in tiles now: ours keeps a ``tiling`` config; a wrapped diffusers VAE
    (``PretrainedVideoVAE.model``) a ``use_tiling`` flag."""
    if hasattr(vae, "tiling"):
        return vae.tiling is not None
    return bool(getattr(getattr(vae, "model", vae), "use_tiling", False))


def _sync(device: torch.device) -> float:
    """Wall clock after queued GPU work has finished (timings would otherwise measure launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------


class LVDPipeline(DiffusionPipeline):
    r"""Text-to-video generation with a latent video DiT.

    Example::

        pipe = LVDPipeline.from_pretrained("lvd/assets/shapes-demo")
        g = torch.Generator().manual_seed(0)
        frames = pipe("a red circle moving right", num_frames=17, height=64, width=64,
                      num_inference_steps=25, guidance_scale=5.0, generator=g).frames   # (1, 17, 64, 64, 3)
        pipe.set_sampler("dpm++")   # swap the sampler; refused if it does not fit the model's objective

    Args:
        transformer: the denoiser, ``forward(latents, timestep, text_states, text_mask, text_pooled)``.
        vae: our ``CausalVideoVAE`` or a diffusers ``AutoencoderKL*`` video VAE (wrapped by ``as_video_vae``).
        text_encoder, tokenizer: a Hugging Face text model and its tokenizer (used through ``encode_text``).
        scheduler: a diffusers scheduler; its config records the objective (see ``scheduler_objective``).
        text_encoder_id: optional name that :meth:`lvd.text.TextEncoder.from_pretrained` resolves offline (a packaged
            encoder such as ``"all-minilm-l6-v2"``, a local folder, or a hub id in the HF cache). When set, the
            folder refers to the encoder instead of holding it: ``save_pretrained`` writes no ``text_encoder/`` and
            ``tokenizer/`` (model_index.json has them as ``[null, null]`` and ``"text_encoder_id"``), and
            ``from_pretrained`` loads them by that name. This keeps the bundled demo small.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer"]  # absent from a folder that names a text_encoder_id
    _callback_tensor_inputs = ["latents", "noise_pred"]
    #: Decode with the VAE's tiling (and one video at a time) when a video has more output voxels
    #: (frames × height × width) than this. 17 × 256 × 256 keeps a decode under ~2 GB for a 4×8 VAE.
    vae_tiling_threshold: int = 17 * 256 * 256

    def __init__(
        self,
        transformer: ModelMixin,
        vae: ModelMixin,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        scheduler: SchedulerMixin,
        text_encoder_id: str | None = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )
        self.register_to_config(text_encoder_id=text_encoder_id)
        self.video_processor = VideoProcessor(vae_scale_factor=self.video_vae.spatial_compression)

    # -- component views -------------------------------------------------------------------------

    @property
    def video_vae(self):
        """The VAE behind the lvd video-VAE interface (normalised latents, ``decode`` → [-1, 1])."""
        return as_video_vae(self.vae)

    @property
    def objective(self) -> str:
        """"flow", "eps" or "v", read from the scheduler config."""
        return scheduler_objective(self.scheduler)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """(pt, ph, pw) of the transformer's patchify, read from its config."""
        config = self.transformer.config
        patch = config.get("patch_size", 1)
        if isinstance(patch, (list, tuple)):
            return tuple(int(p) for p in patch)  # type: ignore[return-value]
        return (int(config.get("patch_size_t", 1) or 1), int(patch), int(patch))

    # diffusers' pipeline properties, read by callbacks
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def set_sampler(self, sampler: str) -> None:
        """Replace the scheduler by the one for ``sampler`` ("euler", "ddim", "dpm++", "unipc") that fits the
        model's objective; ValueError if it does not fit."""
        self.scheduler = sampler_scheduler(self.scheduler, sampler)

    # -- loading and saving ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "LVDPipeline":
        """diffusers' ``from_pretrained``; a folder with a ``text_encoder_id`` gets its text encoder and tokenizer
        from :meth:`lvd.text.TextEncoder.from_pretrained` (unless they are passed in)."""
        folder = Path(pretrained_model_name_or_path)
        index_path = folder / "model_index.json"
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype") or torch.float32
        if index_path.is_file() and not {"text_encoder", "tokenizer"} & set(kwargs):
            text_encoder_id = json.loads(index_path.read_text(encoding="utf-8")).get("text_encoder_id")
            if text_encoder_id:
                encoder = TextEncoder.from_pretrained(text_encoder_id, device="cpu", dtype=dtype)
                encoder.tokenizer.model_max_length = encoder.max_length  # the length training encoded with
                kwargs.update(text_encoder=encoder.model, tokenizer=encoder.tokenizer)
        if "text_encoder" not in kwargs and (folder / "text_encoder" / "config.json").is_file():
            kwargs["text_encoder"] = load_text_model(str(folder / "text_encoder"), dtype=dtype)  # hub kernels off
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """diffusers' ``save_pretrained``; with a ``text_encoder_id`` the text encoder and tokenizer are left out."""
        if not self.config.text_encoder_id:
            return super().save_pretrained(save_directory, *args, **kwargs)
        names = {name: self.config[name] for name in ("text_encoder", "tokenizer")}
        self.register_to_config(text_encoder=(None, None), tokenizer=(None, None))
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.register_to_config(**names)

    # -- component names in model_index.json -----------------------------------------------------

    def register_modules(self, **kwargs) -> None:
        super().register_modules(**kwargs)
        for name, module in kwargs.items():
            self._record_library(name, module)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
        if name in components and "_internal_dict" in self.__dict__:
            self._record_library(name, value)

    def _record_library(self, name: str, module: Any) -> None:
        """Name an lvd component by its full module, ``["lvd.dit.model", "VideoDiT"]``.

        diffusers takes the second-to-last module part for a pipeline folder when ``diffusers.pipelines`` has one
        of that name, and ``diffusers.pipelines.dit`` exists, so it would record ``["dit", "VideoDiT"]`` and then
        fail to load it. Loading resolves the full module from ``sys.modules`` (imported at the top of this file).
        """
        module_name = type(module).__module__
        if module is not None and module_name.startswith("lvd."):
            self.register_to_config(**{name: (module_name, type(module).__name__)})

    # -- 1. inputs -------------------------------------------------------------------------------

    def check_inputs(self, prompt, negative_prompt, num_frames, height, width, num_inference_steps,
                     num_videos_per_prompt, output_type, callback_on_step_end_tensor_inputs) -> None:
        """Validate every argument and raise one ValueError listing all problems."""
        problems = []
        if self.text_encoder is None or self.tokenizer is None:
            problems.append("the pipeline has no text_encoder/tokenizer: pass them to from_pretrained, or save the "
                            "folder with text_encoder_id naming one")
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt) or (
            isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt)
        ):
            problems.append(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if negative_prompt is not None:
            n_prompts = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else 0
            if isinstance(negative_prompt, list):
                if len(negative_prompt) != n_prompts:
                    problems.append(f"negative_prompt has {len(negative_prompt)} entries but prompt has {n_prompts}")
            elif not isinstance(negative_prompt, str):
                problems.append(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            problems.append(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt <= 0:
            problems.append(f"num_videos_per_prompt must be a positive integer, got {num_videos_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            problems.append(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            problems.append(f"callback_on_step_end_tensor_inputs {bad} not in {self._callback_tensor_inputs}")
        problems += self.size_problems(num_frames, height, width)
        if problems:
            raise ValueError("LVDPipeline: " + "; ".join(problems))

    def size_problems(self, num_frames: int, height: int, width: int) -> list[str]:
        """Why (num_frames, height, width) cannot be generated, as messages; [] when it can.

        Frame counts are not rounded: a count the VAE cannot produce is an error that names the nearest
        counts it can (diffusers' "concise error messages rather than silent correction")."""
        problems = []
        vae = self.video_vae
        pt, ph, pw = self.patch_size
        s, tc = vae.spatial_compression, vae.temporal_compression
        for name, value, patch in (("height", height, ph), ("width", width, pw)):
            if not isinstance(value, int) or value <= 0 or value % (s * patch):
                problems.append(
                    f"{name}={value} must be a positive multiple of {s * patch} "
                    f"(VAE spatial factor {s} × transformer patch {patch})"
                )
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % tc:
            below = max(1, (int(num_frames) - 1) // tc * tc + 1) if isinstance(num_frames, int) else 1
            problems.append(
                f"num_frames={num_frames} is not a frame count the VAE produces (1 + {tc}·k); "
                f"nearest: {below} or {below + tc}"
            )
        elif pt > 1 and ((num_frames - 1) // tc + 1) % pt:
            problems.append(
                f"num_frames={num_frames} gives {(num_frames - 1) // tc + 1} latent frames, not a multiple of the "
                f"transformer's temporal patch {pt}"
            )
        if not problems:
            try:
                vae.check_input(num_frames, height, width)
            except ValueError as err:
                problems.append(str(err))
        return problems

    # -- 2. prompts ------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: list[str],
        negative_prompt: list[str] | None,
        do_classifier_free_guidance: bool,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> TextEmbeddings:
        """Text embeddings for the whole denoiser batch, (B, …) or (2B, …) with CFG: [uncond; cond].

        The unconditional half is, for each prompt, the encoded ``negative_prompt`` if given, otherwise the
        empty-prompt embedding CFG dropout trained with (:func:`lvd.diffusion.null_text_embeddings`). So an empty
        prompt "" with no negative prompt gives identical halves: the model's unconditional video.
        """
        device = device or self._execution_device
        dtype = dtype or self.transformer.dtype
        texts = [p for p in prompt for _ in range(num_videos_per_prompt)]  # B = len(prompt) · n
        cond = encode_text(self.text_encoder, self.tokenizer, texts, max_length=max_sequence_length)
        if do_classifier_free_guidance:
            if negative_prompt is not None:
                negatives = [p for p in negative_prompt for _ in range(num_videos_per_prompt)]
                uncond = encode_text(self.text_encoder, self.tokenizer, negatives, max_length=max_sequence_length)
            else:
                uncond = self._null_text(max_sequence_length).repeat(len(texts))
            cond = TextEmbeddings(
                states=torch.cat([uncond.states, cond.states]),  # (2B, L, D)
                mask=torch.cat([uncond.mask, cond.mask]),  # (2B, L)
                pooled=torch.cat([uncond.pooled, cond.pooled]),  # (2B, Dp)
            )
        return TextEmbeddings(
            states=cond.states.to(device=device, dtype=dtype),
            mask=cond.mask.to(device=device, dtype=torch.bool),
            pooled=cond.pooled.to(device=device, dtype=dtype),
        )

    def _null_text(self, max_length: int | None) -> TextEmbeddings:
        """The empty-prompt embedding (1 row), computed once per text encoder, tokenizer, length, device and dtype:
        every call with guidance needs it, and the text model is frozen."""
        param = next(self.text_encoder.parameters())
        key = (id(self.text_encoder), id(self.tokenizer), max_length, param.device, param.dtype)
        cache = self.__dict__.setdefault("_null_text_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = null_text_embeddings(self.text_encoder, self.tokenizer, 1, max_length=max_length)
        return cache[key]

    # -- 4. latents ------------------------------------------------------------------------------

    def prepare_latents(self, batch_size, num_frames, height, width, device, generator, latents=None):
        """Initial noise (B, C', T', H', W') in float32, scaled by the scheduler's ``init_noise_sigma``."""
        shape = (batch_size, *self.video_vae.latent_shape(num_frames, height, width))
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            return latents.to(device=device, dtype=torch.float32)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for a batch of {batch_size} videos; pass one per video")
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    # -- 6. decode -------------------------------------------------------------------------------

    def decode_latents(self, latents: torch.Tensor, vae_tiling: bool | None = None) -> torch.Tensor:
        """Latents (B, C', T', H', W') → video (B, 3, T, H, W) in [-1, 1].

        ``vae_tiling``: True/False forces the VAE's tiled decode on/off; None (auto) turns it on, and decodes one
        video at a time, when a video has more voxels than ``vae_tiling_threshold``."""
        vae = self.video_vae
        _onload(self.vae)
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        t_lat, h_lat, w_lat = latents.shape[2:]
        voxels = ((t_lat - 1) * vae.temporal_compression + 1) * h_lat * w_lat * vae.spatial_compression**2
        tile = voxels > self.vae_tiling_threshold if vae_tiling is None else vae_tiling
        was_tiling = _tiling_enabled(vae)
        if tile and not was_tiling:
            vae.enable_tiling()
        elif vae_tiling is False and was_tiling:
            vae.disable_tiling()
        try:
            if tile and latents.shape[0] > 1:
                return torch.cat([vae.decode(z[None]) for z in latents])  # (B, 3, T, H, W), one video at a time
            return vae.decode(latents)  # (B, 3, T, H, W)
        finally:
            if tile and not was_tiling:
                vae.disable_tiling()
            elif vae_tiling is False and was_tiling:
                vae.enable_tiling()

    # -- __call__ --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 17,
        height: int = 64,
        width: int = 64,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        max_sequence_length: int | None = None,
        vae_tiling: bool | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> LVDPipelineOutput | tuple:
        r"""Generate videos.

        Args:
            prompt: one prompt or a list; "" is allowed (the unconditional video).
            negative_prompt: text to steer away from (replaces the unconditional half of CFG); one or one per prompt.
            num_frames: 1 + k·(VAE temporal factor), e.g. 17. Other counts are refused, never rounded.
            height, width: multiples of (VAE spatial factor × transformer patch size).
            num_inference_steps: denoising steps (> 0).
            guidance_scale: CFG weight w; w ≤ 1 runs the conditional branch only (w = 1 is exactly that).
            num_videos_per_prompt: videos per prompt; the batch is prompt-major.
            generator: a torch.Generator (or one per video) for the initial noise.
            latents: initial noise of shape (B, C', T', H', W') instead of sampling it.
            output_type: "np", "pt", "pil" or "latent" (see :class:`LVDPipelineOutput`).
            max_sequence_length: tokenizer length; default the text encoder's.
            vae_tiling: force tiled VAE decode on/off; None switches it on above ``vae_tiling_threshold``.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each step; may
                return a replacement "latents". Set ``pipe._interrupt = True`` inside it to stop early.
            callback_on_step_end_tensor_inputs: tensors passed in callback_kwargs ("latents", "noise_pred").
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs
        self.check_inputs(prompt, negative_prompt, num_frames, height, width, num_inference_steps,
                          num_videos_per_prompt, output_type, callback_on_step_end_tensor_inputs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        self._guidance_scale = guidance_scale
        self._interrupt = False
        do_cfg = self.do_classifier_free_guidance
        device = self._execution_device
        batch_size = len(prompts) * num_videos_per_prompt
        timings: dict[str, float] = {}

        # 2. Encode prompt(s): (B, …), or (2B, …) = [uncond; cond] with CFG
        start = _sync(device)
        text = self.encode_prompt(prompts, negatives, do_cfg, num_videos_per_prompt, max_sequence_length, device)
        timings["text_encoding"] = _sync(device) - start

        # 3. Prepare timesteps (a dynamically shifted flow schedule needs μ for this video's token count)
        timestep_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", False):
            latent_shape = self.video_vae.latent_shape(num_frames, height, width)
            cfg = diffusion_config_from_scheduler(self.scheduler.config)
            timestep_kwargs["mu"] = flow_shift_mu(cfg, num_tokens(latent_shape, self.patch_size))
        self.scheduler.set_timesteps(num_inference_steps, device=device, **timestep_kwargs)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 4. Prepare latents: (B, C', T', H', W') float32
        latents = self.prepare_latents(batch_size, num_frames, height, width, device, generator, latents)
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator if not isinstance(generator, list) else None

        # 5. Denoising loop with classifier-free guidance
        start = _sync(device)
        model_dtype = self.transformer.dtype
        steps_done = 0
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                model_input = torch.cat([latents, latents]) if do_cfg else latents  # (2B or B, C', T', H', W')
                if hasattr(self.scheduler, "scale_model_input"):
                    model_input = self.scheduler.scale_model_input(model_input, t)
                timestep = t.to(device=device, dtype=torch.float32).expand(model_input.shape[0])  # (2B or B,)
                noise_pred = self.transformer(
                    model_input.to(model_dtype), timestep, text.states, text.mask, text.pooled
                ).float()
                if do_cfg:
                    pred_uncond, pred_cond = noise_pred.chunk(2)
                    noise_pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    scope = {"latents": latents, "noise_pred": noise_pred}
                    callback_kwargs = {k: scope[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                steps_done += 1
                progress_bar.update()
        timings["denoising"] = _sync(device) - start
        timings["denoising_per_step"] = timings["denoising"] / max(steps_done, 1)

        # 6. Decode
        start = _sync(device)
        if output_type == "latent":
            video = latents
        else:
            video = self.decode_latents(latents, vae_tiling)  # (B, 3, T, H, W) in [-1, 1]
            video = self.video_processor.postprocess_video(video.float(), output_type=output_type)
        timings["decoding"] = _sync(device) - start

        # 7. Output
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return LVDPipelineOutput(frames=video, timings=timings)

