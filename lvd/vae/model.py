"""Causal 3D convolutional video VAE (stage 1).

A KL autoencoder (Kingma & Welling 2014; Rombach et al. 2022, "latent diffusion") for video, built
the way CogVideoX (Yang et al. 2024) and Wan (2025) build theirs:

- every temporal convolution is *causal*: output frame ``t`` sees input frames ``<= t`` only. The
  front of the clip is padded with copies of frame 0, so the first frame is encoded on its own
  and a clip of ``1 + r·k`` frames gives ``1 + k`` latent frames (``r = temporal_compression``);
- space is compressed ``spatial_compression``× by stride-2 convolutions;
- GroupNorm (+SiLU) runs through ``lvd.kernels.GroupNorm(..., per_frame=True)``: statistics per frame,
  so a frame's activations never depend on later frames, and decoding in temporal chunks with a
  carried convolution cache (:mod:`lvd.vae.tiling`) equals decoding the whole clip to float rounding;
- the optional mid-block attention is spatial, within each frame (keeps both properties);
- two block layouts (``block_type``): ``"resnet"``, pre-norm residual blocks of causal 3×3×3 convs as in
  CogVideoX/Wan (``small``, ``base``); and ``"conv"``, a shallow post-norm chain (conv → GroupNorm → SiLU)
  of 1×3×3 spatial convs with all temporal mixing in the causal stride-2 down/up convs (``tiny``). On the
  64×64 moving-shapes clips (``recipes/configs/shapes_vae.yaml``) the small ``conv`` layout learns far sooner
  than the deeper ``resnet`` one, which sits on the all-black-background plateau for its first steps
  (figures in ``benchmarks/results/shapes_vae.json``): at this scale depth delays learning more than it adds
  capacity;
- the encoder outputs the mean and log-variance of a diagonal Gaussian posterior ``q(z|x)``.

Latent normalisation: ``encode()`` returns ``(z − latent_mean) / latent_std`` per channel and
``decode()`` undoes it. The two vectors live in the config (``config.json``), are measured by
:func:`calibrate_latent_stats`, and are the only normalisation constants in lvd.
"""

from __future__ import annotations

import math
from typing import Iterable
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from lvd.vae import tiling
from lvd.vae.interface import VideoVAEShapes
from lvd.vae.layers import (STREAM_PIECE_BYTES, CausalConv3d, ConvDecoder, ConvEncoder, Decoder, DiagonalGaussian,
                            Encoder)

# Named sizes. ``tiny`` trains on 64×64×17 clips on a 2-core CPU; ``base`` has CogVideoX's widths and
# depths (CogVideoX: 216 M parameters; Wan: 96·(1,2,4,4), 127 M).
VAE_PRESETS: dict[str, dict] = {
    "tiny": dict(block_type="conv", block_out_channels=(32, 64, 64), spatial_compression=4,
                 temporal_compression=4, norm_num_groups=8, mid_attention=False),
    "small": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, spatial_compression=8,
                  temporal_compression=4, norm_num_groups=32, mid_attention=True),
    "base": dict(block_out_channels=(128, 256, 256, 512), layers_per_block=3, spatial_compression=8,
                 temporal_compression=4, norm_num_groups=32, mid_attention=False),
}


def _log2_exact(value: int, name: str) -> int:
    n = int(round(math.log2(value))) if value >= 1 else -1
    if n < 0 or 2**n != value:
        raise ValueError(f"CausalVideoVAE: {name} must be a power of 2 (1, 2, 4, 8, ...), got {value}")
    return n


