"""LVDPipeline: prompt → video, as a diffusers ``DiffusionPipeline``.

Components (the folder layout ``save_pretrained`` writes and ``from_pretrained`` reads):
``transformer`` (:class:`lvd.dit.VideoDiT`), ``vae`` (our :class:`lvd.vae.CausalVideoVAE` or a diffusers
``AutoencoderKL*`` video VAE), ``text_encoder`` + ``tokenizer`` (any Hugging Face text model), ``scheduler``
(a diffusers scheduler whose saved config records the training objective). Generation from a prompt needs all
five, so none is one of diffusers' ``_optional_components`` (a component the pipeline runs without) and a folder
holds each, or names its text encoder by ``text_encoder_id``. An object built in code may leave some out: with
only the text encoder and tokenizer it encodes prompts; without them it generates from ``prompt_embeds``; without
a VAE it returns latents (``from_pretrained(folder, vae=None)`` loads a folder without one, as in diffusers).

The denoising loop is :func:`lvd.pipeline.sampling.sample` (classifier-free guidance, Ho & Salimans 2022,
arXiv:2207.12598, ``pred = pred_uncond + w · (pred_cond − pred_uncond)`` with both halves in one batch). The
unconditional text is exactly what CFG dropout trained with (:func:`lvd.diffusion.null_text_embeddings`).

:meth:`LVDPipeline.from_components` builds a pipeline from models or their folders and a scheduler or the
training objective; :func:`export_pipeline` writes one as a folder (both from :mod:`lvd.pipeline.assembly`). The
training recipes use both.

The VAE is wrapped once by :func:`lvd.vae.as_video_vae`, so latent normalisation stays inside the VAE and this
file never touches a scale or shift.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

# model_index.json names our components by module, e.g. ["lvd.dit.model", "VideoDiT"]; diffusers resolves such
# names only from modules already imported (it never imports what a folder names), which these imports do.
import lvd.dit  # noqa: F401
import lvd.vae  # noqa: F401
from lvd.pipeline.assembly import load_components, load_text_encoder
from lvd.pipeline.clean_frames import CleanFramesMixin
from lvd.pipeline.parallel import ParallelMixin
from lvd.pipeline.lora import LVDLoraLoaderMixin
from lvd.pipeline.output import LVDPipelineOutput, PromptEmbeds, onload, returns_prompt_embeds
from lvd.diffusion import DiffusionConfig, null_text_embeddings
from lvd.pipeline.checks import EMBEDDING_ARGS, OUTPUT_TYPES, clean_frame_problems, prompt_problems, size_problems
from lvd.pipeline.sampling import dynamic_shift_mu, sample, sampler_scheduler, scheduler_objective
from lvd.text_embeddings import TextEmbeddings
from lvd.text import encode_text, load_text_model, recorded_text_encoder
from lvd.vae import VideoVAE, as_video_vae

__all__ = ["LVDPipeline"]

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# diffusers' from_pretrained reports each component it loads here ("Loaded vae as ... subfolder of ..."); the text
# encoder, which LVDPipeline.from_pretrained loads itself, is reported in the same place
_loading_log = logging.get_logger("diffusers.pipelines.pipeline_utils")


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> float:
    """Wall clock after queued GPU work has finished (timings would otherwise measure launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------


class LVDPipeline(DiffusionPipeline, LVDLoraLoaderMixin, CleanFramesMixin, ParallelMixin):
    r"""Text-to-video generation with a latent video DiT; image-to-video and continuation from clean first frames
    (``image=``, ``video=``, :meth:`extend`; :mod:`lvd.pipeline.clean_frames`).

    Example::

        pipe = LVDPipeline.from_pretrained("lvd/assets/shapes-demo")
        g = torch.Generator().manual_seed(0)
        frames = pipe("a red circle moving right", num_frames=17, height=64, width=64,
                      num_inference_steps=25, guidance_scale=5.0, generator=g).frames   # (1, 17, 64, 64, 3)
        pipe.set_sampler("dpm++")   # swap the sampler; refused if it does not fit the model's objective

        embeds = pipe.encode_prompt("a red circle moving right")   # PromptEmbeds: __call__'s text arguments
        frames = pipe(**embeds, generator=g).frames                 # the same video as the prompt gives

        pipe.load_lora_weights("runs/orange/export/lora", adapter_name="orange")   # diffusers' LoRA API
        pipe.set_adapters(["orange"], [0.8])
        pipe.fuse_lora(lora_scale=0.8); pipe.unfuse_lora()   # unfuse restores the base weights bit for bit

        frames = pipe("a red circle moving right", image=PIL.Image.open("first.png")).frames   # starts at the image
        longer = pipe.extend(frames[0], "a red circle moving right", num_frames=33).frames     # (1, 33, H, W, 3)

        # under torchrun, after init_process_group: tokens over 2 processes, CFG's branches over 2 (world 4)
        pipe.enable_parallelism(ulysses_degree=2, cfg_parallel=True)   # lvd.pipeline.parallel

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
    All five components are required arguments, as diffusers declares the components a pipeline cannot generate
    without; each may be given as None (``__call__`` and ``encode_prompt`` say which ones they need).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    # generation needs every component (the text encoder too: prompts and the empty prompt of CFG), so none is
    # optional in diffusers' sense; a folder with a text_encoder_id names its encoder instead of holding it
    _optional_components = []
    _callback_tensor_inputs = ["latents", "noise_pred"]
    #: Decode with the VAE's tiling (and one video at a time) when a video has more output voxels
    #: (frames × height × width) than this. 17 × 256 × 256 keeps a decode under ~2 GB for a 4×8 VAE.
    vae_tiling_threshold: int = 17 * 256 * 256

    def __init__(
        self,
        transformer: ModelMixin | None,
        vae: ModelMixin | None,
        text_encoder: torch.nn.Module | None,
        tokenizer: Any,
        scheduler: SchedulerMixin | None,
        text_encoder_id: str | None = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )
        self.register_to_config(text_encoder_id=text_encoder_id)
        # the scale factor matters only to VideoProcessor.preprocess (never called here); 8 is its default
        scale = self.video_vae.spatial_compression if self.video_vae is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=scale)

    @classmethod
    def from_components(cls, *, transformer, vae=None, scheduler=None, diffusion: DiffusionConfig | None = None,
                        seq_len: int | None = None, text_encoder=None, tokenizer=None,
                        text_encoder_id: str | None = None, text_max_length: int | None = None) -> "LVDPipeline":
        """A pipeline from models, or from the folders and names they were saved under: ``transformer`` (a VideoDiT
        or its folder), ``vae`` (a module, preset or folder), ``scheduler`` (or its folder) or ``diffusion`` (the
        training objective, with ``seq_len`` training tokens), and ``text_encoder`` + ``tokenizer`` (or
        ``text_encoder`` as a name, at ``text_max_length`` tokens) or ``text_encoder_id``. See
        :func:`lvd.pipeline.assembly.load_components` for each argument."""
        return cls(**load_components(
            transformer=transformer, vae=vae, scheduler=scheduler, diffusion=diffusion, seq_len=seq_len,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_id=text_encoder_id,
            text_max_length=text_max_length,
        ))

    # -- component views -------------------------------------------------------------------------

    @property
    def video_vae(self) -> VideoVAE | None:
        """The VAE behind the lvd video-VAE interface (normalised latents, ``decode`` → [-1, 1]); None without a
        VAE. Built once per VAE module: registering another ``vae`` builds a new one."""
        vae = getattr(self, "vae", None)
        cached = self.__dict__.get("_video_vae")
        if cached is None or cached[0] is not vae:
            cached = (vae, None if vae is None else as_video_vae(vae))
            self.__dict__["_video_vae"] = cached
        return cached[1]

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

    # -- options diffusers pipelines offer that mean nothing here ----------------------------------

    def set_attention_slice(self, slice_size: str | int | None) -> None:
        """Refused (``enable_attention_slicing``): lvd.kernels.attention's fused backends (flash / SDPA / xformers)
        never hold the whole score matrix, so there is nothing to slice. None (``disable_…``) does nothing."""
        if slice_size is not None:
            raise NotImplementedError("LVDPipeline has no attention slicing (its attention kernels do not hold the "
                                      "score matrix); to use less memory: vae_tiling=True, enable_model_cpu_offload(), "
                                      "or fewer videos per call")

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Callable | None = None) -> None:
        """Refused (``enable_xformers_memory_efficient_attention``): lvd.kernels.dispatch picks the attention
        backend by device and measured speed, xformers included. False (``disable_…``) does nothing."""
        if valid:
            raise NotImplementedError("LVDPipeline picks its attention backend in lvd.kernels.dispatch (Triton / SDPA "
                                      "/ xformers by device and measured speed); LVD_KERNELS=xformers forces xformers")

    # -- loading and saving ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "LVDPipeline":
        """diffusers' ``from_pretrained``. The text encoder is loaded here, with Hugging Face hub kernels off
        (:func:`lvd.text.load_text_model`), as diffusers loads every other component: at the dtype ``dtype`` gives it
        (a dict's ``"text_encoder"`` entry, else its ``"default"``) and from ``model.<variant>.safetensors`` when
        ``variant`` is given and ``text_encoder/`` holds that variant. A folder with a ``text_encoder_id`` gets its
        text encoder and tokenizer from :meth:`lvd.text.TextEncoder.from_pretrained` instead (unless they are passed
        in), at that dtype; a variant names files of the folder, so it does not apply to them.

        The folder's recorded id may name only a packaged encoder, a folder inside the model folder or a hub id
        in the local cache (:func:`lvd.text.recorded_text_encoder`); ``text_encoder_id=`` given here is the
        caller's own choice and may be any name or path."""
        folder = Path(pretrained_model_name_or_path)
        index_path = folder / "model_index.json"
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype") or torch.float32
        if isinstance(dtype, dict):  # one per component, as diffusers reads it
            dtype = dtype.get("text_encoder", dtype.get("default", torch.float32))
        if index_path.is_file() and not {"text_encoder", "tokenizer"} & set(kwargs):
            text_encoder_id = kwargs.get("text_encoder_id")
            if not text_encoder_id:
                recorded = json.loads(index_path.read_text(encoding="utf-8")).get("text_encoder_id")
                text_encoder_id = recorded and recorded_text_encoder(recorded, folder)
            if text_encoder_id:
                text_model, tokenizer = load_text_encoder(text_encoder_id, dtype=dtype)
                kwargs.update(text_encoder=text_model, tokenizer=tokenizer)
                _loading_log.info(f"Loaded text_encoder as {type(text_model).__name__} and tokenizer as "
                                  f"{type(tokenizer).__name__} from text_encoder_id {text_encoder_id!r}.")
        if "text_encoder" not in kwargs and (folder / "text_encoder" / "config.json").is_file():
            variant = kwargs.get("variant")
            # as diffusers: a component whose folder lacks the variant loads its plain weights
            if variant is not None and not any((folder / "text_encoder").glob(f"*.{variant}*")):
                variant = None
            kwargs["text_encoder"] = load_text_model(str(folder / "text_encoder"), dtype=dtype, variant=variant)
            _loading_log.info(f"Loaded text_encoder as {type(kwargs['text_encoder']).__name__} from `text_encoder` "
                              f"subfolder of {pretrained_model_name_or_path}.")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """diffusers' ``save_pretrained``; with a ``text_encoder_id`` the text encoder and tokenizer are left out."""
        if not self.config.text_encoder_id:
            return super().save_pretrained(save_directory, *args, **kwargs)
        names = {name: self.config[name] for name in ("text_encoder", "tokenizer")}
        self.register_to_config(text_encoder=(None, None), tokenizer=(None, None))
        # diffusers' save_pretrained skips exactly the optional components recorded as (None, None): for this save,
        # the two the folder refers to by text_encoder_id are optional
        self._optional_components = ["text_encoder", "tokenizer"]
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del self._optional_components
            self.register_to_config(**names)

    # -- component names in model_index.json -----------------------------------------------------

    def register_modules(self, **kwargs) -> None:
        super().register_modules(**kwargs)
        for name, module in kwargs.items():
            self._record_library(name, module)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in COMPONENTS and "_internal_dict" in self.__dict__:
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
                     num_videos_per_prompt, output_type, callback_on_step_end_tensor_inputs, guidance_scale=1.0,
                     latents=None, embeds: dict | None = None, clean: tuple[str, tuple] | None = None) -> None:
        """Validate every argument and raise one ValueError listing all problems. ``embeds`` holds the given
        ``prompt_embeds``-style arguments by their diffusers names (:data:`EMBEDDING_ARGS`); ``clean`` is
        ("image" or "video", (T, H, W)) of the given first frames."""
        problems = self.prompt_problems(prompt, negative_prompt, guidance_scale, embeds or {})
        if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            problems.append(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt <= 0:
            problems.append(f"num_videos_per_prompt must be a positive integer, got {num_videos_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            problems.append(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            problems.append(f"callback_on_step_end_tensor_inputs {bad} not in {self._callback_tensor_inputs}")
        for name in ("transformer", "scheduler"):
            if getattr(self, name, None) is None:
                problems.append(f"the pipeline has no {name}: it can encode prompts but not generate")
        if self.vae is None:
            if output_type != "latent":
                problems.append(f"the pipeline has no vae to decode with: use output_type='latent', not {output_type!r}")
            if latents is None:
                problems.append("the pipeline has no vae to size the latents: pass latents= (B, C', T', H', W')")
        elif self.transformer is not None:
            problems += self.size_problems(num_frames, height, width)
        if clean is not None and self.transformer is not None:
            problems += clean_frame_problems(clean[0], clean[1], self.video_vae, self.patch_size[0], num_frames,
                                             height, width)
        if problems:
            raise ValueError("LVDPipeline: " + "; ".join(problems))

    def prompt_problems(self, prompt, negative_prompt, guidance_scale, embeds: dict) -> list[str]:
        """Why the text arguments cannot be used, as messages (:func:`lvd.pipeline.checks.prompt_problems`)."""
        return prompt_problems(prompt, negative_prompt, guidance_scale, embeds,
                               has_text_model=self.text_encoder is not None and self.tokenizer is not None)

    def size_problems(self, num_frames: int, height: int, width: int) -> list[str]:
        """Why (num_frames, height, width) cannot be generated, as messages; [] when it can
        (:func:`lvd.pipeline.checks.size_problems`)."""
        return size_problems(self.video_vae, self.patch_size, num_frames, height, width)

    # -- 2. prompts ------------------------------------------------------------------------------

    @returns_prompt_embeds
    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> PromptEmbeds:
        """The text arguments of ``__call__`` for ``prompt``, by their names there (:class:`PromptEmbeds`):
        ``pipe(**pipe.encode_prompt(p, n), ...)`` gives the same video as ``pipe(p, n, ...)``. Needs only the text
        encoder and tokenizer.

        B = len(prompt) · num_videos_per_prompt rows each (prompt-major). The negative (unconditional) rows are,
        for each prompt, the encoded ``negative_prompt`` if given (one string for all, or one per prompt),
        otherwise the empty-prompt embedding CFG dropout trained with (:func:`lvd.diffusion.null_text_embeddings`),
        so "" with no negative prompt gives equal halves; without classifier-free guidance they are None.
        """
        cond, uncond = self._encode_text(prompt, negative_prompt, do_classifier_free_guidance, num_videos_per_prompt,
                                         max_sequence_length, device, dtype)
        prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = cond.states, cond.mask, cond.pooled
        negative_prompt_embeds = negative_prompt_attention_mask = negative_pooled_prompt_embeds = None
        if uncond is not None:
            negative_prompt_embeds, negative_prompt_attention_mask = uncond.states, uncond.mask
            negative_pooled_prompt_embeds = uncond.pooled
        return (prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, negative_prompt_embeds,
                negative_prompt_attention_mask, negative_pooled_prompt_embeds)

    def _encode_text(self, prompt, negative_prompt, do_classifier_free_guidance: bool, num_videos_per_prompt: int,
                     max_sequence_length: int | None, device, dtype) -> tuple[TextEmbeddings, TextEmbeddings | None]:
        """``(cond, uncond)`` as :meth:`encode_prompt` describes them; ``uncond`` is None without guidance."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        device = device or self._execution_device
        dtype = dtype or (self.transformer.dtype if self.transformer is not None else self.text_encoder.dtype)
        texts = [p for p in prompts for _ in range(num_videos_per_prompt)]  # B = len(prompts) · n
        cond = encode_text(self.text_encoder, self.tokenizer, texts, max_length=max_sequence_length)
        uncond = None
        if do_classifier_free_guidance:
            if negatives is not None:
                negatives = [p for p in negatives for _ in range(num_videos_per_prompt)]
                uncond = encode_text(self.text_encoder, self.tokenizer, negatives, max_length=max_sequence_length)
            else:
                uncond = self._null_text(max_sequence_length).repeat(len(texts))
        return cond.to(device, dtype), None if uncond is None else uncond.to(device, dtype)

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

    def _call_text(self, prompt, negative_prompt, embeds: dict, guidance: bool, num_videos_per_prompt: int,
                   max_sequence_length: int | None, device) -> tuple[TextEmbeddings, TextEmbeddings | None]:
        """``(cond, uncond)`` for ``__call__`` from prompts and/or given embeddings (checked by ``check_inputs``)."""
        dtype = self.transformer.dtype

        def given(text_name: str) -> TextEmbeddings | None:
            states, mask, pooled = (embeds.get(k) for k in EMBEDDING_ARGS[text_name])
            if states is None:
                return None
            return TextEmbeddings(states, mask.bool(), pooled).repeat(num_videos_per_prompt).to(device, dtype)

        cond, uncond = given("prompt"), given("negative_prompt") if guidance else None
        if cond is None:  # prompt text, and the negative text or the empty prompt where no embedding stands in
            cond, encoded = self._encode_text(prompt, negative_prompt, guidance and uncond is None,
                                              num_videos_per_prompt, max_sequence_length, device, dtype)
            uncond = encoded if uncond is None else uncond
        elif guidance and uncond is None and negative_prompt is not None:
            rows = len(cond) // num_videos_per_prompt
            negatives = [negative_prompt] * rows if isinstance(negative_prompt, str) else negative_prompt
            uncond = self._encode_text(negatives, None, False, num_videos_per_prompt, max_sequence_length, device,
                                       dtype)[0]
        elif guidance and uncond is None:  # the empty prompt CFG dropout trained with
            uncond = self._null_text(max_sequence_length).repeat(len(cond)).to(device, dtype)
        if uncond is not None and (uncond.states.shape != cond.states.shape or uncond.pooled.shape != cond.pooled.shape):
            raise ValueError(
                f"LVDPipeline: the unconditional text {tuple(uncond.states.shape)} / pooled {tuple(uncond.pooled.shape)} "
                f"does not match the prompt's {tuple(cond.states.shape)} / {tuple(cond.pooled.shape)}: give "
                "negative_prompt_embeds of the same shape, or max_sequence_length to match"
            )
        return cond, uncond

    # -- 3. latents ------------------------------------------------------------------------------

    def prepare_latents(self, batch_size, num_frames, height, width, device, generator, latents=None):
        """Initial noise (B, C', T', H', W') in float32, scaled by the scheduler's ``init_noise_sigma``; given
        ``latents`` are used as they are (without a VAE, only their batch, channels and patch fit are checked)."""
        if self.video_vae is None:
            c, (pt, ph, pw) = self.transformer.config.get("in_channels"), self.patch_size
            shape = tuple(latents.shape)
            if len(shape) != 5 or shape[0] != batch_size or (c and shape[1] != c) or shape[2] % pt or shape[3] % ph \
                    or shape[4] % pw:
                raise ValueError(f"latents have shape {shape}, expected ({batch_size}, {c}, T', H', W') with T', H', "
                                 f"W' multiples of the transformer patch {(pt, ph, pw)}")
            return latents.to(device=device, dtype=torch.float32)
        shape = (batch_size, *self.video_vae.latent_shape(num_frames, height, width))
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            return latents.to(device=device, dtype=torch.float32)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for a batch of {batch_size} videos; pass one per video")
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    # -- 5. decode -------------------------------------------------------------------------------

    def decode_latents(self, latents: torch.Tensor, vae_tiling: bool | None = None) -> torch.Tensor:
        """Latents (B, C', T', H', W') → video (B, 3, T, H, W) in [-1, 1].

        ``vae_tiling``: True/False forces the VAE's tiled decode on/off; None (auto) turns it on, and decodes one
        video at a time, when a video has more voxels than ``vae_tiling_threshold``."""
        vae = self.video_vae
        onload(self.vae)
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        t_lat, h_lat, w_lat = latents.shape[2:]
        voxels = vae.frames_for(t_lat) * h_lat * w_lat * vae.spatial_compression**2
        tile = voxels > self.vae_tiling_threshold if vae_tiling is None else vae_tiling
        was_tiling = vae.tiling_enabled
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

    def _denoise(self, latents, cond, uncond, num_inference_steps, generator, callback_on_step_end,
                 tensor_inputs, clean_latents=None) -> tuple[torch.Tensor, int]:
        """Run :func:`lvd.pipeline.sampling.sample` with the progress bar and ``callback_on_step_end`` (which may replace the
        latents, change the guidance scale or interrupt); returns the latents and the steps taken."""
        steps_done = 0
        with self.progress_bar(total=num_inference_steps) as progress_bar:

            def on_step(i: int, t: torch.Tensor, state: dict) -> dict:
                nonlocal steps_done
                self._num_timesteps, update = state["num_timesteps"], {}
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {k: state[k] for k in tensor_inputs}) or {}
                    update = {"latents": outputs["latents"]} if "latents" in outputs else {}
                    self._guidance_scale = outputs.get("guidance_scale", self._guidance_scale)
                steps_done += 1
                progress_bar.update()
                return {**update, "guidance_scale": self._guidance_scale, "interrupt": self._interrupt}

            latents = sample(self._denoiser(), latents, self.scheduler, cond=cond, uncond=uncond,
                             guidance_scale=self._guidance_scale, num_inference_steps=num_inference_steps,
                             generator=generator, mu=dynamic_shift_mu(self.scheduler, latents.shape, self.patch_size),
                             callback=on_step, clean_latents=clean_latents)
        return latents, steps_done

    # -- __call__ --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 17,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        max_sequence_length: int | None = None,
        vae_tiling: bool | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        image: Any = None,
        video: Any = None,
    ) -> LVDPipelineOutput | tuple:
        r"""Generate videos.

        Args:
            prompt: one prompt or a list; "" is allowed (the unconditional video). Or give ``prompt_embeds``.
            negative_prompt: text to steer away from (replaces the unconditional half of CFG); one or one per prompt.
            num_frames: 1 + k·(VAE temporal factor), e.g. 17. Other counts are refused, never rounded.
            height, width: multiples of (VAE spatial factor × transformer patch size); default 64, or the size of
                ``image`` / ``video``, which must match them when they are given.
            num_inference_steps: denoising steps (> 0).
            guidance_scale: CFG weight w; w ≤ 1 runs the conditional branch only (w = 1 is exactly that).
            num_videos_per_prompt: videos per prompt; the batch is prompt-major.
            generator: a torch.Generator (or one per video) for the initial noise.
            latents: initial noise of shape (B, C', T', H', W') instead of sampling it (required without a VAE).
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds: the text as :meth:`encode_prompt` gives it
                (states (P, L, D), mask (P, L) True = real token, pooled (P, D_pooled)), instead of ``prompt``.
            negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds: the same for the
                unconditional half, instead of ``negative_prompt`` or the empty prompt.
            output_type: "np", "pt", "pil" or "latent" (see :class:`LVDPipelineOutput`); "latent" without a VAE.
            max_sequence_length: tokenizer length; default the text encoder's.
            vae_tiling: force tiled VAE decode on/off; None switches it on above ``vae_tiling_threshold``.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each step; may
                return a replacement "latents" and a "guidance_scale" for the following steps (or set
                ``pipe._guidance_scale``; raising it above 1 needs CFG from the start). Set
                ``pipe._interrupt = True`` inside it to stop early.
            callback_on_step_end_tensor_inputs: tensors passed in callback_kwargs ("latents", "noise_pred").
            image: the first frame (PIL, (H, W, 3) uint8 / [0, 1] array, or (3, H, W) tensor in [−1, 1]; see
                :mod:`lvd.pipeline.clean_frames`), encoded into one clean latent frame that every video starts from.
            video: the first frames instead, 1 + r·(k − 1) of them ((T, H, W, 3) array or (3, T, H, W) tensor):
                k clean latent frames. The output's first frames are their VAE reconstruction.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        embeds = dict(prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask,
                      pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                      negative_prompt_attention_mask=negative_prompt_attention_mask,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)

        # 1. Check inputs
        what, frames, height, width = self._given_frames(image, video, height, width)  # frames in [-1, 1]
        self.check_inputs(prompt, negative_prompt, num_frames, height, width, num_inference_steps,
                          num_videos_per_prompt, output_type, callback_on_step_end_tensor_inputs, guidance_scale,
                          latents, embeds, None if frames is None else (what, tuple(frames.shape[1:])))
        self._guidance_scale, self._interrupt = guidance_scale, False
        device = self._execution_device
        timings: dict[str, float] = {}

        # 2. Encode prompt(s): cond and (with CFG) uncond, B rows each
        start = _sync(device)
        cond, uncond = self._call_text(prompt, negative_prompt, embeds, self.do_classifier_free_guidance,
                                       num_videos_per_prompt, max_sequence_length, device)
        timings["text_encoding"] = _sync(device) - start

        # 3. Prepare latents: (B, C', T', H', W') float32, and the clean first latent frames (1, C', k, H', W')
        latents = self.prepare_latents(len(cond), num_frames, height, width, device, generator, latents)
        clean = self.encode_clean_frames(frames) if frames is not None else None

        # 4. Denoise (lvd.pipeline.sampling.sample), reporting each step to the callback and the progress bar
        start = _sync(device)
        latents, steps_done = self._denoise(latents, cond, uncond, num_inference_steps, generator,
                                            callback_on_step_end, callback_on_step_end_tensor_inputs, clean)
        timings["denoising"] = _sync(device) - start
        timings["denoising_per_step"] = timings["denoising"] / max(steps_done, 1)

        # 5. Decode
        start = _sync(device)
        if output_type == "latent":
            video = latents
        else:
            video = self.decode_latents(latents, vae_tiling)  # (B, 3, T, H, W) in [-1, 1]
            video = self.video_processor.postprocess_video(video.float(), output_type=output_type)
        timings["decoding"] = _sync(device) - start

        # 6. Output
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return LVDPipelineOutput(frames=video, timings=timings)
