"""Pretrained diffusers video VAEs behind lvd's VAE interface, and :func:`load_vae`.

Supported classes (diffusers 0.42), with the latent normalisation each one's own pipeline applies —
this table is the one place in lvd that knows them. ``normalised = (z − shift) · mul``:

| class | time × space | frames | shift | mul |
|---|---|---|---|---|
| AutoencoderKLCogVideoX | 4 × 2^(blocks−1) (8) | 1 + 4k | 0 | ``scaling_factor`` (1.15258426) |
| AutoencoderKLHunyuanVideo | 4 × 8 | 1 + 4k | 0 | ``scaling_factor`` (0.476986) |
| AutoencoderKLWan | 4 × 8 (16 for Wan 2.2) | 1 + 4k | ``latents_mean`` | 1 / ``latents_std`` |
| AutoencoderKLLTXVideo | 8 × 32 | 1 + 8k | buffer ``latents_mean`` | ``scaling_factor`` / buffer ``latents_std`` |

All compression factors are read from the loaded model/config (tiny test configs differ from the
released ones). Loading is offline: ``from_pretrained(local_folder)`` only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from lvd.vae.interface import VideoVAE, VideoVAEShapes
from lvd.vae.model import VAE_PRESETS, CausalVideoVAE

SUPPORTED_CLASSES = ("AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLWan", "AutoencoderKLLTXVideo")


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _factors(model: nn.Module) -> tuple[int, int]:
    """(temporal, spatial) compression of a supported diffusers VAE, read from the model itself."""
    name, cfg = type(model).__name__, model.config
    if name == "AutoencoderKLCogVideoX":
        return int(cfg.temporal_compression_ratio), 2 ** (len(cfg.block_out_channels) - 1)
    if name == "AutoencoderKLWan":
        t = cfg.get("scale_factor_temporal") or 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        s = cfg.get("scale_factor_spatial") or 2 ** (len(cfg.dim_mult) - 1) * (cfg.get("patch_size") or 1)
        return int(t), int(s)
    # HunyuanVideo and LTX-Video set these attributes in __init__
    return int(model.temporal_compression_ratio), int(model.spatial_compression_ratio)


def _latent_channels(model: nn.Module) -> int:
    cfg = model.config
    return int(cfg.z_dim if type(model).__name__ == "AutoencoderKLWan" else cfg.latent_channels)


def _normalisation(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, mul), each (C,) float32, with ``normalised = (z − shift) · mul`` as in the table above."""
    name, cfg, c = type(model).__name__, model.config, _latent_channels(model)
    zeros = torch.zeros(c)
    if name in ("AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo"):
        return zeros, torch.full((c,), float(cfg.scaling_factor))
    if name == "AutoencoderKLWan":
        return torch.tensor(cfg.latents_mean, dtype=torch.float32), 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32)
    if name == "AutoencoderKLLTXVideo":
        mean, std = model.latents_mean.detach().float().cpu(), model.latents_std.detach().float().cpu()
        return mean, float(cfg.scaling_factor) / std
    raise TypeError(f"unsupported diffusers VAE class {name}; supported: {', '.join(SUPPORTED_CLASSES)}")


class PretrainedVideoVAE(nn.Module, VideoVAEShapes):
    """A diffusers video VAE with lvd's interface (:class:`lvd.vae.interface.VideoVAE`): ``encode`` gives
    normalised latents, ``decode`` takes them.

    ``model`` stays the diffusers module (``vae.model``), so its own options (``enable_slicing``, …) remain
    reachable. ``enable_tiling(**kwargs)`` forwards to the diffusers model's own ``enable_tiling``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if type(model).__name__ not in SUPPORTED_CLASSES:
            raise TypeError(f"unsupported diffusers VAE class {type(model).__name__}; "
                            f"supported: {', '.join(SUPPORTED_CLASSES)}")
        self.model = model
        self._temporal, self._spatial = _factors(model)
        shift, mul = _normalisation(model)
        self.register_buffer("latent_shift", shift, persistent=False)
        self.register_buffer("latent_mul", mul, persistent=False)

    @property
    def temporal_compression(self) -> int:
        return self._temporal

    @property
    def spatial_compression(self) -> int:
        return self._spatial

    @property
    def latent_channels(self) -> int:
        return _latent_channels(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _vae_name(self) -> str:
        return type(self.model).__name__

    def _video_channels(self) -> int:
        return self.model.config.in_channels

    def _stats(self, like: torch.Tensor):
        shape = (1, -1, 1, 1, 1)
        return (self.latent_shift.to(like.device, like.dtype).view(shape),
                self.latent_mul.to(like.device, like.dtype).view(shape))

    def encode(self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None):
        """Video (B, 3, T, H, W) in [−1, 1] → normalised latents (B, C, T', H', W')."""
        self._check_video(video)
        dist = self.model.encode(video).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        shift, mul = self._stats(z)
        return (z - shift) * mul

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T', H', W') → video in ≈[−1, 1]."""
        self._check_latents(latents)
        shift, mul = self._stats(latents)
        return self.model.decode(latents / mul + shift).sample

    def enable_tiling(self, **kwargs) -> None:
        self.model.enable_tiling(**kwargs)

    def disable_tiling(self) -> None:
        self.model.disable_tiling()

    @property
    def tiling_enabled(self) -> bool:
        return bool(getattr(self.model, "use_tiling", False))


def as_video_vae(module: nn.Module) -> VideoVAE:
    """Our :class:`CausalVideoVAE` or a :class:`PretrainedVideoVAE` unchanged; a supported diffusers VAE wrapped."""
    if isinstance(module, (CausalVideoVAE, PretrainedVideoVAE)):
        return module
    return PretrainedVideoVAE(module)


def _read_class_name(folder: Path) -> str:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"load_vae: {folder / 'config.json'} is not valid JSON: {err}") from err
    name = cfg.get("_class_name")
    if not name:
        raise ValueError(f"load_vae: {folder / 'config.json'} has no _class_name")
    return name


def load_vae(name_or_path: str | Path, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> VideoVAE:
    """A VAE with lvd's interface from a preset name (random weights), a folder saved by
    ``CausalVideoVAE.save_pretrained``, a diffusers VAE folder, or a pipeline folder with a ``vae/`` subfolder.

    The class is chosen by ``_class_name`` in ``config.json``. Nothing is downloaded.
    """
    name = str(name_or_path)
    if name in VAE_PRESETS:
        vae = CausalVideoVAE.from_preset(name)
    else:
        folder = Path(name_or_path)
        if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"load_vae: {name!r} is neither a preset ({', '.join(sorted(VAE_PRESETS))}) "
                                    f"nor a folder with config.json")
        cls_name = _read_class_name(folder)
        if cls_name == CausalVideoVAE.__name__:
            vae = CausalVideoVAE.from_pretrained(folder, local_files_only=True)
        elif cls_name in SUPPORTED_CLASSES:
            vae = PretrainedVideoVAE(_diffusers_class(cls_name).from_pretrained(folder, local_files_only=True))
        else:
            raise ValueError(f"load_vae: {folder / 'config.json'} names class {cls_name!r}; supported: "
                             f"{CausalVideoVAE.__name__}, {', '.join(SUPPORTED_CLASSES)}")
    if device is not None or dtype is not None:
        vae = vae.to(device=device, dtype=dtype)
    return vae.eval()
