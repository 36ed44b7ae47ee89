"""Stage 2: train the text-conditioned video DiT on cached latent shards.

Launch lines::

    # 0. once: latent shards from clip shards (frozen VAE + text encoder)
    python -m lvd.cache_latents --shards data/shapes/train --out data/shapes/latents \\
        --vae runs/shapes_vae/export --text-encoder all-minilm-l6-v2
    # 1. one process (CPU or one GPU)
    python recipes/train_latent_diffusion.py --config recipes/configs/shapes_dit.yaml
    # 2. many GPUs (DDP, or FSDP2 with distributed.strategy=fsdp); multi-node through torchrun's own flags
    torchrun --standalone --nproc_per_node 8 recipes/train_latent_diffusion.py --config recipes/configs/kinetics_dit_512.yaml
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        recipes/train_latent_diffusion.py --config recipes/configs/kinetics_dit_1024.yaml
    # 3. long videos: each sample's tokens split over 2 ranks (Ulysses; ring_degree for the ring, or both), so
    #    4 processes train 2 different samples at a time: global batch = (world / context) x data.batch_size
    torchrun --standalone --nproc_per_node 4 recipes/train_latent_diffusion.py --config C.yaml \\
        distributed.strategy=fsdp distributed.ulysses_degree=2
    # 4. a rank that dies brings the job back from the last verified checkpoint; with torch 2.13's rendezvous
    #    store shared across restarts the restarted gloo workers fail ("Gloo connectFullMesh failed ... Connection
    #    refused"), TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each restart a store of its own
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --max-restarts 1 --nproc_per_node 4 \\
        recipes/train_latent_diffusion.py --config C.yaml distributed.ulysses_degree=2

Starting the same command again resumes from the newest intact checkpoint in ``run.dir`` (a newer one
whose files do not match the SHA-256 hashes in its ``meta.json`` is skipped with a warning);
``checkpoint.resume_from=RUN/checkpoints/step_N`` starts from that folder instead, and stops with an
error if it fails verification. The run folder::

    RUN/config.yaml  checkpoints/step_N/  metrics.jsonl  tensorboard/  samples/step_N_k.gif  export/

``export/`` is the diffusers pipeline folder (``model_index.json``, ``transformer/`` with the EMA
weights, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that
``LVDPipeline.from_pretrained`` and ``python -m lvd.generate`` load. It needs ``components.vae`` and
``components.text_encoder`` (the ones the latents were cached with); without them only
``export/transformer/`` is written.

Fine-tuning: ``model.init_from`` starts from a trained pipeline or transformer folder; with ``lora.rank`` > 0
only peft LoRA adapters train (the checkpoints hold only them) and ``export/lora/`` is the adapter alone, in
diffusers' layout (``recipes/configs/shapes_lora.yaml``; :mod:`lvd.dit.lora`).

Context parallelism (``distributed.ulysses_degree`` × ``distributed.ring_degree`` = C > 1,
:mod:`lvd.context_parallel`): C consecutive ranks hold one sample, each 1/C of its tokens through every block; the
ranks of a context group read the same samples and draw the same noise (both follow the data rank), and the
checkpoints are those of the same model without it, so a run may resume with or without context parallelism at
the same world / C. Heads not divisible by the Ulysses degree, a ``data.buckets`` latent shape whose token count is
not divisible by C (buckets are not padded), a C that does not divide the world size, ring with factorized
attention or ``strategy=none`` are config errors before anything is built.

Image-to-video and continuation: ``clean_frames: {prob: 0.2, frames: [1, 3]}`` keeps the first k clean latent
frames of a share ``prob`` of the samples (k from ``frames``; 1 = an image), with no noise and no loss there
(:class:`lvd.diffusion.CleanFramesConfig`). The model is then built with ``clean_frame_conditioning`` (a
zero-initialised clean-token embedding, :class:`lvd.dit.VideoDiT`); with ``model.init_from`` a model without it
gets it added, so the fine-tune starts as the trained text-to-video model. ``prob: 0`` (the default) trains
text-to-video alone.

The model's ``in_channels``, ``text_dim`` and ``pooled_dim`` are read from the latent shards, so a
preset fits any VAE and text encoder. Classifier-free guidance dropout replaces a caption by the
empty-prompt embedding, read from the file ``lvd.cache_latents`` writes beside the shards
(:mod:`lvd.data.latents`), or computed with ``components.text_encoder``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvd.config import (
    ConfigError,
    arguments_problems,
    folder_problem,
    parse_args,
    raise_problems,
    run_cli,
)
from lvd.data import latents as latent_format
from lvd.data.loader import LatentDataConfig, expand_shards, make_latent_loader
from lvd.diffusion import CleanFramesConfig, DiffusionConfig, DiffusionObjective, num_tokens
from lvd.dit import DIT_PRESETS, VideoDiT
from lvd.dit.diffusers_transformer import SUPPORTED as DIFFUSERS_CLASSES
from lvd.dit.diffusers_transformer import DiffusersTransformer
from lvd.dit.pretrained import load_for_finetuning, transformer_folder, with_clean_frames
from lvd.inputs import shards_problem, text_encoder_problem, vae_problem
from lvd.dit.lora import LoraConfig, add_lora, save_lora
from lvd.text_embeddings import TextEmbeddings
from lvd.train.checkpoint import CheckpointConfig, CheckpointError
from lvd.train.distributed import (
    DistributedConfig,
    DistributedError,
    init_distributed,
    shutdown,
    unwrap,
)
from lvd.train.loop import (
    Hook,
    OptimConfig,
    RunConfig,
    StepOutput,
    TrainConfig,
    Trainer,
    export_pretrained,
    gathered_model,
    prepare_model,
    train_config_problems,
)

log = logging.getLogger("lvd.recipes.dit")


@dataclass
class DiTModelConfig:
    """``preset`` from ``lvd.dit.DIT_PRESETS``; ``overrides`` are VideoDiT arguments on top of it.
    ``in_channels``, ``text_dim`` and ``pooled_dim`` come from the latent shards.

    ``init_from``: start from a trained transformer instead, a pipeline folder (e.g. ``lvd/assets/shapes-demo``)
    or a ``transformer/`` folder (:mod:`lvd.dit.pretrained`); its config replaces ``preset``, and
    ``overrides`` may change only keys that keep every tensor's shape. A run resuming from its own checkpoint
    takes the checkpoint's weights (a LoRA run still builds its frozen base from here).

    ``diffusers_class``: train a diffusers video transformer instead (``WanTransformer3DModel``), loaded from
    ``init_from`` (its ``transformer/`` folder or a pipeline folder holding one) and called through
    :class:`lvd.dit.diffusers_transformer.DiffusersTransformer`; full fine-tuning or LoRA, no clean-frame
    conditioning, no samples during training, and the export is its ``transformer/`` folder (or the adapter)."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    init_from: str = ""
    diffusers_class: str = ""


