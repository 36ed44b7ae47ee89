"""Clean first frames for :class:`lvd.pipeline.LVDPipeline`: image-to-video, ``video=`` and :meth:`extend`.

An image or the first frames of a clip are encoded with the VAE into k clean latent frames, which
:func:`lvd.pipeline.sampling.sample` keeps exactly while it denoises the rest (``clean_latents``). Our causal VAE encodes
frame 0 alone and k latent frames from the first ``1 + r·(k − 1)`` frames only (r = the temporal factor, 4), so
the prefix's latents are the first k latent frames of the whole clip it starts: an image gives k = 1, a clip of
``1 + r·(k − 1)`` frames gives k. Other frame counts are refused, not trimmed (as ``num_frames`` is never
rounded): trimming would silently drop the frames a continuation should follow.

Accepted inputs (:func:`as_video_frames`), each an image or a video:

- a ``PIL.Image`` (an image) or a list of them (a video, e.g. ``output_type="pil"``'s frames);
- a numpy array (H, W, 3) or (T, H, W, 3): uint8 in 0..255, or float in [0, 1] (``output_type="np"``'s frames);
- a torch tensor (3, H, W) or (3, T, H, W): uint8 in 0..255 (:func:`lvd.video_io.read_video`), or float in
  [−1, 1], the VAE's range (``read_video(..., output="float")``, :meth:`LVDPipeline.decode_latents`).

A model trained with clean frames (``VideoDiT(clean_frame_conditioning=True)``, the stage-2 recipe's
``clean_frames.prob`` > 0) is told which frames are clean; any other model still gets the prefix kept clean at
every step, but was never taught to continue it, so the rest follows it only loosely (a warning says so).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import PIL.Image
import torch

from lvd.pipeline.output import LVDPipelineOutput, onload


log = logging.getLogger("lvd.pipeline")

__all__ = ["CleanFramesMixin", "as_video_frames"]


def as_video_frames(value, what: str = "image") -> torch.Tensor:
    """``value`` (see the module docstring) as a video (3, T, H, W) float32 in [−1, 1]; an image has T = 1.
    ValueError naming ``what`` when it is none of the accepted kinds."""
    if isinstance(value, PIL.Image.Image):
        value = np.asarray(value.convert("RGB"))
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, PIL.Image.Image) for v in value):
        value = np.stack([np.asarray(v.convert("RGB")) for v in value])
    if isinstance(value, np.ndarray):
        if value.ndim not in (3, 4) or value.shape[-1] != 3:
            raise ValueError(f"{what}: a numpy array must be (H, W, 3) or (T, H, W, 3), got {value.shape}")
        frames = torch.from_numpy(np.array(value))  # a copy: PIL's arrays are read-only
        frames = frames[None] if frames.ndim == 3 else frames
        frames = frames.permute(3, 0, 1, 2)  # (3, T, H, W)
        if frames.dtype == torch.uint8:
            return frames.float() / 127.5 - 1
        if frames.is_floating_point():
            return frames.float() * 2 - 1
        raise ValueError(f"{what}: a numpy array must be uint8 or float in [0, 1], got {value.dtype}")
    if isinstance(value, torch.Tensor):
        if value.ndim not in (3, 4) or value.shape[0] != 3:
            raise ValueError(f"{what}: a tensor must be (3, H, W) or (3, T, H, W), got {tuple(value.shape)}")
        frames = value.detach().cpu()
        frames = frames[:, None] if frames.ndim == 3 else frames
        if frames.dtype == torch.uint8:
            return frames.float() / 127.5 - 1
        if frames.is_floating_point():
            return frames.float()
        raise ValueError(f"{what}: a tensor must be uint8 or float in [-1, 1], got {value.dtype}")
    raise ValueError(f"{what}: expected a PIL image (or a list of them), a numpy array or a torch tensor, got "
                     f"{type(value).__name__}")


class CleanFramesMixin:
    """The image / video conditioning of :class:`lvd.pipeline.LVDPipeline`: ``__call__(image=…, video=…)``
    and :meth:`extend`."""

    def _given_frames(self, image, video, height: int | None, width: int | None):
        """``("image" | "video", frames (3, T, H, W) in [−1, 1], height, width)``, or ``(None, None, height,
        width)`` without either; a height or width not given is the frames' (64 without frames)."""
        if image is not None and video is not None:
            raise ValueError("LVDPipeline: give image= or video=, not both")
        if image is None and video is None:
            return None, None, 64 if height is None else height, 64 if width is None else width
        what = "image" if image is not None else "video"
        frames = as_video_frames(image if image is not None else video, what)
        if what == "image" and frames.shape[1] != 1:
            raise ValueError(f"LVDPipeline: image= is one frame, got {frames.shape[1]}; pass a clip as video=")
        h, w = frames.shape[2:]
        return what, frames, h if height is None else height, w if width is None else width

    def encode_clean_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (3, T, H, W) in [−1, 1], T = 1 + r·(k − 1) → clean latents (1, C', k, H', W') float32 on the
        execution device (the VAE posterior's mean, normalised as the training latents are)."""
        vae = self.video_vae
        warned = self.__dict__.setdefault("_clean_frames_warned", set())  # once per transformer, not per window
        if not getattr(self.transformer, "config", {}).get("clean_frame_conditioning", False) and (
                id(self.transformer) not in warned):
            warned.add(id(self.transformer))
            log.warning("LVDPipeline: the transformer was not trained with clean frames (clean_frame_conditioning is "
                        "off); the given frames are kept, but the rest of the video may not follow them")
        vae_module = self.vae
        onload(vae_module)  # the offload hook, as decode_latents fires it
        with torch.no_grad():
            latents = vae.encode(frames[None].to(device=vae_module.device, dtype=vae_module.dtype))
        return latents.to(device=self._execution_device, dtype=torch.float32)

    @torch.no_grad()
    def extend(self, video, prompt: str | None = None, num_frames: int = 33, *, window_frames: int = 17,
               context_frames: int = 9, output_type: str = "np", vae_tiling: bool | None = None, **kwargs):
        """Continue ``video`` to ``num_frames`` frames in all, by overlapping windows.

        Each window is a ``window_frames`` video generated with ``video=`` the last ``context_frames`` frames of
        what exists so far (``1 + r·(j − 1)`` frames: j clean latent frames); its frames after those are appended.
        The result starts with ``video``'s own frames, unchanged; the last window is cut at ``num_frames``.
        ``video`` is any input of the module docstring; ``prompt`` and the other keyword arguments (steps,
        guidance, generator, negative prompt, embeddings, callbacks) go to every window's ``__call__``.
        Returns an :class:`lvd.pipeline.LVDPipelineOutput` of one video (``output_type`` "np", "pt" or "pil").
        """
        frames = as_video_frames(video, "video")  # (3, T0, H, W)
        fixed = {"image", "video", "num_frames", "height", "width", "latents", "return_dict", "num_videos_per_prompt"}
        problems = [f"extend sets {k} itself" for k in sorted(fixed & set(kwargs))]
        have = frames.shape[1]
        if output_type not in ("np", "pt", "pil"):
            problems.append(f"extend: output_type must be 'np', 'pt' or 'pil', got {output_type!r}")
        if not isinstance(num_frames, int) or num_frames <= have:
            problems.append(f"num_frames={num_frames} is the total length: it must be more than the video's {have}")
        if context_frames > have:
            problems.append(f"the video has {have} frames, fewer than context_frames={context_frames}")
        if window_frames <= context_frames:
            problems.append(f"window_frames={window_frames} must be more than context_frames={context_frames}")
        if problems:
            raise ValueError("LVDPipeline.extend: " + "; ".join(problems))
        pieces, timings = [frames], {"text_encoding": 0.0, "denoising": 0.0, "decoding": 0.0}
        windows = 0
        while have < num_frames:
            out = self(prompt, video=frames[:, -context_frames:], num_frames=window_frames, height=frames.shape[2],
                       width=frames.shape[3], output_type="latent", **kwargs)
            start = time.perf_counter()
            new = self.decode_latents(out.frames, vae_tiling)[0, :, context_frames:].float().cpu()  # [−1, 1]
            timings["decoding"] += time.perf_counter() - start
            pieces.append(new)
            frames = torch.cat([frames[:, -context_frames:], new], dim=1)
            have += new.shape[1]
            windows += 1
            for key in ("text_encoding", "denoising"):
                timings[key] += out.timings.get(key, 0.0)
        timings["windows"] = windows  # the denoising loop ran once per window
        result = torch.cat(pieces, dim=1)[:, :num_frames]  # (3, num_frames, H, W)
        result = self.video_processor.postprocess_video(result[None], output_type=output_type)
        return LVDPipelineOutput(frames=result, timings=timings)
