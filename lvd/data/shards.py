"""Cut videos into clips and write them as webdataset tar shards.

    python -m lvd.data.shards KIND SOURCE --out DIR [options]        (see --help for every layout)

Each sample is ``{__key__, mp4, txt, json}``: the clip re-encoded as H.264 (4:4:4), its caption (UTF-8),
and metadata (source file, fps, num_frames, height, width, start time). All values are written as
bytes; nothing is pickled. A bad input (unreadable, truncated, empty, unknown codec, too short,
missing or non-UTF-8 caption, not a video, duplicate key) is skipped with a one-line warning and
counted in the summary; the shards stay valid. Problems with the command line itself exit with
status 2 and a one-line message.

Stages: ``list_*`` turn a SOURCE into jobs (and early skips); ``clips_from_video`` /
``clips_from_shapes`` turn one job into samples; ``write_shards`` runs jobs on worker threads
(each drives its own ffmpeg processes, which do the decoding and encoding) and writes the
samples in job order, so the same command writes the same shards.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lvd.config import folder_problem, run_cli
from lvd.data.synthetic import ShapesConfig, make_clip
from lvd.video_io import VIDEO_EXTENSIONS, VideoReadError, encode_video_bytes, probe_video, read_video

__all__ = [
    "Job",
    "Skip",
    "ClipOptions",
    "caption_from_class",
    "list_folder",
    "list_ucf101",
    "list_kinetics",
    "clips_from_video",
    "clips_from_shapes",
    "write_shards",
    "main",
]

SHARD_PATTERN = "shard-%06d.tar"
_SIDECAR_EXTS = (".txt", ".json", ".csv")


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


@dataclasses.dataclass
class ClipOptions:
    """How clips are cut from a video: ``frames`` frames at ``fps``, short side ``size``."""

    frames: int = 17
    fps: float = 8.0
    size: int = 256
    crop: bool = True
    clips_per_video: int = 1


_CATEGORIES = [
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


# ----------------------------------------------------------------------------------------------
# 1. Sources -> jobs
# ----------------------------------------------------------------------------------------------


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


def list_folder(root: Path) -> tuple[list[Job], list[Skip]]:
    """A folder of videos with ``captions.csv`` (``path,caption``) or sidecar ``<name>.txt`` captions."""
    skips: list[Skip] = []
    has_csv = (root / "captions.csv").is_file()
    captions = _read_captions_csv(root, skips) if has_csv else {}
    jobs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        ext = path.suffix.lower()
        if ext not in VIDEO_EXTENSIONS:
            is_sidecar = ext in _SIDECAR_EXTS and (
                rel == "captions.csv" or any(path.with_suffix(v).exists() for v in VIDEO_EXTENSIONS)
            )
            if not is_sidecar:
                skips.append(Skip(rel, f"not a video file (extension '{ext or 'none'}')"))
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


def list_ucf101(root: Path, split_list: Path | None = None) -> tuple[list[Job], list[Skip]]:
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
    for path in paths:
        rel = path.relative_to(root).as_posix()
        if not path.is_file():
            skips.append(Skip(rel, f"no such file (listed in {split_list.name})"))
            continue
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            skips.append(Skip(rel, f"not a video file (extension '{path.suffix or 'none'}')"))
            continue
        jobs.append(Job(_safe_key(path.stem), path, caption_from_class(path.parent.name), rel))
    return _dedupe(jobs, skips), skips


def list_kinetics(root: Path, annotations: Path | None = None, split: str | None = None) -> tuple[list[Job], list[Skip]]:
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
    files = {p.stem: p for p in sorted(root.rglob("*")) if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()}
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


# ----------------------------------------------------------------------------------------------
# 2. One job -> samples
# ----------------------------------------------------------------------------------------------


def _sample(key: str, video, caption: str, meta: dict, fps: float) -> dict:
    """A shard sample; every value is bytes (nothing for webdataset to pickle)."""
    return {
        "__key__": key,
        "mp4": encode_video_bytes(video, fps),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def clip_starts(duration: float, clip_seconds: float, count: int) -> list[float]:
    """Start times of ``count`` clips: the centres of ``count`` equal parts of the usable span."""
    usable = max(0.0, duration - clip_seconds)
    return [round(usable * (i + 0.5) / count, 3) for i in range(count)]


def clips_from_video(job: Job, opts: ClipOptions) -> tuple[list[dict], list[Skip]]:
    """Probe, cut ``clips_per_video`` windows, resize, re-encode. Bad files come back as skips."""
    try:
        info = probe_video(job.path)
    except VideoReadError as e:
        return [], [Skip(job.source, str(e).replace(str(job.path), "").lstrip(": "))]
    clip_seconds = opts.frames / opts.fps
    if info.duration and info.duration + 0.5 / opts.fps < clip_seconds:
        need = f"{clip_seconds:.2f} s for {opts.frames} frames at {opts.fps:g} fps"
        reason = f"video shorter than the clip ({info.duration:.2f} s < {need})"
        return [], [Skip(job.source, reason)]
    samples, skips = [], []
    for i, start in enumerate(clip_starts(info.duration, clip_seconds, opts.clips_per_video)):
        try:
            video = read_video(job.path, num_frames=opts.frames, start=start, fps=opts.fps, size=opts.size, crop=opts.crop)
        except VideoReadError as e:
            skips.append(Skip(f"{job.source}@{start:g}s", str(e).replace(str(job.path), "").lstrip(": ")))
            continue
        _, t, h, w = video.shape
        meta = {
            "source": job.source,
            "fps": opts.fps,
            "num_frames": t,
            "height": h,
            "width": w,
            "start": start,
            "source_fps": info.fps,
            "source_size": [info.height, info.width],
        }
        samples.append(_sample(f"{job.key}_{i:03d}", video, job.caption, meta, opts.fps))
    return samples, skips


def clips_from_shapes(job: Job, cfg: ShapesConfig, seed: int) -> tuple[list[dict], list[Skip]]:
    index = int(job.key.rsplit("_", 1)[1])
    video, caption, meta = make_clip(index, seed, cfg)
    meta.update(source=job.source, start=0.0)
    return [_sample(job.key, video, caption, meta, cfg.fps)], []


# ----------------------------------------------------------------------------------------------
# 3. Jobs -> shards
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    written: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: list[Skip] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        counts = collections.Counter(s.category for s in self.skipped)
        return {
            "written": self.written,
            "shards": self.shards,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "skipped": dict(sorted(counts.items())),
            "skipped_inputs": [[s.source, s.reason] for s in self.skipped],
        }


def _warn(skip: Skip, bar=None) -> None:
    line = f"warning: skipped {skip.source}: {skip.reason}"
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def write_shards(
    jobs: list[Job], work, out: Path, *, shard_size: int, workers: int, expected: int, skips=(), progress=True
) -> Summary:
    """Run ``work(job) -> (samples, skips)`` over ``jobs`` on ``workers`` threads; write in job order."""
    import webdataset as wds
    from tqdm import tqdm

    summary = Summary(skipped=list(skips))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=expected, unit="clip", desc="writing shards", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for s in summary.skipped:
        _warn(s, bar)
    # mtime=0 and bytes-only values: the same inputs give byte-identical shards, with nothing pickled.
    with wds.ShardWriter(str(out / SHARD_PATTERN), maxcount=shard_size, verbose=0, encoder=False, mtime=0) as sink:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: collections.deque = collections.deque()
            it = iter(jobs)
            for job in it:  # keep at most 4 jobs per worker in flight; results are taken in order
                pending.append(pool.submit(_guarded, work, job))
                if len(pending) < 4 * workers:
                    continue
                _drain(pending.popleft().result(), sink, summary, bar)
            while pending:
                _drain(pending.popleft().result(), sink, summary, bar)
        summary.shards = sink.shard
    bar.close()
    summary.seconds = time.perf_counter() - start
    summary.bytes = sum(p.stat().st_size for p in out.glob("shard-*.tar"))
    return summary


def _guarded(work, job: Job):
    """``work(job)``, with any exception turned into a skip: one bad input never ends the run."""
    try:
        return work(job)
    except Exception as e:  # noqa: BLE001 - reported and counted, see the summary
        return [], [Skip(job.source, f"unexpected error: {type(e).__name__}: {e}".splitlines()[0])]


def _drain(result, sink, summary: Summary, bar) -> None:
    samples, skips = result
    for s in skips:
        summary.skipped.append(s)
        _warn(s, bar)
    for sample in samples:
        sink.write(sample)
        summary.written += 1
    bar.update(len(samples))
    bar.set_postfix(skipped=len(summary.skipped), refresh=False)


# ----------------------------------------------------------------------------------------------
# 4. Command line
# ----------------------------------------------------------------------------------------------

_EPILOG = """\
layouts (KIND SOURCE):
  folder DIR     videos anywhere under DIR (mp4, avi, webm, mkv, gif, mov, ...). Captions from
                 DIR/captions.csv, rows "path,caption" with path relative to DIR (a header row
                 "path,caption" is optional), or from a sidecar file with the video's name and
                 .txt (clip01.mp4 + clip01.txt). captions.csv wins when both exist.
  ucf101 DIR     the UCF-101 layout DIR/<ClassName>/v_<ClassName>_gXX_cYY.avi. The caption is the
                 class name in words ("ApplyEyeMakeup" -> "apply eye makeup"). --split-list
                 ucfTrainTestlist/trainlist01.txt keeps only the videos of an official split.
  kinetics DIR   Kinetics-400/600/700: an annotation CSV with columns
                 label,youtube_id,time_start,time_end,split (the one .csv in DIR, or
                 --annotations FILE) and the downloaded clips anywhere under DIR, named
                 <youtube_id>_<start:06d>_<end:06d>.mp4 or <youtube_id>.mp4. The caption is the
                 label; --split train|val|test keeps one split.
  synthetic      moving shapes with exact captions ("a red circle moving left"); no SOURCE.
                 --count clips of dataset --seed; --size/--frames/--fps default to 64/17/8.

