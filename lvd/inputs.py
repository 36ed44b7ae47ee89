"""Checks of the inputs a command names (shards, a VAE, a text encoder), run before any work starts.

Each returns one line naming the key or flag and the value, or None; callers collect them and raise one
:class:`lvd.config.ConfigError`. They live above ``lvd.config`` because they ask the data, VAE and text
modules what those accept.
"""

from __future__ import annotations

from pathlib import Path

from lvd.config import named
from lvd.data.loader import expand_shards
from lvd.text import resolve_text_encoder_path
from lvd.vae import VAE_PRESETS

__all__ = ["shards_problem", "text_encoder_problem", "vae_problem"]


def shards_problem(key: str, spec: str, *, allow_pipe: bool = False) -> str | None:
    """Why the shard spec (brace patterns joined by ``::``, or a folder) names no existing shards, or None."""
    try:
        expand_shards(spec, allow_pipe=allow_pipe)
    except ValueError as err:
        return f"{named(key, spec)}: {str(err).removeprefix('shards: ')}"
    return None


def vae_problem(key: str, value: str) -> str | None:
    """Why ``value`` is neither a VAE preset nor a folder ``lvd.vae.load_vae`` reads, or None."""
    folder = Path(value)
    if value in VAE_PRESETS or (folder / "config.json").is_file() or (folder / "vae" / "config.json").is_file():
        return None
    if not folder.exists():
        return f"{named(key, value)}: no such folder, and not a VAE preset ({', '.join(sorted(VAE_PRESETS))})"
    return f"{named(key, value)}: the folder has no config.json (nor vae/config.json)"


def text_encoder_problem(key: str, value: str) -> str | None:
    """Why ``value`` is neither a text-encoder folder nor a model name found offline (packaged or in the
    Hugging Face cache), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        model_path = resolve_text_encoder_path(value)[0]
    except FileNotFoundError as err:
        return f"{named(key, value)}: {err}"
    if Path(model_path).is_dir():
        return None
    try:
        cached = try_to_load_from_cache(model_path, "config.json")
    except ValueError:  # not a valid hub name either
        cached = None
    if isinstance(cached, str):
        return None
    return (f"{named(key, value)}: no such folder, and no model of that name in the local Hugging Face cache "
            "(nothing is downloaded)")
