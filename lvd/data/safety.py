"""Checks on untrusted data: sample keys, playlists posing as videos, and how large a video may be before decoding.

Shards and source folders may come from anywhere. Three things are refused before any work is done:

* a sample key that could name a path outside a folder once extracted or written: a ``..`` path component,
  a leading ``/``, a backslash or a NUL (:func:`key_problem`);
* an ffmpeg concat list or an HLS playlist, whatever its extension (:func:`playlist_problem`): ffmpeg would
  open the files it lists;
* a video whose stream header (read without decoding a frame) is larger than its json metadata says or than
  a ceiling, :class:`VideoLimits` (:func:`size_problem`): a 6 KB mp4 can hold 120 frames of 1024².

Each check returns one line (the reason, for a skip that names shard and key or file) or None.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["VideoLimits", "PLAYLIST_EXTENSIONS", "key_problem", "playlist_problem", "size_problem",
           "declared_size"]

PLAYLIST_EXTENSIONS = (".txt", ".m3u", ".m3u8", ".ffconcat")
_PLAYLIST_MAGIC = (b"ffconcat", b"#extm3u")
FRAME_SLACK = 1  # a header's frame count is duration x fps, with the duration rounded to 10 ms


@dataclasses.dataclass(frozen=True)
class VideoLimits:
    """The largest video decoded: ``max_side`` pixels on either side, ``max_frames`` frames."""

    max_side: int = 4096
    max_frames: int = 1024

    def problems(self, prefix: str = "") -> list[str]:
        """One line per field that is not >= 1 (``prefix`` names the config section or flag)."""
        return [f"{prefix}{name} must be >= 1, got {getattr(self, name)}"
                for name in ("max_side", "max_frames") if getattr(self, name) < 1]


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a safe sample key (one line), or None."""
    if "\x00" in key:
        return "unsafe key (contains a NUL byte)"
    if "\\" in key:
        return "unsafe key (contains a backslash)"
    if key.startswith("/"):
        return "unsafe key (starts with '/')"
    if ".." in key.split("/"):
        return "unsafe key (has a '..' path component)"
    return None


def playlist_problem(path: str | Path, head: bytes | None = None, by_extension: bool = True) -> str | None:
    """Why ``path`` is refused as a playlist or concat list (by extension, or by its first bytes), or None.

    ``head`` is the file's first bytes when the caller has them; otherwise up to 64 bytes are read.
    ``by_extension`` False judges by content only (a ``.txt`` that may be a caption)."""
    path = Path(path)
    if by_extension and path.suffix.lower() in PLAYLIST_EXTENSIONS:
        return f"playlist or concat list refused (extension '{path.suffix}')"
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except OSError:
            return None  # the reader reports a missing or unreadable file itself
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for magic in _PLAYLIST_MAGIC:
        if text.startswith(magic):
            return f"playlist or concat list refused (content starts with '{magic.decode()}')"
    return None


def declared_size(meta: dict) -> tuple[int, int, int] | None:
    """(frames, height, width) that a sample's json metadata declares, or None when it declares none."""
    try:
        return int(meta["num_frames"]), int(meta["height"]), int(meta["width"])
    except (KeyError, TypeError, ValueError):
        return None


def size_problem(frames: int, height: int, width: int, limits: VideoLimits,
                 declared: tuple[int, int, int] | None = None, what: str = "video") -> str | None:
    """Why a ``what`` of ``frames`` x ``height`` x ``width`` (a stream header, or a json's claim) is not decoded:
    larger than ``declared`` (the json's frames, height, width) or than ``limits``. ``frames`` 0 means unknown."""
    if declared is not None:
        t, h, w = declared
        if height > h or width > w or frames > t + FRAME_SLACK:
            return f"{what} larger than its json ({frames}x{height}x{width} > {t}x{h}x{w} frames x height x width)"
    if max(height, width) > limits.max_side:
        return f"{what} larger than the ceiling ({height}x{width} px, max_side {limits.max_side})"
    if frames > limits.max_frames + FRAME_SLACK:
        return f"{what} longer than the ceiling ({frames} frames, max_frames {limits.max_frames})"
    return None
