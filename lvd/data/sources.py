"""Sources -> jobs: the inputs of ``python -m lvd.data.shards`` (one video file and its caption each).

``list_folder``, ``list_ucf101`` and ``list_kinetics`` turn a SOURCE folder into :class:`Job` s and the
inputs they skip (:class:`Skip`, one line each); ``list_synthetic`` numbers synthetic clips.

A SOURCE stays inside itself: a symlink (to a file or a folder) that resolves outside SOURCE, and a split
list or annotation row naming a path outside it, are skipped and named unless ``follow_symlinks``. ffmpeg
concat lists and playlists (``.m3u``, ``.m3u8``, ``.ffconcat``, or a file starting ``ffconcat`` or
``#EXTM3U`` whatever its name) are refused: ffmpeg would open the files they list.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from pathlib import Path

from lvd.data.safety import playlist_problem
from lvd.video_io import VIDEO_EXTENSIONS

__all__ = ["Job", "Skip", "caption_from_class", "walk_files", "list_folder", "list_ucf101", "list_kinetics",
           "list_synthetic"]

_SIDECAR_EXTS = (".txt", ".json", ".csv")
_OUTSIDE = "outside SOURCE"


@dataclasses.dataclass
class Job:
    """One input: a video file with its caption, or one synthetic clip (``path=None``)."""

    key: str
    path: Path | None
    caption: str
    source: str  # how the summary and the json metadata name this input


@dataclasses.dataclass
class Skip:
    """An input that was not written, with the reason (one line)."""

    source: str
    reason: str

    @property
    def category(self) -> str:
        return _categorise(self.reason)


_CATEGORIES = [
    (_OUTSIDE, _OUTSIDE),
    ("playlist or concat list", "playlist or concat list"),
    ("than the ceiling", "video larger than the ceiling"),
    ("empty file", "empty file"),
    ("unsupported codec", "unsupported codec"),
    ("shorter than the clip", "video shorter than the clip"),
    ("caption is not UTF-8", "caption not UTF-8"),
    ("no caption", "missing caption"),
    ("empty caption", "missing caption"),
    ("not a video file", "not a video file"),
    ("not a readable video", "corrupt or unreadable video"),
    ("no video stream", "not a video file"),
    ("duplicate key", "duplicate key"),
    ("no such file", "missing file"),
    ("unexpected error", "unexpected error"),
]


def _categorise(reason: str) -> str:
    for needle, category in _CATEGORIES:
        if needle in reason:
            return category
    return "corrupt or unreadable video"


def _safe_key(text: str) -> str:
    """A webdataset key: no dots (they split key from extension), only [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "clip"


def caption_from_class(name: str) -> str:
    """UCF-101 class name to caption: ``"ApplyEyeMakeup"`` -> ``"apply eye makeup"``."""
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)
    return " ".join(w.lower() for w in words) or name.lower()


def _dedupe(jobs: list[Job], skips: list[Skip]) -> list[Job]:
    """Keep the first job of each key; later ones are skipped as duplicates."""
    seen: dict[str, str] = {}
    out = []
    for job in jobs:
        if job.key in seen:
            skips.append(Skip(job.source, f"duplicate key '{job.key}' (already used by {seen[job.key]})"))
            continue
        seen[job.key] = job.source
        out.append(job)
    return out