output: DIR/shard-000000.tar, ... each sample {__key__, mp4 (H.264), txt (caption), json
(source, fps, num_frames, height, width, start)}, and DIR/summary.json. Bad inputs (corrupt,
truncated or empty files, unknown codecs, videos shorter than the clip, missing or non-UTF-8
captions, non-video files, duplicate keys) are skipped with a one-line warning and counted.
Train on them with lvd.data.loader: ClipDataConfig(shards="DIR") or a brace pattern
"DIR/shard-{000000..000009}.tar" (the summary prints it).

examples:
  python -m lvd.data.shards ucf101 data/UCF-101 --out shards/ucf101 --frames 17 --fps 8 --size 256 \\
      --split-list data/ucfTrainTestlist/trainlist01.txt --clips-per-video 2 --workers 8
  python -m lvd.data.shards kinetics data/k400 --annotations data/k400/train.csv --split train \\
      --out shards/k400 --size 512 --shard-size 500
  python -m lvd.data.shards folder my_clips --out shards/mine --size 256 --no-crop
  python -m lvd.data.shards synthetic --count 20000 --seed 0 --out shards/shapes
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lvd.data.shards",
        description="Cut videos into fixed-length clips and write them as webdataset tar shards.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = ["folder", "ucf101", "kinetics", "synthetic"]
    p.add_argument("kind", metavar="KIND", choices=kinds, help=" | ".join(kinds))
    p.add_argument("source", metavar="SOURCE", nargs="?", type=Path, help="input folder (not used by synthetic)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    p.add_argument("--frames", type=int, default=None, help="frames per clip, 1 + 4k (default 17)")
    p.add_argument("--fps", type=float, default=None, help="target frame rate (default 8)")
    p.add_argument("--size", type=int, default=None, help="short side in pixels, even (default 256; synthetic 64)")
    p.add_argument("--no-crop", action="store_true", help="keep the aspect ratio instead of a centre square crop")
    p.add_argument("--clips-per-video", type=int, default=1, help="clips cut from each video, evenly spaced (default 1)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel workers: threads, each driving its own ffmpeg processes, which do "
                   "the decoding and encoding (default: min(4, cores))")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--count", type=int, default=None, help="synthetic: number of clips")
    p.add_argument("--seed", type=int, default=0, help="synthetic: dataset seed (default 0)")
    p.add_argument("--split-list", type=Path, default=None, help="ucf101: official split list (trainlist01.txt ...)")
    p.add_argument("--annotations", type=Path, default=None, help="kinetics: annotation CSV (default: the .csv in SOURCE)")
    p.add_argument("--split", default=None, help="kinetics: keep rows of this split (train, val, test)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Collect every problem with the command line and exit once, listing them all."""
    problems = []
    synthetic = a.kind == "synthetic"
    a.frames = a.frames if a.frames is not None else 17
    a.fps = a.fps if a.fps is not None else 8.0
    a.size = a.size if a.size is not None else (64 if synthetic else 256)
    if a.frames < 1 or (a.frames - 1) % 4:
        problems.append(f"--frames must be 1 + 4k (1, 5, 9, 13, 17, ...), got {a.frames}")
    if a.fps <= 0:
        problems.append(f"--fps must be > 0, got {a.fps:g}")
    if a.size < 8 or a.size % 2:
        problems.append(f"--size must be an even number >= 8 (H.264 needs even sizes), got {a.size}")
    for name in ("clips_per_video", "workers", "shard_size"):
        if getattr(a, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if synthetic:
        if a.source is not None:
            problems.append(f"synthetic takes no SOURCE (got '{a.source}'); use --count and --seed")
        if a.count is None or a.count < 1:
            problems.append("synthetic needs --count N (N >= 1)")
        if a.seed < 0:
            problems.append(f"--seed must be >= 0, got {a.seed}")
    else:
        if a.source is None:
            problems.append(f"{a.kind} needs a SOURCE folder")
        elif not a.source.is_dir():
            problems.append(f"SOURCE '{a.source}' is not a folder")
        if a.count is not None:
            problems.append("--count is only for synthetic")
    if a.split_list is not None and (a.kind != "ucf101" or not a.split_list.is_file()):
        problems.append(f"--split-list must be an existing file and KIND ucf101 (got '{a.split_list}', {a.kind})")
    if a.annotations is not None and (a.kind != "kinetics" or not a.annotations.is_file()):
        problems.append(f"--annotations must be an existing file and KIND kinetics (got '{a.annotations}', {a.kind})")
    if a.split is not None and a.kind != "kinetics":
        problems.append("--split is only for kinetics (ucf101 uses --split-list)")
    if a.out.exists() and not a.out.is_dir():
        problems.append(f"--out '{a.out}' exists and is not a folder")
    elif a.out.is_dir() and any(a.out.glob("shard-*.tar")) and not a.overwrite:
        problems.append(f"--out '{a.out}' already holds shards; pass --overwrite to replace them")
    elif (problem := folder_problem("--out", a.out)) is not None:  # e.g. under /proc, or on a read-only disk
        problems.append(problem)
    if problems:
        p.error("\n  ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _check_args(parser, a)

    # 1. List the inputs.
    try:
        if a.kind == "synthetic":
            jobs, skips = list_synthetic(a.count, a.seed)
        elif a.kind == "folder":
            jobs, skips = list_folder(a.source)
        elif a.kind == "ucf101":
            jobs, skips = list_ucf101(a.source, a.split_list)
        else:
            jobs, skips = list_kinetics(a.source, a.annotations, a.split)
    except (ValueError, OSError) as e:
        parser.error(str(e))

    # 2. Choose the per-job work.
    if a.kind == "synthetic":
        cfg = ShapesConfig(size=a.size, frames=a.frames, fps=a.fps)

        def work(job):
            return clips_from_shapes(job, cfg, a.seed)

        expected = len(jobs)
    else:
        opts = ClipOptions(a.frames, a.fps, a.size, crop=not a.no_crop, clips_per_video=a.clips_per_video)

        def work(job):
            return clips_from_video(job, opts)

        expected = len(jobs) * a.clips_per_video

    # 3. Write.
    if a.overwrite:
        for old in a.out.glob("shard-*.tar"):
            old.unlink()
    try:
        summary = write_shards(
            jobs, work, a.out, shard_size=a.shard_size, workers=a.workers, expected=expected, skips=skips,
            progress=not a.quiet,
        )
    except KeyboardInterrupt:
        print("interrupted; the last shard may be incomplete", file=sys.stderr)
        return 130

    # 4. Report.
    report = summary.to_dict()
    report["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    (a.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    rate = summary.written / summary.seconds if summary.seconds else 0.0
    print(
        f"wrote {summary.written} clips in {summary.shards} shards ({summary.bytes / 1e6:.1f} MB) to {a.out} "
        f"in {summary.seconds:.1f} s ({rate:.1f} clips/s)"
    )
    if summary.shards:
        print(f"shards: {a.out}/shard-{{000000..{summary.shards - 1:06d}}}.tar")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} inputs:")
        for category, n in report["skipped"].items():
            print(f"  {n:6d}  {category}")
    if summary.written == 0:
        print("error: no clips were written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main, prog="python -m lvd.data.shards")
