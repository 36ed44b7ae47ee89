"""Clip shards → latent shards: run the frozen VAE and text encoder once over a dataset.

    python -m lvd.cache_latents --shards "data/shapes/train/shard-{000000..000003}.tar" \\
        --out data/shapes/latents --vae runs/shapes_vae/export --text-encoder PATH_OR_NAME

Each input shard ``shard-000003.tar`` (samples ``{__key__, mp4, txt, json}``) becomes
``OUT/shard-000003.tar`` of latent samples in the format :mod:`lvd.data.latents` owns: the clip's
latents (normalised by the VAE itself) and its caption's text embedding, plus the json with
``latent_shape``.

Multi-resolution: with ``--buckets 64x64,64x112,112x64 --frames 17`` (pixel HEIGHTxWIDTH, frames
1 + 4k) or ``--buckets-from recipes/configs/X_dit.yaml`` (the DiT config's latent buckets, turned into
pixels with the VAE's compression), each clip is resized and centre-cropped into the bucket nearest
its aspect ratio (:func:`lvd.data.loader.choose_bucket`) and trimmed to the bucket's first frames;
its json records ``bucket`` ({frames, height, width}). The latent loader batches each latent shape
apart, so one shard may hold every bucket.

Resumable: a shard is written to a temporary beside it and renamed when finished (:mod:`lvd.atomic`), so it
is either complete or absent; starting the same command again skips every shard already in ``OUT``. The empty prompt's
embedding, which classifier-free-guidance dropout trains with, is written beside the shards
(:func:`lvd.data.latents.write_uncond`). ``OUT/cache.json``
records what made the latents (VAE, text encoder, latent shape) and a second run with a different
VAE or text encoder refuses to mix them into the same folder.

Bad samples never end a run: an unsafe key (``..``, a leading ``/``, a backslash or NUL), a missing member,
an unreadable json, an mp4 that is undecodable, too short, a shape the VAE cannot take, or larger than its
json or ``--max-side``/``--max-frames`` (read from its stream header before decoding, :mod:`lvd.data.safety`)
is skipped, logged in one line naming shard and key, and counted in the closing report.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from lvd.atomic import atomic_write
from lvd.config import folder_problem, run_cli
from lvd.data.safety import VideoLimits, declared_size, key_problem, size_problem
from lvd.inputs import text_encoder_problem, vae_problem

if TYPE_CHECKING:
    from lvd.data.codecs import Bucket

__all__ = ["expand_shards", "parse_buckets", "buckets_from_config", "fit_clip", "cache_shard", "write_uncond", "main"]

log = logging.getLogger("lvd.cache_latents")


def expand_shards(spec: str) -> list[Path]:
    """The training loaders' shard spec: brace patterns joined by ``::`` or a folder of ``*.tar``."""
    from lvd.data.loader import expand_shards as expand

    return [Path(u) for u in dict.fromkeys(expand(spec))]


def parse_buckets(spec: str, frames: int | None) -> list[Bucket]:
    """``"64x64,64x112,112x64"`` (pixel HEIGHTxWIDTH) → buckets of ``frames`` frames (None: each clip's own
    length, so only the picture is fitted). Raises ValueError naming every bad entry."""
    from lvd.data.codecs import Bucket

    buckets, bad = [], []
    for entry in (e.strip() for e in spec.split(",")):
        m = re.fullmatch(r"(\d+)x(\d+)", entry)
        if m is None or min(int(m[1]), int(m[2])) < 1:
            bad.append(entry)
        else:
            buckets.append(Bucket(frames or 0, int(m[1]), int(m[2]), 1))  # frames 0: the clip's own
    if bad or not buckets:
        raise ValueError(f"entries must be HEIGHTxWIDTH in pixels, e.g. 64x64,64x112,112x64; bad: {bad or [spec]}")
    return buckets


def buckets_from_config(path: str | os.PathLike, *, temporal_compression: int, spatial_compression: int) -> list[Bucket]:
    """The pixel buckets whose latents fill a DiT config's ``data.buckets`` (latent T'xH'xW'):
    frames = 1 + r·(T' − 1), height = s·H', width = s·W' for a VAE compressing r× in time and s× in space."""
    import yaml

    from lvd.data.codecs import Bucket

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    latent = (data.get("data") or {}).get("buckets") or []
    if not latent:
        raise ValueError(f"{path}: no data.buckets to cache for")
    r, s = temporal_compression, spatial_compression
    return [Bucket(1 + r * (int(b["frames"]) - 1), s * int(b["height"]), s * int(b["width"]), 1) for b in latent]


