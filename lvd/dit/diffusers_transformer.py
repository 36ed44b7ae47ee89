"""A diffusers video transformer trained by lvd's stage-2 recipe: the one place its forward is adapted.

lvd calls every denoiser as ``model(latents, timestep, text_states, text_mask, text_pooled)`` with the latents
(B, C, T', H', W'), the timestep ``1000·σ`` for flow matching (the convention diffusers' flow schedulers and
video transformers share) and the text as :class:`lvd.text_embeddings.TextEmbeddings` gives it.
:class:`DiffusersTransformer` wraps a diffusers model (``WanTransformer3DModel`` so far) behind that call:

- Wan conditions on the text token states only; it has no key-padding mask and no pooled vector. Its own
  pipeline zeroes the states of padding tokens (umT5 embeddings past the prompt's length), so the wrapper does
  the same with the mask, and the pooled vector is unused.
- The wrapped model stays a diffusers model: ``wrapper.model`` saves with ``save_pretrained`` and takes peft
  adapters through its ``PeftAdapterMixin`` (:data:`lvd.dit.lora.DEFAULT_TARGETS` has its default targets).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn as nn

SUPPORTED = ("WanTransformer3DModel",)


class DiffusersTransformer(nn.Module):
    """``model(latents, timestep, text_states, text_mask, text_pooled)`` for a diffusers video transformer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        name = type(model).__name__
        if name not in SUPPORTED:
            raise ValueError(f"model.diffusers_class={name!r} is not supported; choose one of {SUPPORTED}")
        self.model = model

    @classmethod
    def from_pretrained(cls, class_name: str, folder: str | os.PathLike) -> "DiffusersTransformer":
        """Load ``class_name`` (a diffusers class) from a ``transformer/`` folder, offline."""
        import diffusers

        if class_name not in SUPPORTED:
            raise ValueError(f"model.diffusers_class={class_name!r} is not supported; choose one of {SUPPORTED}")
        return cls(getattr(diffusers, class_name).from_pretrained(folder, local_files_only=True))

    @property
    def config(self) -> SimpleNamespace:
        """What lvd reads of a denoiser's config: patch size, latent channels, text width (no pooled vector)."""
        c = self.model.config
        return SimpleNamespace(patch_size=tuple(c.patch_size), in_channels=c.in_channels, text_dim=c.text_dim,
                               pooled_dim=None)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> None:
        """The wrapped model's own folder (config.json + weights), loadable by its diffusers class."""
        self.model.save_pretrained(folder, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing()

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor,
                text_mask: torch.Tensor | None = None, text_pooled: torch.Tensor | None = None) -> torch.Tensor:
        if text_mask is not None:  # padding tokens carry zeros, as Wan's own pipeline feeds them
            text_states = text_states * text_mask[..., None].to(text_states.dtype)
        return self.model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text_states,
                          return_dict=False)[0]