class CausalVideoVAE(ModelMixin, ConfigMixin, VideoVAEShapes):
    """Causal 3D conv KL-VAE. Video (B, 3, 1 + r·k, H, W) in [−1, 1] ↔ latents (B, C, 1 + k, H/s, W/s).

    Implements :class:`lvd.vae.interface.VideoVAE` (shape checks from :class:`VideoVAEShapes`).

    ``encode``/``decode`` work on *normalised* latents (per-channel ``latent_mean``/``latent_std``
    from the config); ``encode_posterior``/``decode_raw``/``forward`` on raw ones, for training.
    ``enable_tiling()`` switches ``encode``/``decode``/``encode_posterior``/``decode_raw`` to spatial
    tiles × temporal chunks (see :mod:`lvd.vae.tiling` for the exactness guarantees); ``forward`` always
    runs the whole clip, since training needs the full graph.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 16,
        block_type: str = "resnet",
        block_out_channels: tuple[int, ...] = (128, 256, 256, 512),
        layers_per_block: int = 2,
        spatial_compression: int = 8,
        temporal_compression: int = 4,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        mid_attention: bool = True,
        dropout: float = 0.0,
        latent_mean: tuple[float, ...] | None = None,
        latent_std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        n_spatial = _log2_exact(spatial_compression, "spatial_compression")
        n_temporal = _log2_exact(temporal_compression, "temporal_compression")
        block_out_channels = tuple(block_out_channels)
        problems = []
        if block_type not in ("resnet", "conv"):
            problems.append(f"block_type must be 'resnet' or 'conv', got {block_type!r}")
        if max(n_spatial, n_temporal) > len(block_out_channels) - 1:
            problems.append(f"{len(block_out_channels)} stages allow at most {2 ** (len(block_out_channels) - 1)}× "
                            f"compression, got spatial {spatial_compression}, temporal {temporal_compression}")
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            problems.append(f"block_out_channels {bad} are not divisible by norm_num_groups={norm_num_groups}")
        for name, stats in (("latent_mean", latent_mean), ("latent_std", latent_std)):
            if stats is not None and len(stats) != latent_channels:
                problems.append(f"{name} has {len(stats)} values, expected latent_channels={latent_channels}")
        if latent_std is not None and min(latent_std) <= 0:
            problems.append(f"latent_std must be positive, got {list(latent_std)}")
        if problems:
            raise ValueError("CausalVideoVAE config: " + "; ".join(problems))

        common = dict(block_out_channels=block_out_channels, n_spatial=n_spatial, n_temporal=n_temporal,
                      groups=norm_num_groups, eps=norm_eps)
        if block_type == "conv":
            self.encoder = ConvEncoder(in_channels, 2 * latent_channels, **common)
            self.decoder = ConvDecoder(latent_channels, out_channels, **common)
        else:
            common.update(layers_per_block=layers_per_block, dropout=dropout, mid_attention=mid_attention)
            self.encoder = Encoder(in_channels, 2 * latent_channels, **common)
            self.decoder = Decoder(latent_channels, out_channels, **common)
        self.tiling: tiling.TilingConfig | None = None
        self.cpu_channels_last = True  # see _inference_layout

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CausalVideoVAE":
        """Build a preset (random weights) from :data:`VAE_PRESETS`, with keyword overrides."""
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}")
        return cls(**{**VAE_PRESETS[name], **overrides})

    # ----- sizes and checks ---------------------------------------------------------------------
    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_compression

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def _video_channels(self) -> int:
        return self.config.in_channels

    # ----- tiling switches -------------------------------------------------------------------------
    def enable_tiling(self, tile_size: int = 256, overlap: int = 64, chunk_latent_frames: int = 1,
                      spatial: bool = True, temporal: bool = True, encode_chunk_frames: int = 1) -> None:
        """Process encode/decode in spatial tiles (``tile_size`` px, ``overlap`` px blended linearly)
        and temporal chunks: ``encode_chunk_frames`` video frames per encoder call, ``chunk_latent_frames``
        latent frames per decoder call; see :class:`tiling.TilingConfig`."""
        cfg = tiling.TilingConfig(tile_size=tile_size, overlap=overlap, chunk_latent_frames=chunk_latent_frames,
                                  spatial=spatial, temporal=temporal, encode_chunk_frames=encode_chunk_frames)
        cfg.validate(self.spatial_compression)
        self.tiling = cfg

    def disable_tiling(self) -> None:
        self.tiling = None

    @property
    def tiling_enabled(self) -> bool:
        return self.tiling is not None

    def set_stream_piece_bytes(self, piece_bytes: int = STREAM_PIECE_BYTES) -> None:
        """Input bytes per oneDNN call of every streaming causal conv (tiled/chunked encode and decode); the
        results do not depend on it (1 runs every conv one output frame per call, as the tests do)."""
        if piece_bytes < 1:
            raise ValueError(f"set_stream_piece_bytes: piece_bytes must be >= 1, got {piece_bytes}")
        for module in self.modules():
            if isinstance(module, CausalConv3d):
                module.stream_piece_bytes = int(piece_bytes)

    def set_cpu_channels_last(self, enabled: bool = True) -> None:
        """Run CPU fp32 inference channels-last (the default, see :meth:`_inference_layout`) or in the default
        layout (``False``); the results are the same to float rounding."""
        self.cpu_channels_last = bool(enabled)

    # ----- raw (training) interface ---------------------------------------------------------------
    # CPU inference runs channels-last (memory (B, T, H, W, C)): oneDNN convolves that layout without
    # reordering it into its blocked one, and a causal conv's frame window is then a contiguous view. The
    # base preset on 17×256², 2 threads: chunked encode 26.4 s instead of 32.8 s, chunked decode 55.0 s instead of
    # 67.4 s, at 91% / 85% of the memory (benchmarks/results/vae.json against vae_default_layout.json).
    # Results equal the default layout's to float rounding. Training (autograd) keeps the default layout.
    # Switched per instance by set_cpu_channels_last().
    def _inference_layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_channels_last and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def encode_posterior(self, video: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for video (B, 3, T, H, W) in [−1, 1]; raw (un-normalised) latent space."""
        self._check_video(video)
        video = self._inference_layout(video)
        if self.tiling is None:
            return DiagonalGaussian(self.encoder(video).contiguous())
        return DiagonalGaussian(tiling.encode_moments(self.encoder, video, self.tiling,
                                                      self.spatial_compression).contiguous())

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, T', H', W') → video (B, 3, 1 + r·(T'−1), H'·s, W'·s)."""
        self._check_latents(z)
        z = self._inference_layout(z)
        if self.tiling is None:
            return self.decoder(z).contiguous()
        return tiling.decode_latents(self.decoder, z, self.tiling, self.spatial_compression,
                                     self.temporal_compression, self.config.out_channels)

    def forward(self, video: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Reconstruct a clip for training: returns ``(recon, posterior)``, always on the whole clip."""
        self._check_video(video)
        posterior = DiagonalGaussian(self.encoder(video))
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decoder(z), posterior

    # ----- normalised (stage 2) interface ---------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.latent_channels
        mean = self.config.latent_mean if self.config.latent_mean is not None else [0.0] * c
        std = self.config.latent_std if self.config.latent_std is not None else [1.0] * c
        shape = (1, c, 1, 1, 1)
        return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(shape),
                torch.tensor(std, device=like.device, dtype=like.dtype).view(shape))

    def encode(self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None):
        """Video (B, 3, T, H, W) in [−1, 1] → normalised latents (z − latent_mean) / latent_std."""
        posterior = self.encode_posterior(video)
        z = posterior.sample(generator) if sample else posterior.mode()
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → video in ≈[−1, 1] (not clamped)."""
        self._check_latents(latents)
        mean, std = self._latent_stats(latents)
        return self.decode_raw(latents * std + mean)


@torch.no_grad()
def calibrate_latent_stats(vae: CausalVideoVAE, batches: Iterable, *, max_batches: int | None = None,
                           sample: bool = False, generator: torch.Generator | None = None):
    """Measure per-channel mean and std of the raw latents over ``batches`` and store them in the config.

    ``batches`` yields video tensors (B, 3, T, H, W) or loader dicts with a ``"video"`` key. Uses the
    posterior mean (``sample=False``, matching ``encode()``'s default) or a sample. Statistics are
    accumulated in float64 over every (b, t, h, w) position. Afterwards ``vae.encode`` returns latents
    with ≈ zero mean and unit variance per channel on that data. Returns ``(mean, std)``, float32 (C,).
    """
    total = total_sq = None
    count = 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        video = batch["video"] if isinstance(batch, dict) else batch
        video = video.to(device=vae.device, dtype=vae.dtype)
        posterior = vae.encode_posterior(video)
        z = (posterior.sample(generator) if sample else posterior.mode()).double()
        z = rearrange(z, "b c t h w -> c (b t h w)")  # (C, N)
        total = z.sum(1) if total is None else total + z.sum(1)
        total_sq = z.pow(2).sum(1) if total_sq is None else total_sq + z.pow(2).sum(1)
        count += z.shape[1]
    if count == 0:
        raise ValueError("calibrate_latent_stats: no batches were given")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    vae.register_to_config(latent_mean=[float(v) for v in mean], latent_std=[float(v) for v in std])
    return mean.float(), std.float()
