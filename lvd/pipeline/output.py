"""What :class:`lvd.pipeline.LVDPipeline` returns (:class:`LVDPipelineOutput` from ``__call__``, :class:`PromptEmbeds`
from ``encode_prompt``), and the offload hook it fires before a VAE call; a module of their own so that the
pipeline's mixins (:mod:`lvd.pipeline.clean_frames`) use them without importing the pipeline."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

__all__ = ["LVDPipelineOutput", "PromptEmbeds", "onload", "returns_prompt_embeds"]


@dataclass
class LVDPipelineOutput(BaseOutput):
    """``frames``: "np" (B, T, H, W, 3) float32 in [0, 1]; "pt" (B, T, 3, H, W) float in [0, 1]; "pil" a list of
    B lists of T images; "latent" (B, C', T', H', W'). ``timings``: seconds for "text_encoding", "denoising"
    (total), "denoising_per_step" and "decoding" (:meth:`extend`: the sums over its windows, and "windows")."""

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]
    timings: dict[str, float] | None = None


def onload(module: torch.nn.Module) -> None:
    """Fire an accelerate offload hook before calling a method that is not ``forward`` (VAE decode)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


class PromptEmbeds(NamedTuple):
    """What :meth:`LVDPipeline.encode_prompt` returns: the text arguments of ``__call__``, under their names there
    (states (B, L, D), mask (B, L) bool with True = real token, pooled (B, D_pooled); the negatives are None
    without classifier-free guidance).

    It also unpacks as keyword arguments (``keys()`` and lookup by name), so ``pipe(**pipe.encode_prompt(p), ...)``
    gives the same video as ``pipe(p, ...)``; ``embeds.prompt_embeds`` and tuple unpacking work as for any named
    tuple."""

    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_prompt_attention_mask: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None

    def keys(self) -> tuple[str, ...]:
        return self._fields

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


def returns_prompt_embeds(encode: Callable) -> Callable:
    """Pack the six values ``encode_prompt`` returns into :class:`PromptEmbeds`.

    ``encode_prompt`` itself ends in ``return prompt_embeds, prompt_attention_mask, ...``: diffusers' common pipeline
    tests read those names from its source (``ReturnNameVisitor``) to pass its outputs back to ``__call__``."""

    @functools.wraps(encode)
    def wrapper(*args, **kwargs) -> PromptEmbeds:
        return PromptEmbeds(*encode(*args, **kwargs))

    return wrapper
