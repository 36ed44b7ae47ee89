"""LoRA adapters on a diffusers model through peft, with a fuse that undoes exactly.

:class:`LoraAdapterMixin` is diffusers' ``PeftAdapterMixin`` (``add_adapter``, ``load_lora_adapter``,
``set_adapters``, ``fuse_lora``, ``unfuse_lora``, …) plus one change: ``fuse_lora`` keeps a CPU copy of every
weight it merges into, and ``unfuse_lora`` puts those copies back. peft's unmerge subtracts the update again,
and ``(W + ΔW) − ΔW`` is not ``W`` in floating point; the copies make fuse → unfuse return the base weights bit for
bit. The copies cost the fused layers' size in CPU memory while fused.
"""

from __future__ import annotations

import torch
from diffusers.loaders import PeftAdapterMixin


class LoraAdapterMixin(PeftAdapterMixin):
    """``PeftAdapterMixin`` whose ``unfuse_lora`` restores the exact pre-fuse weights (see the module docstring)."""

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        saved = self.__dict__.setdefault("_weights_before_fuse", {})
        for name, module in self.named_modules():
            if isinstance(module, BaseTunerLayer) and name not in saved:  # a second fuse keeps the first originals
                base = module.get_base_layer()
                saved[name] = {k: v.detach().to("cpu", copy=True) for k, v in base.named_parameters(recurse=False)}
        super().fuse_lora(lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)

    def unfuse_lora(self) -> None:
        super().unfuse_lora()
        self.restore_weights_before_fuse()

    def restore_weights_before_fuse(self) -> None:
        """Put back the weights ``fuse_lora`` saved (after peft's unmerge; a pipeline's ``unfuse_lora`` unmerges
        the layers itself and then calls this)."""
        saved = self.__dict__.pop("_weights_before_fuse", {})
        modules = dict(self.named_modules())
        with torch.no_grad():
            for name, params in saved.items():
                base = modules[name].get_base_layer()
                for key, value in params.items():
                    getattr(base, key).copy_(value)
