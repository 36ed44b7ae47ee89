"""Stage 2: the video diffusion transformer (:class:`VideoDiT`) and its 3D RoPE."""

from lvd.dit.model import DIT_PRESETS, VideoDiT, count_parameters

__all__ = ["DIT_PRESETS", "VideoDiT", "count_parameters"]
