"""What the shard loaders do with one sample: choose its bucket from metadata, then decode it into a batch item.

:class:`ClipCodec` reads ``{mp4, txt, json}`` clip samples, :class:`LatentCodec` latent samples
(:mod:`lvd.data.latents`). Both raise :class:`SkipSample` with a one-line reason for a sample to skip; the
stream in :mod:`lvd.data.loader` counts it and logs it with its shard and key.

A clip's decoding is bounded (:mod:`lvd.data.safety`): its json may declare no more than the ceiling
(``max_side``, ``max_frames``), its mp4's stream header (read without decoding) no more than its json, and
the decode itself stops at the json's frame count and at the bytes such frames take.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from lvd.text_embeddings import TextEmbeddings
from lvd.data import latents as latent_format
from lvd.data.safety import VideoLimits, size_problem
from lvd.video_io import VideoReadError, decode_video_bytes, probe_video_bytes

__all__ = ["Bucket", "choose_bucket", "crop_clip", "SkipSample", "decode_bounded", "ClipCodec", "LatentCodec"]


@dataclasses.dataclass
class Bucket:
    """Samples of one (frames, height, width) batched ``batch_size`` at a time."""

    frames: int
    height: int
    width: int
    batch_size: int




def choose_bucket(buckets: list[Bucket], frames: int, height: int, width: int) -> int | None:
    """Index of the bucket for a clip of ``frames`` x ``height`` x ``width``, or None if none fits.

    A bucket fits when it needs no more frames than the clip has. Among those, prefer (in order)
    the closest aspect ratio (|log ratio| to 0.1), then no upscaling, then the largest area,
    then the most frames. So 1024 px sources land in a 1024 px bucket, 512 px ones in 512 px.
    """
    best, best_key = None, None
    for i, b in enumerate(buckets):
        if b.frames > frames:
            continue
        aspect = round(abs(math.log((b.width / b.height) / (width / height))), 1)
        upscale = b.height > height or b.width > width
        key = (aspect, upscale, -b.height * b.width, -b.frames)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def crop_clip(video: torch.Tensor, bucket: Bucket, rng: np.random.Generator | None) -> torch.Tensor:
    """(C, T0, H0, W0) float -> (C, T, H, W): temporal window, resize to cover, crop.

    ``rng`` None takes the first frames and the centre; otherwise a random window and position.
    """
    c, t0, h0, w0 = video.shape
    t, h, w = bucket.frames, bucket.height, bucket.width
    s = int(rng.integers(0, t0 - t + 1)) if rng is not None else 0
    video = video[:, s : s + t]  # (C, T, H0, W0)
    scale = max(h / h0, w / w0)  # the smallest resize that covers the target
    rh, rw = max(h, round(h0 * scale)), max(w, round(w0 * scale))
    if (rh, rw) != (h0, w0):
        frames = video.permute(1, 0, 2, 3)  # (T, C, H0, W0): interpolate treats T as the batch
        frames = F.interpolate(frames, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        video = frames.permute(1, 0, 2, 3).clamp_(-1, 1)  # (C, T, rh, rw)
    rh, rw = video.shape[-2:]
    y = int(rng.integers(0, rh - h + 1)) if rng is not None else (rh - h) // 2
    x = int(rng.integers(0, rw - w + 1)) if rng is not None else (rw - w) // 2
    return video[:, :, y : y + h, x : x + w].contiguous()  # (C, T, H, W)


class SkipSample(Exception):
    """A sample to skip; the message is the reason."""


def _caption(sample: dict) -> str:
    if "txt" not in sample:
        raise SkipSample("missing caption")
    try:
        return bytes(sample["txt"]).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SkipSample("caption not UTF-8") from None


def decode_bounded(data: bytes, declared: tuple[int, int, int] | None, limits: VideoLimits,
                   output: str = "uint8") -> torch.Tensor:
    """Decode mp4 bytes -> (C, T, H, W) only when their stream header (read without decoding) fits
    ``declared`` (the json's frames, height, width; None: only the ceiling) and ``limits``; the decode stops
    at that many frames of that size. SkipSample with the reason otherwise."""
    try:
        info = probe_video_bytes(data)
    except VideoReadError as e:
        raise SkipSample(f"undecodable mp4 ({e})") from None
    problem = size_problem(info.num_frames, info.height, info.width, limits, declared, what="mp4")
    if problem:
        raise SkipSample(problem)
    t, h, w = declared or (limits.max_frames, limits.max_side, limits.max_side)
    bound = (min(t, limits.max_frames), min(h, limits.max_side), min(w, limits.max_side))
    try:
        return decode_video_bytes(data, output=output, max_shape=bound)
    except VideoReadError as e:
        raise SkipSample(f"undecodable mp4 ({e})") from None


class ClipCodec:
    """``{mp4, txt, json}`` samples -> video batches; ``cfg`` is a :class:`lvd.data.loader.ClipDataConfig`."""

    def __init__(self, cfg):
        self.buckets = cfg.bucket_list()
        self.random_crop = cfg.random_crop
        self.limits = VideoLimits(cfg.max_side, cfg.max_frames)

    @staticmethod
    def declared(sample: dict) -> tuple[int, int, int]:
        """(frames, height, width) from the sample's json; SkipSample when it lacks them."""
        if "json" not in sample:
            raise SkipSample("missing json")
        try:
            meta = json.loads(bytes(sample["json"]).decode("utf-8"))
            t, h, w = int(meta["num_frames"]), int(meta["height"]), int(meta["width"])
        except KeyError as e:
            raise SkipSample(f"json metadata lacks {e}") from None
        except (ValueError, TypeError, UnicodeDecodeError, AttributeError):
            raise SkipSample("unreadable json metadata") from None
        if min(t, h, w) < 1:
            raise SkipSample(f"json metadata declares an empty clip ({t}x{h}x{w})")
        return t, h, w

    def bucket(self, sample: dict) -> int:
        if "mp4" not in sample:
            raise SkipSample("missing mp4")
        t, h, w = self.declared(sample)
        problem = size_problem(t, h, w, self.limits, what="json")
        if problem:
            raise SkipSample(problem)
        b = choose_bucket(self.buckets, t, h, w)
        if b is None:
            raise SkipSample(f"clip of {t} frames is shorter than every bucket")
        return b

    def decode(self, sample: dict, bucket: int, rng: np.random.Generator) -> dict:
        caption = _caption(sample)
        video = decode_bounded(sample["mp4"], self.declared(sample), self.limits, output="float")  # (C, T0, H0, W0)
        b = self.buckets[bucket]
        if video.shape[1] < b.frames:
            raise SkipSample(f"mp4 holds {video.shape[1]} frames, bucket needs {b.frames}")
        video = crop_clip(video, b, rng if self.random_crop else None)
        return {"video": video, "caption": caption, "key": sample["__key__"]}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        return {
            "video": torch.stack([it["video"] for it in items]),  # (B, C, T, H, W)
            "caption": [it["caption"] for it in items],
            "key": [it["key"] for it in items],
        }


class LatentCodec:
    """Latent samples (:mod:`lvd.data.latents`) -> latent batches, bucketed by exact latent shape.

    Clips cached into several buckets (``lvd.cache_latents --buckets``) give latents of several
    shapes, mixed in one shard; each batch holds one shape.
    """

    def __init__(self, cfg):
        self.batch_size = cfg.batch_size
        self.sizes = {(b.frames, b.height, b.width): b.batch_size for b in cfg.buckets}

    def bucket(self, sample: dict) -> tuple:
        data = sample.get(latent_format.MEMBER)
        if data is None:
            raise SkipSample(f"missing {latent_format.MEMBER}")
        try:
            return latent_format.latent_shape(data)  # (C, T', H', W')
        except ValueError as e:
            raise SkipSample(str(e)) from None

    def batch_size_of(self, shape: tuple) -> int:
        return self.sizes.get(tuple(shape[1:]), self.batch_size)

    def decode(self, sample: dict, bucket, rng) -> dict:
        caption = _caption(sample)
        try:
            latents, text = latent_format.decode_sample(sample[latent_format.MEMBER])
        except Exception as e:  # safetensors raises its own error types for corrupt bytes
            raise SkipSample(f"undecodable safetensors ({type(e).__name__})") from None
        return {"latents": latents, "text": text, "caption": caption, "key": sample["__key__"]}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        rows = [it["text"] for it in items]
        n = max(r.states.shape[0] for r in rows)
        states = torch.zeros(len(rows), n, rows[0].states.shape[1], dtype=rows[0].states.dtype)
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, r in enumerate(rows):  # pad text to the longest in the batch; padding is masked out
            states[i, : r.states.shape[0]] = r.states
            mask[i, : r.mask.shape[0]] = r.mask
        return {
            "latents": torch.stack([it["latents"].float() for it in items]),  # (B, C, T', H', W')
            "text": TextEmbeddings(states, mask, torch.stack([r.pooled for r in rows])),  # (B, L, D), (B, L), (B, Dp)
            "caption": [it["caption"] for it in items],
            "key": [it["key"] for it in items],
        }