def _read_caption_file(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption is not UTF-8 ({path.name}, byte {e.start})") from None
    text = " ".join(text.split())
    if not text:
        raise ValueError(f"empty caption ({path.name})")
    return text


def _outside(top: Path, path: Path) -> str | None:
    """The reason ``path`` is skipped when it resolves outside ``top`` (a resolved folder), or None."""
    target = path.resolve()
    if target == top or top in target.parents:
        return None
    return f"{_OUTSIDE} (a symlink or path resolving to {target}); pass --follow-symlinks to allow it"


def walk_files(root: Path, skips: list[Skip], follow_symlinks: bool = False) -> list[Path]:
    """Every file under ``root``, sorted, hidden names (``.x``) left out.

    A symlink that resolves outside ``root`` is skipped and named in ``skips`` unless ``follow_symlinks``; a
    symlinked folder is entered only with ``follow_symlinks`` (inside ``root`` its files are listed anyway),
    and each real folder once, so a symlink loop ends."""
    top, files, seen = root.resolve(), [], set()

    def visit(folder: Path) -> None:
        seen.add(folder.resolve())
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if entry.is_symlink() and not follow_symlinks and (reason := _outside(top, path)):
                skips.append(Skip(path.relative_to(root).as_posix(), reason))
            elif entry.is_dir():
                if (follow_symlinks or not entry.is_symlink()) and path.resolve() not in seen:
                    visit(path)
            elif entry.is_file():
                files.append(path)

    visit(root)
    return sorted(files)


def _read_captions_csv(root: Path, skips: list[Skip]) -> dict[str, str]:
    """``captions.csv`` rows ``path,caption`` (an optional header row) -> {relative path: caption}."""
    captions: dict[str, str] = {}
    for lineno, raw in enumerate((root / "captions.csv").read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            name = raw.split(b",", 1)[0].decode("utf-8", "replace")
            skips.append(Skip(name, f"caption is not UTF-8 (captions.csv line {lineno}, byte {e.start})"))
            captions[name] = ""  # known but unusable: do not report it again as "no caption"
            continue
        row = next(csv.reader(io.StringIO(line)))
        if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "caption"]:
            continue
        if len(row) < 2:
            skips.append(Skip(row[0] if row else f"captions.csv:{lineno}", f"empty caption (captions.csv line {lineno})"))
            captions[row[0] if row else ""] = ""
            continue
        rel = row[0].strip()
        if rel in captions:
            skips.append(Skip(rel, f"duplicate key: captions.csv line {lineno} lists '{rel}' again"))
            continue
        captions[rel] = " ".join(",".join(row[1:]).split())
        if not captions[rel]:
            skips.append(Skip(rel, f"empty caption (captions.csv line {lineno})"))
    return captions


def list_folder(root: Path, follow_symlinks: bool = False) -> tuple[list[Job], list[Skip]]:
    """A folder of videos with ``captions.csv`` (``path,caption``) or sidecar ``<name>.txt`` captions."""
    skips: list[Skip] = []
    has_csv = (root / "captions.csv").is_file()
    captions = _read_captions_csv(root, skips) if has_csv else {}
    jobs, refused = [], []
    files = walk_files(root, refused, follow_symlinks)
    for skip in refused:  # named once, as outside SOURCE, not again as a captions.csv row without a file
        for rel in [r for r in captions if r == skip.source or r.startswith(skip.source + "/")]:
            del captions[rel]
    skips += refused
    for path in files:
        rel = path.relative_to(root).as_posix()
        ext = path.suffix.lower()
        if ext not in VIDEO_EXTENSIONS:
            is_sidecar = ext in _SIDECAR_EXTS and (
                rel == "captions.csv" or any(path.with_suffix(v).exists() for v in VIDEO_EXTENSIONS)
            )
            if not is_sidecar:
                reason = playlist_problem(path, by_extension=ext != ".txt")
                skips.append(Skip(rel, reason or f"not a video file (extension '{ext or 'none'}')"))
            continue
        if rel in captions:
            caption = captions.pop(rel)
            if not caption:
                continue  # already reported while reading captions.csv
        elif path.with_suffix(".txt").is_file():
            try:
                caption = _read_caption_file(path.with_suffix(".txt"))
            except ValueError as e:
                skips.append(Skip(rel, str(e)))
                continue
        else:
            where = "captions.csv or " if has_csv else ""
            skips.append(Skip(rel, f"no caption (not in {where}{path.with_suffix('.txt').name})"))
            continue
        jobs.append(Job(_safe_key(str(Path(rel).with_suffix(""))), path, caption, rel))
    for rel, caption in captions.items():
        if caption and rel:
            skips.append(Skip(rel, "no such file (listed in captions.csv)"))
    return _dedupe(jobs, skips), skips


def list_ucf101(root: Path, split_list: Path | None = None, follow_symlinks: bool = False) -> tuple[list[Job], list[Skip]]:
    """``<root>/<ClassName>/v_<ClassName>_gXX_cYY.avi``; caption from the class name.

    With ``split_list`` (an official ``trainlist0N.txt`` / ``testlist0N.txt``: lines
    ``ClassName/v_....avi [label]``) only the listed videos are used.
    """
    skips: list[Skip] = []
    wanted = None
    if split_list is not None:
        wanted = []
        for line in split_list.read_text(encoding="utf-8").splitlines():
            if line.strip():
                wanted.append(line.split()[0].replace("\\", "/"))
    jobs = []
    if wanted is not None:
        paths = [root / rel for rel in wanted]
    else:
        paths = sorted(p for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".") for p in d.iterdir())
        paths = [p for p in paths if p.is_file() and not p.name.startswith(".")]
    top = root.resolve()
    for path in paths:
        rel = path.relative_to(root).as_posix()
        if not follow_symlinks and (reason := _outside(top, path)):
            skips.append(Skip(rel, reason))
            continue
        if not path.is_file():
            skips.append(Skip(rel, f"no such file (listed in {split_list.name})"))
            continue
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            skips.append(Skip(rel, f"not a video file (extension '{path.suffix or 'none'}')"))
            continue
        jobs.append(Job(_safe_key(path.stem), path, caption_from_class(path.parent.name), rel))
    return _dedupe(jobs, skips), skips


