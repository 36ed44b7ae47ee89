"""Text conditioning as one value: :class:`TextEmbeddings` (token states, key-padding mask, pooled vector).

It travels unchanged from the latent loader (:mod:`lvd.data`) and the text encoder (:mod:`lvd.text`)
through the training objective (:mod:`lvd.diffusion`) into the denoiser call. It sits on the bottom
floor, beside :mod:`lvd.config`, because both ``lvd/data/`` and ``lvd/text.py`` build it and neither
may import the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TextEmbeddings"]


@dataclass
class TextEmbeddings:
    """Text conditioning for a batch: states (B, L, D), mask (B, L) bool (True = real token), pooled (B, Dp).

    One sample's row (no batch axis: (L, D), (L,), (Dp,)) is what a latent sample stores.
    """

    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.states.shape[0]

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "TextEmbeddings":
        """Move to ``device``; ``dtype`` applies to states and pooled (the mask stays bool)."""
        return TextEmbeddings(
            self.states.to(device=device, dtype=dtype, non_blocking=non_blocking),
            self.mask.to(device=device, non_blocking=non_blocking),
            self.pooled.to(device=device, dtype=dtype, non_blocking=non_blocking),
        )

    def row(self, i: int) -> "TextEmbeddings":
        """Sample ``i`` without the batch axis: states (L, D), mask (L,), pooled (Dp,)."""
        return TextEmbeddings(self.states[i], self.mask[i], self.pooled[i])

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The denoiser's keyword arguments: ``model(x_t, t, **text.as_dict())`` (:class:`lvd.dit.VideoDiT`)."""
        return dict(text_states=self.states, text_mask=self.mask, text_pooled=self.pooled)

    @classmethod
    def from_dict(cls, d) -> "TextEmbeddings":
        """Inverse of :meth:`as_dict` (the denoiser's keyword names), or return a TextEmbeddings as is."""
        if isinstance(d, cls):
            return d
        names = list(cls(None, None, None).as_dict())  # the keyword names, written once in as_dict
        missing = [k for k in names if k not in d]
        if missing:
            raise KeyError(f"text embeddings dict lacks {missing}; has {sorted(d)}")
        return cls(d[names[0]], d[names[1]].bool(), d[names[2]])

    @classmethod
    def cat(cls, items: list["TextEmbeddings"]) -> "TextEmbeddings":
        """Concatenate along the batch axis."""
        return cls(*(torch.cat([getattr(e, f) for e in items]) for f in ("states", "mask", "pooled")))

    def repeat(self, n: int) -> "TextEmbeddings":
        """Each row repeated ``n`` times (e.g. the (1, L, D) empty prompt → a batch of n)."""
        return TextEmbeddings(*(x.repeat_interleave(n, dim=0) for x in (self.states, self.mask, self.pooled)))
