"""LoRA on the video transformer (Hu et al. 2021, arXiv:2106.09685), the diffusers way: which layers, how to add
an adapter for training, how to save it, and a fuse that undoes exactly.

The adapters are peft's: :func:`add_lora` injects them into a model with diffusers' ``PeftAdapterMixin``
(``VideoDiT`` has it, through :class:`LoraAdapterMixin`), freezing every base weight. A saved adapter is the file
diffusers' LoRA loaders read, ``pytorch_lora_weights.safetensors`` with keys ``transformer.<module>.lora_A/B.weight``
and the peft config in its metadata (plus ``adapter_config.json`` beside it, for people and for peft), so the
pipeline's ``load_lora_weights``, ``set_adapters``, ``fuse_lora`` and ``unfuse_lora``
(:class:`lvd.pipeline.lora.LVDLoraLoaderMixin`) work as on any diffusers video pipeline.

Targets are module-name suffixes, with defaults per model class (:data:`DEFAULT_TARGETS`). For ``VideoDiT``
they cover every attention projection (self-attention's fused q/k/v and output, cross-attention's q, the text
key/value projection and output) and both MLP layers; ``adaLN_modulation`` (the timestep/pooled-text
modulation) is available but not a default. For Wan: every attention projection and both feed-forward layers.

:class:`LoraAdapterMixin` is ``PeftAdapterMixin`` with one change: ``fuse_lora`` keeps a CPU copy of every weight it
merges into, and ``unfuse_lora`` puts those copies back. peft's unmerge subtracts the update again, and
``(W + ΔW) − ΔW`` is not ``W`` in floating point; the copies make fuse → unfuse return the base weights bit for
bit. The copies cost the fused layers' size in CPU memory while fused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.loaders import CogVideoXLoraLoaderMixin, PeftAdapterMixin

from lvd.atomic import atomic_folder

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = {
    "VideoDiT": ("attn.qkv", "attn.text_kv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj",
                 "mlp.0", "mlp.2"),
    "WanTransformer3DModel": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                              "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"),
}
OPTIONAL_TARGETS = {"VideoDiT": ("adaLN_modulation",)}


@dataclass
class LoraConfig:
    """``lora:`` in the stage-2 recipe. ``rank`` 0 trains the whole model instead (no adapter)."""

    rank: int = 0
    alpha: float | None = None  # the update is scaled by alpha / rank; None → alpha = rank (scale 1)
    dropout: float = 0.0  # on the adapter's input, training only
    targets: list[str] | None = None  # module-name suffixes; None: DEFAULT_TARGETS of the model's class

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def problems(self) -> list[str]:
        problems = []
        if not isinstance(self.rank, int) or self.rank < 0:
            problems.append(f"lora.rank={self.rank!r} must be an integer >= 0 (0 = no adapter)")
        if self.alpha is not None and not self.alpha > 0:
            problems.append(f"lora.alpha={self.alpha!r} must be > 0")
        if not 0 <= self.dropout < 1:
            problems.append(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if self.enabled and self.targets is not None and not self.targets:
            problems.append("lora.targets is empty (leave it out for the model's defaults)")
        return problems


def targets_for(model: torch.nn.Module, targets=None) -> list[str]:
    """``targets``, or the defaults of ``model``'s class (ValueError for a class without defaults)."""
    if targets is not None:
        return list(targets)
    name = type(model).__name__
    if name not in DEFAULT_TARGETS:
        raise ValueError(f"lora.targets: no default targets for {name}; list its Linear layers' names")
    return list(DEFAULT_TARGETS[name])


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def target_problems(model: torch.nn.Module, targets=None) -> list[str]:
    """The targets that match no ``nn.Linear`` of ``model``. The defaults may miss some (a model without
    cross-attention has no ``cross_attn.*``, one with it no ``attn.text_kv``); at least one must match."""
    try:
        chosen = targets_for(model, targets)
    except ValueError as err:
        return [str(err)]
    linear = _linear_names(model)
    unmatched = [t for t in chosen if not any(n == t or n.endswith("." + t) for n in linear)]
    if targets is None and len(unmatched) < len(chosen):
        return []
    if unmatched:
        name = type(model).__name__
        known = sorted(set(DEFAULT_TARGETS.get(name, ())) | set(OPTIONAL_TARGETS.get(name, ())))
        return [f"lora.targets {unmatched} match no Linear layer of {name} (choose from {known} or a module name)"]
    return []


def peft_config(cfg: LoraConfig, model: torch.nn.Module):
    """The ``peft.LoraConfig`` for ``cfg`` on ``model``: B starts at zero, so the adapted model starts equal to
    the base model."""
    from peft import LoraConfig as PeftLoraConfig

    linear = _linear_names(model)
    targets = [t for t in targets_for(model, cfg.targets) if any(n == t or n.endswith("." + t) for n in linear)]
    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                          target_modules=targets, init_lora_weights=True)


def add_lora(model: torch.nn.Module, cfg: LoraConfig, adapter_name: str = "default") -> list[str]:
    """Inject a LoRA adapter into ``model`` and freeze everything else; returns the trainable parameter names."""
    problems = cfg.problems() + target_problems(model, cfg.targets)
    if problems:
        raise ValueError("; ".join(problems))
    model.add_adapter(peft_config(cfg, model), adapter_name=adapter_name)
    for name, param in model.named_parameters():  # peft freezes the base; say so for every other tensor too
        param.requires_grad_(".lora_" in name)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def adapter_state_dict(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors by peft's saved names (``blocks.0.attn.qkv.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def save_lora(model: torch.nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write the adapter as diffusers' pipeline LoRA file plus ``adapter_config.json``; returns the file.

    The folder is written as a temporary beside it and renamed into place (:func:`lvd.atomic.atomic_folder`), so
    an interrupted save leaves the old ``folder`` as it was."""
    folder = Path(folder)
    config = model.peft_config[adapter_name].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state_dict(model, adapter_name).items()}
    with atomic_folder(folder) as tmp:
        CogVideoXLoraLoaderMixin.save_lora_weights(tmp, transformer_lora_layers=weights,
                                                   transformer_lora_adapter_metadata=config, weight_name=LORA_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n",
                                          encoding="utf-8")
    return folder / LORA_WEIGHTS


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