def list_kinetics(root: Path, annotations: Path | None = None, split: str | None = None,
                  follow_symlinks: bool = False) -> tuple[list[Job], list[Skip]]:
    """Kinetics-400/600/700: a CSV ``label,youtube_id,time_start,time_end,split`` and the clips.

    Clip files are found anywhere under ``root`` by name: ``<youtube_id>_<start:06d>_<end:06d>.<ext>``
    (the official downloader's names, flat or under ``<split>/<label>/``) or ``<youtube_id>.<ext>``.
    The caption is the label. ``split`` keeps only rows of that split.
    """
    skips: list[Skip] = []
    if annotations is None:
        found = sorted(root.glob("*.csv"))
        if len(found) != 1:
            raise ValueError(
                f"{root}: expected exactly one annotation .csv in the folder, found {len(found)}; pass --annotations FILE"
            )
        annotations = found[0]
    files = {p.stem: p for p in walk_files(root, skips, follow_symlinks) if p.suffix.lower() in VIDEO_EXTENSIONS}
    with open(annotations, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"label", "youtube_id", "time_start", "time_end"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise ValueError(f"{annotations}: expected columns {sorted(need)} (+ split), got {reader.fieldnames}")
        jobs = []
        for row in reader:
            if split is not None and row.get("split") != split:
                continue
            yid = row["youtube_id"]
            try:
                name = f"{yid}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
            except ValueError:
                name = yid
            path = files.get(name) or files.get(yid)
            if path is None:
                skips.append(Skip(name, f"no such file (row of {annotations.name}, youtube_id {yid})"))
                continue
            label = " ".join(row["label"].replace("_", " ").split())
            rel = path.relative_to(root).as_posix()
            if not label:
                skips.append(Skip(rel, f"no caption (empty label in {annotations.name})"))
                continue
            jobs.append(Job(_safe_key(name), path, label, rel))
    return _dedupe(jobs, skips), skips


def list_synthetic(count: int, seed: int) -> tuple[list[Job], list[Skip]]:
    """``count`` moving-shapes clips of dataset ``seed`` (captions are filled in when rendered)."""
    return [Job(f"shapes_{seed}_{i:07d}", None, "", f"synthetic:{seed}/{i}") for i in range(count)], []


