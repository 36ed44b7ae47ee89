"""LoRA on the pipeline: diffusers' pipeline LoRA API (``load_lora_weights``, ``set_adapters``, ``fuse_lora``,
``unfuse_lora``, …) for :class:`lvd.pipeline.LVDPipeline`, whose one adaptable component is ``transformer``.

The file format and the model side (targets, training, saving) are :mod:`lvd.dit.lora`'s.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers.loaders import CogVideoXLoraLoaderMixin

from lvd.dit.lora import LORA_WEIGHTS

__all__ = ["LVDLoraLoaderMixin", "lora_file"]


def lora_file(path: str | os.PathLike) -> Path:
    """The adapter file a user names: the file itself, or a folder holding ``pytorch_lora_weights.safetensors``.
    Raises ValueError naming the path when there is none, or it is not a LoRA file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    file = path / LORA_WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no LoRA file (expected {LORA_WEIGHTS} or a .safetensors file)")
    try:
        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: not a safetensors file ({err})") from None
    if not keys or not all("lora" in k for k in keys):
        raise ValueError(f"{file}: not a LoRA file (its tensors are not named *lora_A* / *lora_B*)")
    return file


class LVDLoraLoaderMixin(CogVideoXLoraLoaderMixin):
    """LoRA loading for a pipeline whose one adaptable component is ``transformer``.

    diffusers' single-transformer loader (``load_lora_weights``, ``lora_state_dict``, ``save_lora_weights``,
    ``fuse_lora``, ``unfuse_lora``, ``set_adapters``, ``unload_lora_weights``) is the same for every such pipeline;
    CogVideoX's is reused as it is. ``load_lora_weights`` here also accepts the file's path directly and checks
    it first (:func:`lora_file`), a rank or shape that does not fit the transformer is a ValueError naming
    the file, and ``unfuse_lora`` restores the transformer's pre-fuse weights bit for bit
    (:class:`lvd.dit.lora.LoraAdapterMixin`)."""

    def unfuse_lora(self, components: list[str] = ["transformer"], **kwargs) -> None:  # noqa: B006 (diffusers' signature)
        super().unfuse_lora(components=components, **kwargs)
        for name in components:  # peft's unmerge subtracts; put the exact pre-fuse weights back
            restore = getattr(getattr(self, name, None), "restore_weights_before_fuse", None)
            if restore is not None:
                restore()

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs) -> None:
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, os.PathLike)):
            file = lora_file(source)
            source, kwargs = str(file.parent), {**kwargs, "weight_name": file.name}
        try:
            super().load_lora_weights(source, adapter_name=adapter_name, hotswap=hotswap, **kwargs)
        except RuntimeError as err:  # peft's "size mismatch for …" when rank or widths differ
            where = pretrained_model_name_or_path_or_dict
            first = str(err).strip().splitlines()
            detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
            raise ValueError(f"{where}: the adapter does not fit this transformer: {detail}") from None