def fit_clip(video: torch.Tensor, buckets: list[Bucket]) -> tuple[torch.Tensor, Bucket]:
    """(C, T, H, W) uint8 → (C, T_b, H_b, W_b) float in [-1, 1] and its bucket: the bucket nearest the clip's
    aspect ratio among those it has frames for, resized to cover and centre-cropped, first frames kept.
    Raises ValueError when the clip is shorter than every bucket."""
    from lvd.data.codecs import Bucket, choose_bucket, crop_clip

    c, t, h, w = video.shape
    sized = [Bucket(b.frames or t, b.height, b.width, b.batch_size) for b in buckets]
    i = choose_bucket(sized, t, h, w)
    if i is None:
        raise ValueError(f"{t} frames is fewer than every bucket needs ({sorted({b.frames for b in sized})})")
    x = video.float() / 127.5 - 1.0  # (C, T, H, W) in [-1, 1]
    return crop_clip(x, sized[i], None), sized[i]  # (C, T_b, H_b, W_b)


def _load_clip(s: dict, frames: int | None, buckets: list[Bucket] | None,
               limits: VideoLimits) -> tuple[torch.Tensor, dict]:
    """One sample's clip as (C, T, H, W) float in [-1, 1] (fitted to a bucket when ``buckets``) and its json.

    Raises SkipSample (one line) for a sample to skip: an unsafe key, a missing member, an unreadable json, an
    mp4 larger than its json or ``limits`` (read from its header before decoding), undecodable or too short."""
    from lvd.data.codecs import SkipSample, decode_bounded

    if problem := key_problem(s["__key__"]):
        raise SkipSample(problem)
    for member in ("mp4", "txt"):
        if member not in s:
            raise SkipSample(f"missing {member} (has {sorted(k for k in s if k != '__key__')})")
    try:
        meta = json.loads(s["json"]) if "json" in s else {}
        declared = declared_size(meta) if isinstance(meta, dict) else None
    except (ValueError, UnicodeDecodeError):
        raise SkipSample("unreadable json metadata") from None
    if not isinstance(meta, dict):
        raise SkipSample("unreadable json metadata (not an object)")
    if declared is not None and (problem := size_problem(*declared, limits, what="json")):
        raise SkipSample(problem)
    v = decode_bounded(s["mp4"], declared, limits)  # (C, T, H, W) uint8
    if buckets:
        try:
            x, b = fit_clip(v, buckets)
        except ValueError as e:
            raise SkipSample(f"too short ({e})") from None
        meta["bucket"] = {"frames": b.frames, "height": b.height, "width": b.width}
        return x, meta
    if frames is not None:
        if v.shape[1] < frames:
            raise SkipSample(f"too short ({v.shape[1]} frames, --frames asks for {frames})")
        v = v[:, :frames]
    return v.float() / 127.5 - 1.0, meta


def _readable_samples(src: Path, skip) -> Iterator[dict]:
    """The shard's samples (:func:`lvd.data.shards.read_tar_samples`), stopping (and reporting the shard through
    ``skip``) where the tar is unreadable."""
    from lvd.data.shards import read_tar_samples

    try:
        yield from read_tar_samples(src)
    except (tarfile.TarError, OSError) as e:
        skip("(rest of shard)", f"unreadable tar ({type(e).__name__}: {e})")


