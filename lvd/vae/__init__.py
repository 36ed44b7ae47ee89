"""Stage 1: the video autoencoder.

``load_vae(name_or_path)`` gives one interface, the :class:`VideoVAE` protocol (:mod:`lvd.vae.interface`),
over our :class:`CausalVideoVAE` (a preset or a folder we saved) and pretrained diffusers video VAEs
(CogVideoX, Wan, HunyuanVideo, LTX-Video): ``encode(video) -> normalised latents``,
``decode(latents) -> video``, ``temporal_compression``, ``spatial_compression``, ``latent_channels``,
``latent_shape``, ``frames_for``, ``check_input``, ``enable_tiling`` / ``disable_tiling``.
"""

from lvd.vae.interface import VideoVAE, nearest_frame_counts
from lvd.vae.model import VAE_PRESETS, CausalVideoVAE, DiagonalGaussian, calibrate_latent_stats
from lvd.vae.pretrained import PretrainedVideoVAE, as_video_vae, load_vae
from lvd.vae.tiling import TilingConfig

__all__ = [
    "VAE_PRESETS",
    "CausalVideoVAE",
    "DiagonalGaussian",
    "PretrainedVideoVAE",
    "TilingConfig",
    "VideoVAE",
    "as_video_vae",
    "calibrate_latent_stats",
    "load_vae",
    "nearest_frame_counts",
]
