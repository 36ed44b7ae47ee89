"""Pipeline folders in and out: the components of an :class:`lvd.pipeline.LVDPipeline` from models, the folders
and names they were saved under, or the training objective (:func:`load_components`, behind
``LVDPipeline.from_components``); and a finished pipeline written as a folder (:func:`export_pipeline`).

The training recipes assemble and export their pipelines only through these two, so a folder a recipe
writes is exactly one that ``LVDPipeline.from_pretrained`` and ``python -m lvd.generate`` read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import diffusers
import torch

from lvd.atomic import atomic_folder
from lvd.diffusion import DiffusionConfig, scheduler_config
from lvd.dit import VideoDiT
from lvd.text import TextEncoder
from lvd.vae import PretrainedVideoVAE, load_vae

__all__ = ["export_pipeline", "load_components", "load_text_encoder"]


def _load_transformer(transformer):
    """A VideoDiT, or the VideoDiT saved in a folder."""
    if isinstance(transformer, (str, os.PathLike)):
        return VideoDiT.from_pretrained(transformer, local_files_only=True)
    return transformer


def _load_vae(vae):
    """A VAE module, or one from a preset name or folder (:func:`lvd.vae.load_vae`); a diffusers VAE is kept
    unwrapped (the pipeline holds the module, so the folder names its diffusers class)."""
    if isinstance(vae, (str, os.PathLike)):
        vae = load_vae(vae, device="cpu")
    return vae.model if isinstance(vae, PretrainedVideoVAE) else vae


def _load_scheduler(scheduler, diffusion: DiffusionConfig | None, seq_len: int | None):
    """A scheduler as given, from a ``scheduler/`` folder (its config names the class), or the one an export of
    ``diffusion`` records (:func:`lvd.diffusion.scheduler_config`, a dynamic shift resolved at ``seq_len``)."""
    if diffusion is not None:
        config = scheduler_config(diffusion, seq_len=seq_len)
        return getattr(diffusers, config["_class_name"]).from_config(config)
    if isinstance(scheduler, (str, os.PathLike)):
        config = json.loads((Path(scheduler) / "scheduler_config.json").read_text(encoding="utf-8"))
        return getattr(diffusers, config["_class_name"]).from_pretrained(scheduler)
    return scheduler


def load_text_encoder(name: str, *, max_length: int | None = None, dtype: torch.dtype | None = None):
    """(text model, tokenizer) that :meth:`lvd.text.TextEncoder.from_pretrained` resolves from ``name``, on the CPU,
    with the tokenizer's ``model_max_length`` set to the length it encodes at (``max_length``, default the
    encoder's own): the length the latents were cached with."""
    encoder = TextEncoder.from_pretrained(name, max_length=max_length, device="cpu", dtype=dtype)
    encoder.tokenizer.model_max_length = encoder.max_length
    return encoder.model, encoder.tokenizer


def _problems(transformer, scheduler, diffusion, text_encoder, tokenizer, text_max_length) -> list[str]:
    """Why the arguments of :func:`load_components` cannot make a pipeline, as messages."""
    problems = []
    if scheduler is not None and diffusion is not None:
        problems.append("give scheduler= or diffusion= (the training objective), not both")
    if isinstance(text_encoder, str) and tokenizer is not None:
        problems.append("text_encoder is a name, which loads its own tokenizer: drop tokenizer=")
    if isinstance(text_encoder, torch.nn.Module) and tokenizer is None:
        problems.append("text_encoder is a model: pass its tokenizer= too")
    if text_max_length and not isinstance(text_encoder, str):
        problems.append("text_max_length applies to a text_encoder given by name (a folder records only "
                        "text_encoder_id, which from_pretrained loads at the encoder's own length)")
    if hasattr(transformer, "module") or hasattr(transformer, "_orig_mod"):
        problems.append("transformer is wrapped (DDP or torch.compile): pass the plain model")
    return problems


def load_components(
    *,
    transformer,
    vae=None,
    scheduler=None,
    diffusion: DiffusionConfig | None = None,
    seq_len: int | None = None,
    text_encoder=None,
    tokenizer=None,
    text_encoder_id: str | None = None,
    text_max_length: int | None = None,
) -> dict:
    """The keyword arguments of ``LVDPipeline(...)``, each component loaded where it is given by folder or name.

    Args:
        transformer: a VideoDiT, or its folder (``VideoDiT.save_pretrained``).
        vae: a VAE module, a VAE preset name, or a folder :func:`lvd.vae.load_vae` reads; or None.
        scheduler: a diffusers scheduler or its folder; or instead ``diffusion``, the training objective
            (:class:`lvd.diffusion.DiffusionConfig`), whose export scheduler is built with a dynamic shift
            resolved at ``seq_len`` training tokens (:func:`lvd.diffusion.scheduler_config`).
        text_encoder, tokenizer: a Hugging Face text model and its tokenizer, or ``text_encoder`` alone as a name
            :meth:`lvd.text.TextEncoder.from_pretrained` resolves (at ``text_max_length`` tokens, the length the
            latents were cached with). Either way a saved folder holds their weights.
        text_encoder_id: instead, a name a saved folder records in place of the weights (see ``LVDPipeline``);
            the encoder is loaded by it now, so the pipeline generates at once.

    Raises one ValueError listing every argument that does not fit.
    """
    problems = _problems(transformer, scheduler, diffusion, text_encoder, tokenizer, text_max_length)
    if problems:
        raise ValueError("LVDPipeline.from_components: " + "; ".join(problems))
    text_model = text_encoder
    if isinstance(text_encoder, str):
        text_model, tokenizer = load_text_encoder(text_encoder, max_length=text_max_length)
    elif text_encoder is None and text_encoder_id:  # at the encoder's own length, as from_pretrained loads it
        text_model, tokenizer = load_text_encoder(text_encoder_id)
    return dict(transformer=_load_transformer(transformer), vae=_load_vae(vae), text_encoder=text_model,
                tokenizer=tokenizer, scheduler=_load_scheduler(scheduler, diffusion, seq_len),
                text_encoder_id=text_encoder_id)


def export_pipeline(pipe, out: str | os.PathLike, *, extra_files: dict[str, str | os.PathLike] | None = None) -> Path:
    """Write ``pipe`` (an ``LVDPipeline``) as a pipeline folder (diffusers layout, safetensors) at ``out``.

    The folder is written beside ``out`` as a temporary and moved into place when complete
    (:func:`lvd.atomic.atomic_folder`), so an interrupted export never leaves a half-written ``out``. ``extra_files``
    maps paths inside the folder to files copied there (e.g. ``{"metrics/dit.metrics.jsonl": run / "metrics.jsonl"}``).
    Returns ``out``."""
    out = Path(out)
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, source in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
    return out
