"""The VAE interface stage 2 relies on: the :class:`VideoVAE` protocol and its one set of shape checks.

A video VAE maps video ``(B, C_in, T, H, W)`` in [−1, 1] with ``T = 1 + r·k`` frames and H, W multiples of
``s`` to *normalised* latents ``(B, C, 1 + k, H/s, W/s)`` and back, where ``r = temporal_compression`` and
``s = spatial_compression`` (the causal VAE keeps the first frame on its own and compresses the rest r× in
time)::

    latent_shape(T, H, W) = (C, 1 + (T − 1)/r, H/s, W/s)        frames_for(T') = 1 + r·(T' − 1)

Our :class:`lvd.vae.CausalVideoVAE` and :class:`lvd.vae.PretrainedVideoVAE` (any supported diffusers
video VAE) implement it; both take their shape checks from :class:`VideoVAEShapes`, so a bad frame count
or frame size gives the same error, naming the valid values, whichever VAE is loaded.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class VideoVAE(Protocol):
    """What stage 2 (cache_latents, the pipeline, sampling) may call on a video VAE.

    ``isinstance(vae, VideoVAE)`` checks that every member exists (not their signatures).
    """

    @property
    def temporal_compression(self) -> int: ...  # r: video frames per latent frame after the first

    @property
    def spatial_compression(self) -> int: ...  # s: pixels per latent pixel along H and W

    @property
    def latent_channels(self) -> int: ...  # C

    def encode(self, video: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Video (B, C_in, T, H, W) in [−1, 1] → normalised latents (B, C, T', H', W')."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T', H', W') → video (B, C_out, 1 + r·(T' − 1), H'·s, W'·s) in ≈[−1, 1]."""

    def check_input(self, num_frames: int, height: int, width: int) -> None:
        """Raise a ValueError naming the valid values unless T = 1 + r·k and s divides H and W."""

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latents of a (T, H, W) clip; raises like :meth:`check_input`."""

    def frames_for(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` latent frames: 1 + r·(T' − 1)."""

    @property
    def tiling_enabled(self) -> bool: ...  # whether encode/decode run tiled/chunked now

    def enable_tiling(self, **kwargs) -> None:
        """Encode/decode in tiles and chunks to bound memory (options depend on the implementation)."""

    def disable_tiling(self) -> None:
        """Encode/decode whole clips again."""


def nearest_frame_counts(num_frames: int, temporal_compression: int) -> tuple[int, ...]:
    """The valid frame counts (1 + r·k) nearest ``num_frames``: itself if valid, else the one below and the
    one above (only 1 below 1)."""
    r = temporal_compression
    if num_frames < 1:
        return (1,)
    below = 1 + r * ((num_frames - 1) // r)
    return (below,) if below == num_frames else (below, below + r)


class VideoVAEShapes:
    """The shape checks of :class:`VideoVAE`, written once, for a class that defines ``temporal_compression``,
    ``spatial_compression``, ``latent_channels`` and the two below."""

    def _vae_name(self) -> str:
        """The name errors start with."""
        return type(self).__name__

    def _video_channels(self) -> int:
        """C_in of the videos ``encode`` takes."""
        raise NotImplementedError

    def check_input(self, num_frames: int, height: int, width: int) -> None:
        """Raise a ValueError naming the valid values unless T = 1 + r·k and s divides H and W."""
        r, s, problems = self.temporal_compression, self.spatial_compression, []
        if num_frames < 1 or (num_frames - 1) % r:
            near = " or ".join(map(str, nearest_frame_counts(num_frames, r)))
            problems.append(f"frame count must be 1 + {r}·k (1, {1 + r}, {1 + 2 * r}, ...), got {num_frames} "
                            f"(nearest: {near})")
        if height % s or width % s or height < s or width < s:
            problems.append(f"height and width must be positive multiples of {s}, got {height}x{width}")
        if problems:
            raise ValueError(f"{self._vae_name()} input: " + "; ".join(problems))

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latents of a (T, H, W) clip."""
        self.check_input(num_frames, height, width)
        r, s = self.temporal_compression, self.spatial_compression
        return (self.latent_channels, 1 + (num_frames - 1) // r, height // s, width // s)

    def frames_for(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` (≥ 1) latent frames: 1 + r·(T' − 1)."""
        if latent_frames < 1:
            raise ValueError(f"{self._vae_name()}: latent frame count must be >= 1, got {latent_frames}")
        return 1 + self.temporal_compression * (latent_frames - 1)

    def _check_video(self, video: torch.Tensor) -> None:
        c = self._video_channels()
        if video.ndim != 5 or video.shape[1] != c:
            raise ValueError(f"{self._vae_name()} expects video (B, {c}, T, H, W), got shape {tuple(video.shape)}")
        self.check_input(*video.shape[2:])

    def _check_latents(self, z: torch.Tensor) -> None:
        c = self.latent_channels
        if z.ndim != 5 or z.shape[1] != c:
            raise ValueError(f"{self._vae_name()} expects latents (B, {c}, T', H', W'), got shape {tuple(z.shape)}")