@dataclass
class ComponentsConfig:
    """The frozen stage-1 parts the latents were made with (for samples, export and the CFG empty prompt)."""

    vae: str = ""  # preset name or folder (e.g. runs/shapes_vae/export)
    text_encoder: str = ""  # folder or name TextEncoder.from_pretrained accepts
    uncond: str = ""  # empty-prompt embedding file; default: the one lvd.cache_latents wrote beside the shards
    text_max_length: int = 0  # the --max-length the latents were cached with (0: the encoder's own limit)


@dataclass
class SamplesConfig:
    """Sample videos of the EMA model every ``every`` steps (0: off); needs components.vae and .text_encoder."""

    every: int = 1000
    prompts: list[str] = field(default_factory=list)
    num_frames: int = 17
    height: int = 64
    width: int = 64
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    format: str = "gif"
    fps: float = 8.0
    # Moving-shapes runs: also score this many captions (spread over all 84, seed 0) with lvd.eval.shapes and
    # log eval/color, eval/direction, eval/shape accuracies into metrics.jsonl. 0: off.
    shapes_eval: int = 0


@dataclass
class ExportConfig:
    enabled: bool = True
    dir: str = ""  # default RUN/export


@dataclass
class DiTRecipeConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: LatentDataConfig = field(default_factory=lambda: LatentDataConfig(shards="data/latents"))
    model: DiTModelConfig = field(default_factory=DiTModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    clean_frames: CleanFramesConfig = field(default_factory=CleanFramesConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


# ---------------------------------------------------------------------------------------------
# Config, data ↔ model checks
# ---------------------------------------------------------------------------------------------


def check_config(cfg: DiTRecipeConfig) -> None:
    """Raise one ConfigError listing every value that cannot work and every named path that is missing,
    before any model is built or anything is written."""
    problems = train_config_problems(cfg.train, cfg.checkpoint, cfg.optim)
    s = cfg.samples
    if s.every < 0:
        problems.append(f"samples.every={s.every}: must be >= 0 (0: off)")
    if s.format not in ("gif", "mp4"):
        problems.append(f"samples.format={s.format!r}: must be 'gif' or 'mp4'")
    if not s.fps > 0:
        problems.append(f"samples.fps={s.fps}: must be > 0")
    if not (math.isfinite(s.guidance_scale) and s.guidance_scale >= 0):
        problems.append(f"samples.guidance_scale={s.guidance_scale}: must be a finite number >= 0")
    if cfg.model.preset not in DIT_PRESETS:
        problems.append(f"model.preset={cfg.model.preset!r}: unknown; choose one of {', '.join(sorted(DIT_PRESETS))}")
    problems += arguments_problems("model.overrides", cfg.model.overrides, VideoDiT.__init__)
    problems += cfg.lora.problems()
    if cfg.lora.enabled and not cfg.model.init_from:
        problems.append(f"lora.rank={cfg.lora.rank} adapts a trained model: set model.init_from (a pipeline or "
                        "transformer folder)")
    if cfg.lora.enabled and cfg.distributed.strategy == "fsdp":
        problems.append("lora with distributed.strategy=fsdp is not supported yet; use ddp (adapters are small)")
    problems += _diffusers_class_problems(cfg)
    problems += _context_problems(cfg)
    if cfg.clean_frames.enabled and cfg.model.overrides.get("clean_frame_conditioning", True) is not True:
        problems.append(f"clean_frames.prob={cfg.clean_frames.prob} trains with clean frames: the model needs "
                        "clean_frame_conditioning, drop model.overrides.clean_frame_conditioning=false")
    if cfg.model.init_from:
        try:
            transformer_folder(cfg.model.init_from)
        except ValueError as err:
            problems.append(f"model.init_from={cfg.model.init_from!r}: {str(err).split(': ', 1)[-1]}")
    c = cfg.components
    problems += filter(None, [
        shards_problem("data.shards", cfg.data.shards, allow_pipe=cfg.data.allow_pipe),
        vae_problem("components.vae", c.vae) if c.vae else None,
        text_encoder_problem("components.text_encoder", c.text_encoder) if c.text_encoder else None,
        _uncond_problem(cfg),
        folder_problem("run.dir", cfg.run.dir),
        folder_problem("export.dir", cfg.export.dir) if cfg.export.enabled and cfg.export.dir else None,
    ])
    raise_problems(problems)


def _diffusers_class_problems(cfg: DiTRecipeConfig) -> list[str]:
    """What a diffusers transformer (model.diffusers_class) cannot do in this recipe."""
    name = cfg.model.diffusers_class
    if not name:
        return []
    if name not in DIFFUSERS_CLASSES:
        return [f"model.diffusers_class={name!r}: not supported; choose one of {', '.join(DIFFUSERS_CLASSES)}"]
    problems = []
    if not cfg.model.init_from:
        problems.append(f"model.diffusers_class={name} trains a saved model: set model.init_from (its folder)")
    if cfg.model.overrides:
        problems.append(f"model.overrides={cfg.model.overrides} are VideoDiT arguments; a {name} keeps its saved config")
    if cfg.clean_frames.enabled:
        problems.append(f"clean_frames.prob={cfg.clean_frames.prob}: clean-frame conditioning needs lvd's VideoDiT")
    if cfg.samples.every > 0 and cfg.samples.prompts:
        problems.append(f"samples.every={cfg.samples.every}: LVDPipeline samples with VideoDiT only; set samples.every=0")
    if cfg.distributed.strategy == "fsdp":
        problems.append(f"model.diffusers_class={name} with distributed.strategy=fsdp is not supported; use ddp")
    return problems


def _model_config(cfg: DiTModelConfig) -> dict | None:
    """The VideoDiT arguments ``cfg`` builds with, read without building it: ``init_from``'s config.json or the
    preset, under ``overrides``, over VideoDiT's defaults (None when the preset or folder is unknown)."""
    if cfg.init_from:
        try:
            base = json.loads((transformer_folder(cfg.init_from) / "config.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return None
    elif cfg.preset in DIT_PRESETS:
        base = DIT_PRESETS[cfg.preset]
    else:
        return None
    defaults = {name: p.default for name, p in inspect.signature(VideoDiT.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **base, **cfg.overrides}


def _context_problems(cfg: DiTRecipeConfig, latent_shapes=()) -> list[str]:
    """Context-parallel settings that cannot work (:meth:`DistributedConfig.context_problems`): the world size
    torchrun set, the model's heads and attention mode, and the token count of each ``data.buckets`` latent shape
    and of ``latent_shapes`` ((T', H', W') each, e.g. the first batch's)."""
    d = cfg.distributed
    if d.ulysses_degree == 1 and d.ring_degree == 1:
        return []
    if cfg.model.diffusers_class:
        return [f"distributed.ulysses_degree x ring_degree > 1: context parallelism runs lvd's VideoDiT, not "
                f"model.diffusers_class={cfg.model.diffusers_class}"]
    model = _model_config(cfg.model)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; check_config runs before the process group
    if model is None:  # the unknown preset or folder is a problem of its own
        return d.context_problems(world)
    shapes = [*latent_shapes, *((b.frames, b.height, b.width) for b in cfg.data.buckets)]
    tokens = [num_tokens(shape, model["patch_size"]) for shape in shapes]
    return d.context_problems(world, num_heads=model["num_heads"], tokens=tokens,
                              attention_mode=model["attention_mode"])


def _uncond_path(cfg: DiTRecipeConfig) -> Path:
    """components.uncond, else the empty-prompt file lvd.cache_latents writes beside the first latent shard."""
    if cfg.components.uncond:
        return Path(cfg.components.uncond)
    return latent_format.uncond_path(Path(expand_shards(cfg.data.shards, allow_pipe=cfg.data.allow_pipe)[0]).parent)


def _uncond_problem(cfg: DiTRecipeConfig) -> str | None:
    """CFG dropout needs the empty-prompt embedding: a file, or the text encoder to compute it."""
    if cfg.components.uncond and not Path(cfg.components.uncond).is_file():
        return f"components.uncond={cfg.components.uncond!r}: no such file"
    if (cfg.diffusion.cfg_dropout <= 0 or cfg.components.text_encoder
            or shards_problem("", cfg.data.shards, allow_pipe=cfg.data.allow_pipe)):
        return None
    path = _uncond_path(cfg)
    if path.is_file():
        return None
    return (f"diffusion.cfg_dropout={cfg.diffusion.cfg_dropout} needs the empty-prompt embedding: {path} does not "
            "exist (lvd.cache_latents writes it) and components.text_encoder is not set; or set diffusion.cfg_dropout=0")


def peek_latents(cfg: LatentDataConfig, seed: int) -> dict:
    """The first batch of the shards (a separate loader, so the training loader's position is untouched)."""
    for batch in make_latent_loader(replace(cfg, workers=0, shuffle=0, resampled=False), seed=seed):
        return batch
    raise ConfigError(f"data.shards={cfg.shards!r} gave no latent batch (fewer samples than data.batch_size?)")


def build_dit(cfg: DiTModelConfig, first: dict, clean_frames: bool = False) -> VideoDiT:
    """A VideoDiT sized for the latents and text embeddings of ``first`` (a latent batch), or the trained one
    ``cfg.init_from`` names; ``clean_frames``: with ``clean_frame_conditioning``
    (:func:`lvd.dit.pretrained.with_clean_frames`).
    With ``cfg.diffusers_class`` the saved diffusers transformer, wrapped to take lvd's denoiser call."""
    if cfg.diffusers_class:
        model = DiffusersTransformer.from_pretrained(cfg.diffusers_class, transformer_folder(cfg.init_from))
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model
    if cfg.init_from:
        # the flag goes through with_clean_frames: load_for_finetuning would add no clean_embed for it (diffusers'
        # from_config drops a key that the saved config.json lacks)
        overrides = {k: v for k, v in cfg.overrides.items() if k != "clean_frame_conditioning"}
        try:
            model = load_for_finetuning(cfg.init_from, overrides)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if clean_frames or cfg.overrides.get("clean_frame_conditioning") is True:
            try:
                model = with_clean_frames(model)
            except ValueError as err:
                raise ConfigError(f"model.init_from={cfg.init_from!r}: {err}") from None
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model
    dims = dict(in_channels=first["latents"].shape[1], text_dim=first["text"].states.shape[-1],
                pooled_dim=first["text"].pooled.shape[-1])
    clash = {k: (cfg.overrides[k], v) for k, v in dims.items() if k in cfg.overrides and cfg.overrides[k] != v}
    if clash:
        raise ConfigError("model.overrides disagree with the latent shards: " + ", ".join(
            f"{k}={a} but the shards have {b}" for k, (a, b) in clash.items()))
    extra = {"clean_frame_conditioning": True} if clean_frames else {}
    model = VideoDiT.from_preset(cfg.preset, **{**cfg.overrides, **dims, **extra})
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def check_batch(model: VideoDiT, batch: dict, shards: str, clean_frames: CleanFramesConfig | None = None) -> None:
    """Raise a ValueError naming the samples when latents or text do not fit the model."""
    c = model.config
    lat, states, pooled = batch["latents"], batch["text"].states, batch["text"].pooled
    pt, ph, pw = c.patch_size
    problems = []
    if lat.ndim != 5 or lat.shape[1] != c.in_channels:
        problems.append(f"latents {tuple(lat.shape)}: expected (B, {c.in_channels}, T', H', W')")
    elif lat.shape[2] % pt or lat.shape[3] % ph or lat.shape[4] % pw:
        problems.append(f"latent T'xH'xW' {tuple(lat.shape[2:])} is not divisible by patch_size {tuple(c.patch_size)}")
    if states.shape[-1] != c.text_dim:
        problems.append(f"text_states width {states.shape[-1]} != model text_dim {c.text_dim}")
    if c.pooled_dim is not None and pooled.shape[-1] != c.pooled_dim:  # None: the model takes no pooled vector
        problems.append(f"text_pooled width {pooled.shape[-1]} != model pooled_dim {c.pooled_dim}")
    if clean_frames is not None and clean_frames.enabled and lat.ndim == 5 and max(clean_frames.frames) >= lat.shape[2]:
        problems.append(f"clean_frames.frames={clean_frames.frames}: {max(clean_frames.frames)} clean latent frames "
                        f"leave none to denoise in latents of {lat.shape[2]} frames")
    if clean_frames is not None and clean_frames.enabled and any(k % pt for k in clean_frames.frames):
        problems.append(f"clean_frames.frames={clean_frames.frames} must be multiples of the temporal patch {pt}")
    if problems:
        keys = ", ".join(batch["key"][:3])
        raise ConfigError(f"latent shards '{shards}' do not fit the model (samples {keys}): " + "; ".join(problems))


def load_uncond(cfg: DiTRecipeConfig) -> TextEmbeddings | None:
    """The empty-prompt embedding CFG dropout substitutes (None when cfg_dropout is 0)."""
    if cfg.diffusion.cfg_dropout <= 0:
        return None
    path = _uncond_path(cfg)
    if path.is_file():
        return latent_format.read_uncond(path)
    if cfg.components.text_encoder:
        from lvd.text import TextEncoder

        return TextEncoder.from_pretrained(cfg.components.text_encoder, max_length=cfg.components.text_max_length or None,
                                           device="cpu").empty()
    raise ConfigError(
        f"diffusion.cfg_dropout={cfg.diffusion.cfg_dropout} needs the empty-prompt embedding: {path} does not exist "
        "(lvd.cache_latents writes it) and components.text_encoder is not set; or set diffusion.cfg_dropout=0"
    )


# ---------------------------------------------------------------------------------------------
# Samples and export: the pipeline around the EMA transformer
# ---------------------------------------------------------------------------------------------


def make_pipeline(cfg: DiTRecipeConfig, transformer: VideoDiT):
    """The LVDPipeline around ``transformer``: the configured VAE and text encoder (at the length the latents were
    cached with) and the scheduler of the training objective. A dynamic shift stays dynamic: the pipeline resolves
    it at each generated video's token count, as training did per bucket."""
    from lvd.pipeline import LVDPipeline

    c = cfg.components
    return LVDPipeline.from_components(transformer=transformer, vae=c.vae, text_encoder=c.text_encoder,
                                       text_max_length=c.text_max_length or None, diffusion=cfg.diffusion)


def write_samples(cfg: DiTRecipeConfig, run_dir: Path, step: int, ema_model: VideoDiT) -> dict:
    """Sample videos into RUN/samples; with ``samples.shapes_eval`` also the shapes scores (logged)."""
    from lvd.video_io import write_video

    s = cfg.samples
    model = unwrap(ema_model)
    pipe = make_pipeline(cfg, model)
    pipe.to(next(model.parameters()).device)
    for k, prompt in enumerate(s.prompts):
        g = torch.Generator().manual_seed(k)
        video = pipe(prompt, num_frames=s.num_frames, height=s.height, width=s.width, generator=g,
                     num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                     output_type="pt").frames[0]  # (T, C, H, W) in [0, 1]
        write_video(run_dir / "samples" / f"step_{step:06d}_{k}.{s.format}", video.permute(1, 0, 2, 3) * 2 - 1, fps=s.fps)
    if s.shapes_eval <= 0:
        return {}
    from lvd.data.synthetic import all_captions
    from lvd.eval.shapes import evaluate_pipeline
    from lvd.eval.shapes_score import summarize

    captions = all_captions()
    captions = [captions[round(i * len(captions) / s.shapes_eval)] for i in range(min(s.shapes_eval, len(captions)))]
    pipe.set_progress_bar_config(disable=True)
    summary = summarize(evaluate_pipeline(pipe, captions=captions, seeds=(0,), num_frames=s.num_frames,
                                          height=s.height, width=s.width, num_inference_steps=s.num_inference_steps,
                                          guidance_scale=s.guidance_scale))
    return {f"eval/{name}": value for name, value in summary["accuracy"].items()}


def adapted(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the LoRA adapters: a wrapped diffusers transformer's own model, else ``model``."""
    return model.model if isinstance(model, DiffusersTransformer) else model


def export(cfg: DiTRecipeConfig, run_dir: Path, ema_model: torch.nn.Module, env) -> Path | None:
    """The pipeline folder when components are configured, else ``export/transformer`` only; a LoRA run writes
    its adapter alone, ``export/lora/pytorch_lora_weights.safetensors`` (diffusers' layout)."""
    out = Path(cfg.export.dir) if cfg.export.dir else run_dir / "export"
    if cfg.lora.enabled:
        return save_lora(adapted(unwrap(ema_model)), out / "lora").parent if env.is_main else None
    if cfg.model.diffusers_class or not (cfg.components.vae and cfg.components.text_encoder):
        return export_pretrained(ema_model, out / "transformer", env)
    plain = gathered_model(ema_model, env)  # the trainer's gather (FSDP2: full weights); every rank takes part
    if plain is not None:
        from lvd.pipeline import export_pipeline

        export_pipeline(make_pipeline(cfg, plain), out)
    return out if env.is_main else None


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # 1. Config, seed, the first batch (its latent shape, which the buckets may not list, must split over the
    #    context group too: checked before the process group starts), processes
    cfg = parse_args(DiTRecipeConfig, argv)
    check_config(cfg)
    # every global generator a checkpoint records, so that processes started apart (torchrun, a restart) agree
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    run_dir = Path(cfg.run.dir)
    first = peek_latents(cfg.data, cfg.train.seed)
    raise_problems(_context_problems(cfg, [first["latents"].shape[2:]]))
    env = init_distributed(cfg.distributed)

    # 2. The model, sized from the data; the empty prompt for CFG dropout
    dit = build_dit(cfg.model, first, clean_frames=cfg.clean_frames.enabled)
    check_batch(dit, first, cfg.data.shards, cfg.clean_frames)
    if cfg.lora.enabled and cfg.clean_frames.enabled:
        log.warning("clean frames with lora: only the adapters train, so the clean-token embedding stays as %s",
                    "trained" if (cfg.model.init_from and dit.clean_embed.any()) else "initialised (zero)")
    if cfg.lora.enabled:
        trainable = add_lora(adapted(dit), cfg.lora)
        log.info("LoRA rank %d: %d adapter tensors, %d parameters train", cfg.lora.rank, len(trainable),
                 sum(p.numel() for p in dit.parameters() if p.requires_grad))
    uncond = load_uncond(cfg)
    model, ema = prepare_model(dit, env, cfg.distributed, cfg.train)
    if uncond is not None:
        uncond = uncond.to(env.device)

    # 3. The loss of one micro-batch
    objective = DiffusionObjective(cfg.diffusion, patch_size=dit.config.patch_size, clean_frames=cfg.clean_frames)

    def loss_fn(model, batch, step, gen):
        check_batch(unwrap(model), batch, cfg.data.shards, cfg.clean_frames)
        latents = batch["latents"].to(env.device, non_blocking=True)  # (B, C, T', H', W')
        text = batch["text"].to(env.device, non_blocking=True)  # TextEmbeddings: (B, L, D), (B, L), (B, Dp)
        loss, metrics = objective(model, latents, text, uncond=uncond, generator=gen)
        metrics.pop("loss", None)
        return StepOutput(loss, metrics)

    patch = dit.config.patch_size

    def count(batch):
        return len(batch["latents"]), len(batch["latents"]) * num_tokens(batch["latents"].shape, patch)

    # 4. Hooks: sample videos with the EMA weights
    hooks = []
    # (rank 0 only, so not under FSDP2, where the EMA weights are sharded over every rank)
    # (and not with a context-parallel model alone: its forward needs every rank of its context group; the EMA
    # copy is a plain model)
    sampling = cfg.samples.every > 0 and cfg.samples.prompts and (ema is not None or env.context_size == 1)
    if sampling and cfg.components.vae and cfg.components.text_encoder and env.is_main and env.strategy != "fsdp":
        ema_or_model = ema.model if ema is not None else model
        hooks.append(Hook(cfg.samples.every, lambda tr, step: write_samples(cfg, run_dir, step, ema_or_model)))
    if cfg.samples.shapes_eval > 0 and cfg.samples.every > 0 and not hooks and env.is_main:
        log.warning("samples.shapes_eval needs samples.prompts, components.vae and components.text_encoder (and no FSDP)")

    # 5. Train (or resume)
    # sharded by data rank: the ranks of a context group read the same samples
    loader = make_latent_loader(cfg.data, seed=cfg.train.seed, rank=env.data_rank, world_size=env.data_world_size)
    trainer = Trainer(run_dir=run_dir, model=model, loss_fn=loss_fn, optim=cfg.optim, train=cfg.train,
                      checkpoint=cfg.checkpoint, env=env, ema=ema, config=cfg, count_fn=count, hooks=hooks,
                      save_frozen=not cfg.lora.enabled)
    trainer.fit(loader)

    # 6. Export the EMA transformer (with the pipeline around it when the components are known)
    if cfg.export.enabled:
        out = export(cfg, run_dir, ema.model if ema is not None else model, env)
        if env.is_main:
            log.info("exported to %s", out)
    shutdown()
    return 0


if __name__ == "__main__":
    run_cli(main, prog="train_latent_diffusion.py", user_errors=(DistributedError, CheckpointError))