def _chunks(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode(chunk: list[dict], videos: list[torch.Tensor], vae, device, dtype, skip) -> list[torch.Tensor | None]:
    """VAE latents of ``videos`` (same-shape groups batched), None for a clip the VAE cannot take (skipped)."""
    latents: list[torch.Tensor | None] = [None] * len(chunk)
    for shape in dict.fromkeys(tuple(v.shape) for v in videos):
        idx = [i for i, v in enumerate(videos) if tuple(v.shape) == shape]
        c, t, h, w = shape
        try:
            vae.check_input(t, h, w)
        except ValueError as e:
            for i in idx:
                skip(chunk[i]["__key__"], f"does not fit the VAE ({t} frames, {h}x{w}: {e})")
            continue
        x = torch.stack([videos[i] for i in idx]).to(device=device)  # (B, C, T, H, W) in [-1, 1]
        z = vae.encode(x.to(dtype)).float().cpu()  # (B, C', T', H', W'), normalised by the VAE
        for j, i in enumerate(idx):
            latents[i] = z[j]
    return latents


@torch.no_grad()
def cache_shard(src: Path, dst: Path, vae, text_encoder, *, batch_size: int, device: torch.device,
                dtype: torch.dtype, frames: int | None = None, buckets: list[Bucket] | None = None,
                limits: VideoLimits = VideoLimits(), skipped: collections.Counter | None = None) -> int:
    """Encode one clip shard into one latent shard; returns the number of samples written.

    ``buckets`` (pixel sizes): fit each clip into one (:func:`fit_clip`); else ``frames`` trims clips to their
    first frames and their size is kept. A bad sample (unsafe key, missing member, undecodable or oversized mp4,
    a shape the VAE cannot take, caption not UTF-8) is skipped: logged naming shard and key, counted by reason
    in ``skipped``. A shard with no good sample writes no file.
    """
    from lvd.data import latents as latent_format
    from lvd.data.codecs import SkipSample
    from lvd.data.shards import write_tar_samples

    def skip(key: str, reason: str) -> None:
        if skipped is not None:
            skipped[reason.split(" (")[0]] += 1
        log.warning("skipped %r in %s: %s", key, src, reason)

    out: list[dict] = []
    for chunk in _chunks(_readable_samples(src, skip), batch_size):
        good, videos, metas = [], [], []
        for s in chunk:
            try:
                caption = s["txt"].decode("utf-8") if "txt" in s else None
                video, meta = _load_clip(s, frames, buckets, limits)
            except SkipSample as e:
                skip(s["__key__"], str(e))
                continue
            except UnicodeDecodeError:
                skip(s["__key__"], "caption not UTF-8")
                continue
            good.append((s, caption))
            videos.append(video)
            metas.append(meta)
        latents = _encode([s for s, _ in good], videos, vae, device, dtype, skip)
        kept = [i for i, z in enumerate(latents) if z is not None]
        if not kept:
            continue
        text = text_encoder([good[i][1] for i in kept])
        for row, i in enumerate(kept):
            s, meta = good[i][0], metas[i]
            meta["latent_shape"] = list(latents[i].shape)
            out.append({"__key__": s["__key__"], latent_format.MEMBER: latent_format.encode_sample(latents[i], text.row(row)),
                        "txt": s["txt"], "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
    if out:
        write_tar_samples(dst, out)
    else:
        log.warning("%s: no sample could be cached; no latent shard written", src)
    return len(out)


def write_uncond(out: Path, text_encoder) -> Path:
    """The empty prompt's embedding (batch 1) beside the shards in ``out``: what CFG dropout substitutes."""
    from lvd.data.latents import write_uncond as write

    return write(out, text_encoder.empty())


def _refuse_mixing(out: Path, manifest: dict) -> None:
    """Stop (SystemExit with the reason) when ``out`` holds latents made with another VAE, text encoder or frames."""
    path = out / "cache.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in ("vae", "text_encoder", "frames", "buckets") if old.get(k) != manifest.get(k)]
        if changed and any(out.glob("*.tar")):
            raise SystemExit(
                f"{path}: this folder holds latents made with a different {', '.join(changed)} "
                f"({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); use another --out or delete it"
            )


def _write_manifest(out: Path, manifest: dict) -> None:
    with atomic_write(out / "cache.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1))


def _resolve_buckets(a: argparse.Namespace, vae) -> list[Bucket] | None:
    """The pixel buckets of --buckets / --buckets-from, each checked against the VAE (SystemExit listing misfits)."""
    if a.buckets is not None:
        buckets = parse_buckets(a.buckets, a.frames)
    elif a.buckets_from is not None:
        buckets = buckets_from_config(a.buckets_from, temporal_compression=vae.temporal_compression,
                                      spatial_compression=vae.spatial_compression)
    else:
        return None
    problems = []
    for b in buckets:
        try:
            vae.check_input(b.frames or 1, b.height, b.width)
        except ValueError as e:
            problems.append(f"bucket {b.frames or 'T'}x{b.height}x{b.width}: {e}")
    if problems:
        raise SystemExit("python -m lvd.cache_latents: buckets the VAE cannot take:\n  - " + "\n  - ".join(problems))
    return buckets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lvd.cache_latents", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="clip shards: brace patterns joined by '::', or a folder of *.tar")
    p.add_argument("--out", type=Path, required=True, help="output folder for latent shards")
    p.add_argument("--vae", required=True, help="VAE preset name, a folder we saved, or a diffusers VAE folder")
    p.add_argument("--text-encoder", required=True, help="text encoder folder or HF name (offline)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frames", type=int, default=None,
                   help="use the first N frames of each clip (1 + 4k); with --buckets, every bucket's frame count")
    p.add_argument("--buckets", default=None,
                   help="pixel buckets HEIGHTxWIDTH,...: each clip is resized and centre-cropped into the one nearest "
                        "its aspect ratio (e.g. 64x64,64x112,112x64)")
    p.add_argument("--buckets-from", type=Path, default=None,
                   help="a DiT config (recipes/configs/*dit*.yaml): cache for its data.buckets (latent sizes)")
    p.add_argument("--max-length", type=int, default=None, help="text tokens (default: the encoder's limit)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tiling", action="store_true", help="tiled/chunked VAE encode (for 512-1024 px clips)")
    p.add_argument("--max-side", type=int, default=VideoLimits.max_side,
                   help="skip a clip whose json or mp4 header is wider or taller than this (default %(default)s)")
    p.add_argument("--max-frames", type=int, default=VideoLimits.max_frames,
                   help="skip a clip whose json or mp4 header has more frames than this (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(a: argparse.Namespace) -> tuple[list[Path], list[str]]:
    """The input shards and every problem with the command line, found before anything is loaded or written."""
    problems = []
    try:
        shards = expand_shards(a.shards)
    except ValueError as e:
        shards = []
        problems.append(f"--shards: {e}")
    if a.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.frames is not None and (a.frames < 1 or (a.frames - 1) % 4):
        problems.append(f"--frames must be 1 + 4k, got {a.frames}")
    if a.buckets is not None and a.buckets_from is not None:
        problems.append("--buckets and --buckets-from: give one")
    if a.buckets is not None:
        try:
            parse_buckets(a.buckets, a.frames)
        except ValueError as e:
            problems.append(f"--buckets: {e}")
    if a.buckets_from is not None:
        if not a.buckets_from.is_file():
            problems.append(f"--buckets-from {a.buckets_from}: no such file")
        elif a.frames is not None:
            problems.append("--frames with --buckets-from: the config's buckets set the frame counts")
    problems += VideoLimits(a.max_side, a.max_frames).problems("--")
    if a.max_length is not None and a.max_length < 1:
        problems.append(f"--max-length must be >= 1, got {a.max_length}")
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        problems.append("--shards: two input shards share a file name; cache them into different --out folders")
    if a.device is not None:
        try:
            device = torch.device(a.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                problems.append(f"--device {a.device}: no CUDA GPU is available (use --device cpu)")
        except RuntimeError:
            problems.append(f"--device {a.device!r} is not a device (cpu, cuda, cuda:N)")
    problems += filter(None, [vae_problem("--vae", a.vae), text_encoder_problem("--text-encoder", a.text_encoder),
                              folder_problem("--out", a.out)])
    return shards, problems


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    # 1. Check inputs: every problem at once.
    shards, problems = _check_args(a)
    manifest = {"vae": str(a.vae), "text_encoder": str(a.text_encoder), "frames": a.frames, "shards": a.shards,
                "buckets": a.buckets or (str(a.buckets_from) if a.buckets_from else None)}
    _refuse_mixing(a.out, manifest)  # first: a changed VAE path may also be a missing one
    if problems:
        print("python -m lvd.cache_latents: cannot start:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2

    # 2. Skip finished shards (resumable).
    a.out.mkdir(parents=True, exist_ok=True)
    _write_manifest(a.out, manifest)
    todo = [s for s in shards if not (a.out / s.name).is_file()]
    if len(todo) < len(shards):
        print(f"skipping {len(shards) - len(todo)} finished shard(s) already in {a.out}", file=sys.stderr)
    from lvd.data.latents import uncond_path

    if not todo and uncond_path(a.out).is_file():
        return 0

    # 3. Load the frozen models.
    from tqdm import tqdm

    from lvd.text import TextEncoder
    from lvd.vae import load_vae

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 only on GPU (CPU bf16 is ~600x slower)
    vae = load_vae(a.vae, device=device, dtype=dtype)
    vae.eval().requires_grad_(False) if hasattr(vae, "eval") else None
    if a.tiling:
        vae.enable_tiling()
    buckets = _resolve_buckets(a, vae)
    text_encoder = TextEncoder.from_pretrained(a.text_encoder, max_length=a.max_length, device=device)
    write_uncond(a.out, text_encoder)

    # 4. Encode shard by shard.
    t0, n, skipped = time.perf_counter(), 0, collections.Counter()
    limits = VideoLimits(a.max_side, a.max_frames)
    bar = tqdm(todo, unit="shard", desc="caching latents", disable=a.quiet, dynamic_ncols=True)
    for src in bar:
        n += cache_shard(src, a.out / src.name, vae, text_encoder, batch_size=a.batch_size, device=device,
                         dtype=dtype, frames=a.frames, buckets=buckets, limits=limits, skipped=skipped)
        bar.set_postfix(clips=n, skipped=sum(skipped.values()), clips_s=f"{n / (time.perf_counter() - t0):.2f}")
    written = sum((a.out / s.name).is_file() for s in todo)
    print(f"wrote {n} latent samples in {written} shard(s) to {a.out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if skipped:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        print(f"skipped {sum(skipped.values())} bad samples ({reasons}); each is named above", file=sys.stderr)
    if todo and not n:
        print("python -m lvd.cache_latents: error: no sample could be cached (every one was skipped)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main, prog="python -m lvd.cache_latents")
