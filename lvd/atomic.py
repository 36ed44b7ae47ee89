"""Atomic writes: a file or folder appears under its name whole, or not at all.

    with atomic_write(path, "w", encoding="utf-8") as f:   # a file object on a temporary beside ``path``
        f.write(text)
    with atomic_path(path, suffix=".mp4") as tmp:          # for a writer that opens the file itself (ffmpeg)
        write_with_ffmpeg(tmp)
    with atomic_folder(path) as tmp:                       # a folder: save_pretrained(tmp), ...
        model.save_pretrained(tmp)

Each writes a temporary ``.<name>.<pid>-<random>.tmp`` in the target's folder (the same filesystem, so the
rename is atomic). On success its bytes are fsynced, it is renamed over the target with ``os.replace`` and the
folder is fsynced, so a reader, a crash or a power cut sees the old target or the whole new one. On any
exception (KeyboardInterrupt too) the temporary is removed and the target is left as it was. The name is the
writer's own, so concurrent writers of one file never share a temporary: each replaces the target whole and
the last to finish wins. A writer killed outright (SIGKILL) leaves its temporary behind; it is hidden (a
leading dot) and ends in ``.tmp``, so no lister of lvd's folders takes it for output, and
:func:`temporaries` finds it for a command that cleans up.

A folder cannot be renamed over a non-empty folder, so :func:`atomic_folder` moves the old one aside, renames
the new one in, then deletes the old: only a kill between those two renames leaves no folder under the name
(both stay on disk, whole, as temporaries).

:class:`AtomicFile` is the same for a writer that keeps a file open across calls (``ShardWriter``).
This module imports nothing of lvd: every floor may use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Iterator

__all__ = ["AtomicFile", "atomic_write", "atomic_path", "atomic_folder", "temporaries", "fsync_path"]


def _temporary(path: Path, suffix: str = "") -> Path:
    """A name beside ``path`` that no other writer uses: ``.<name>.<pid>-<random>.tmp<suffix>``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")


def temporaries(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """The temporaries in ``folder`` of targets whose names match ``pattern`` (left by killed writers), sorted."""
    return sorted(Path(folder).glob(f".{pattern}.*.tmp*"))


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries (a rename in it), to disk. A folder the OS will not open or sync is
    passed over: the rename itself is still atomic there."""
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


class AtomicFile:
    """An open temporary beside ``path`` (``.file``) that becomes ``path`` on :meth:`commit` and is removed on
    :meth:`discard`. For a writer that keeps the file open across calls; otherwise use :func:`atomic_write`."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None):
        if mode not in ("w", "wb"):
            raise ValueError(f"AtomicFile writes a new file: mode 'w' or 'wb', got {mode!r}")
        self.path = Path(path)
        self.tmp = _temporary(self.path)
        self.file: IO = open(self.tmp, mode.replace("w", "x"), encoding=encoding)  # "x": the name is ours alone

    def commit(self) -> Path:
        """Flush, fsync and close the temporary, then rename it over ``path``; returns ``path``."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_path(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary; ``path`` stays as it was. Safe to call more than once."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """A file object whose bytes replace ``path`` when the ``with`` block ends without an exception."""
    f = AtomicFile(path, mode, encoding=encoding)
    try:
        yield f.file
        f.commit()
    except BaseException:
        f.discard()
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """A temporary path for a writer that creates the file itself; the file there replaces ``path`` when the
    ``with`` block ends without an exception. ``suffix`` ends the temporary's name, for tools that pick a format
    from it (ffmpeg: ``.mp4``, ``.gif``)."""
    path = Path(path)
    tmp = _temporary(path, suffix)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; removes what a failed writer left


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new, empty temporary folder whose contents replace the folder ``path`` when the ``with`` block ends
    without an exception (every file in it fsynced first). A failed block removes it and leaves ``path`` as is."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; a folder cannot replace it")
    tmp = _temporary(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                fsync_path(os.path.join(root, name))
            fsync_path(root)
        old = _temporary(path) if path.exists() else None
        if old is not None:
            os.replace(path, old)  # a folder is renamed only onto a free name: the old one moves aside first
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # the old folder back under its name
            raise
        fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; removes what a failed writer left
