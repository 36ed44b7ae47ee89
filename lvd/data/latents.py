"""The latent-sample format: what ``lvd.cache_latents`` writes and the latent loader reads.

A latent shard is a webdataset tar of samples ``{__key__, latents.safetensors, txt, json}``. The
safetensors bytes (no pickle: loading runs no code) hold four tensors::

    latents       (C, T', H', W')  float32   normalised by the VAE that made them
    text_states   (L, D)           float32   the caption's token states
    text_mask     (L,)             uint8     1 = real token, 0 = padding
    text_pooled   (Dp,)            float32   the caption's pooled vector

The json carries the clip's metadata plus ``latent_shape`` and, when the clip was fitted to a
bucket, ``bucket`` ({frames, height, width} in pixels). The folder also holds
``uncond.safetensors``: the empty prompt's embedding (batch 1, the same three text tensors) that
classifier-free-guidance dropout substitutes for a caption.

These names are a file format: shards written by any version of lvd keep loading, so they never
change. In memory the text travels as one :class:`~lvd.text_embeddings.TextEmbeddings`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from lvd.atomic import atomic_write
from lvd.text_embeddings import TextEmbeddings

__all__ = [
    "LATENTS", "TEXT_STATES", "TEXT_MASK", "TEXT_POOLED", "SAMPLE_KEYS", "MEMBER", "UNCOND_FILE",
    "encode_sample", "decode_sample", "encode_tensors", "decode_tensors", "latent_shape",
    "uncond_path", "write_uncond", "read_uncond",
]

LATENTS = "latents"
TEXT_STATES = "text_states"
TEXT_MASK = "text_mask"
TEXT_POOLED = "text_pooled"
SAMPLE_KEYS = (LATENTS, TEXT_STATES, TEXT_MASK, TEXT_POOLED)
MEMBER = "latents.safetensors"  # the tar member (webdataset extension) holding the tensors
UNCOND_FILE = "uncond.safetensors"  # the empty prompt's embedding, beside the shards


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of named tensors (moved to CPU, made contiguous)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_tensors`."""
    from safetensors.torch import load

    return load(bytes(data))


def _text_tensors(text: TextEmbeddings) -> dict[str, torch.Tensor]:
    """The on-disk form of text rows: float32 states and pooled, uint8 mask."""
    return {
        TEXT_STATES: text.states.float(),
        TEXT_MASK: text.mask.to(torch.uint8),
        TEXT_POOLED: text.pooled.float(),
    }


def _text_from(tensors: dict[str, torch.Tensor], where: str) -> TextEmbeddings:
    missing = [k for k in (TEXT_STATES, TEXT_MASK, TEXT_POOLED) if k not in tensors]
    if missing:
        raise KeyError(f"{where} lacks {missing}; has {sorted(tensors)}")
    return TextEmbeddings(tensors[TEXT_STATES], tensors[TEXT_MASK].bool(), tensors[TEXT_POOLED])


def encode_sample(latents: torch.Tensor, text: TextEmbeddings) -> bytes:
    """The ``latents.safetensors`` bytes of one sample: latents (C, T', H', W') and its caption's text row
    (states (L, D), mask (L,), pooled (Dp,); see :meth:`TextEmbeddings.row`)."""
    if latents.ndim != 4 or text.states.ndim != 2:
        raise ValueError(f"one sample: latents (C, T', H', W') and text states (L, D), got "
                         f"{tuple(latents.shape)} and {tuple(text.states.shape)}")
    return encode_tensors({LATENTS: latents.float(), **_text_tensors(text)})


def decode_sample(data: bytes) -> tuple[torch.Tensor, TextEmbeddings]:
    """Inverse of :func:`encode_sample`: latents (C, T', H', W') float32 and the text row (mask bool)."""
    tensors = decode_tensors(data)
    if LATENTS not in tensors:
        raise KeyError(f"{MEMBER} lacks {[LATENTS]}; has {sorted(tensors)}")
    return tensors[LATENTS], _text_from(tensors, MEMBER)


def latent_shape(data: bytes) -> tuple[int, ...]:
    """(C, T', H', W') of a sample, read from the safetensors header alone (8-byte little-endian length +
    JSON; no tensor is read). Raises ValueError when the header is unreadable, lacks a key or is not 4-D."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(bytes(data[8 : 8 + n]))
        shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError("unreadable safetensors header") from None
    missing = [k for k in SAMPLE_KEYS if k not in shapes]
    if missing:
        raise ValueError(f"{MEMBER} lacks {missing}")
    if len(shapes[LATENTS]) != 4:
        raise ValueError(f"latents must be (C, T, H, W), got shape {shapes[LATENTS]}")
    return tuple(shapes[LATENTS])


def uncond_path(folder: str | os.PathLike) -> Path:
    """Where a latent folder keeps the empty prompt's embedding."""
    return Path(folder) / UNCOND_FILE


def write_uncond(folder: str | os.PathLike, empty: TextEmbeddings) -> Path:
    """Write the empty prompt's embedding (batch 1: states (1, L, D), mask (1, L), pooled (1, Dp)) into
    ``folder``, atomically (:func:`lvd.atomic.atomic_write`)."""
    path = uncond_path(folder)
    with atomic_write(path) as f:
        f.write(encode_tensors(_text_tensors(empty)))
    return path


def read_uncond(path: str | os.PathLike) -> TextEmbeddings:
    """The empty prompt's embedding written by :func:`write_uncond` (mask as bool)."""
    from safetensors.torch import load_file

    return _text_from(load_file(str(path)), str(path))
