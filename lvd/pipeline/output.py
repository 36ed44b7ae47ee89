"""What :class:`lvd.pipeline.LVDPipeline` returns, and the offload hook it fires before a VAE call; a module of
their own so that the pipeline's mixins (:mod:`lvd.pipeline.clean_frames`) use them without importing the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

__all__ = ["LVDPipelineOutput", "onload"]


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
