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

Safe to kill: each shard is written to a temporary beside it, fsynced and renamed (:mod:`lvd.atomic`), so a
``.tar`` is always complete. A second run into a folder an unfinished run left says in one line to pass
``--overwrite``. A run that writes no clip leaves no shard and no summary. Sources stay inside SOURCE (see :mod:`lvd.data.sources`:
symlinks out of it need ``--follow-symlinks``; playlists and concat lists are refused) and a source whose
frames are larger than ``--max-side`` is skipped, named, before it is decoded.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from lvd.atomic import AtomicFile, atomic_write, temporaries
from lvd.config import folder_problem, run_cli
from lvd.data.safety import VideoLimits, playlist_problem, size_problem
from lvd.data.sources import (
    Job,
    Skip,
    list_folder,
    list_kinetics,
    list_synthetic,
    list_ucf101,
)
from lvd.data.synthetic import (ShapesConfig, add_synthetic_arguments, make_clip, shapes_config_from_args,
                                synthetic_flags_given)
from lvd.video_io import VideoReadError, encode_video_bytes, probe_video, read_video

__all__ = [
    "ClipOptions",
    "clips_from_video",
    "clips_from_shapes",
    "write_shards",
    "ShardWriter",
    "write_tar_samples",
    "read_tar_samples",
    "write_summary",
    "main",
]

SHARD_PATTERN = "shard-%06d.tar"


@dataclasses.dataclass
class ClipOptions:
    """How clips are cut from a video: ``frames`` frames at ``fps``, short side ``size``."""

    frames: int = 17
    fps: float = 8.0
    size: int = 256
    crop: bool = True
    clips_per_video: int = 1
    max_side: int = VideoLimits.max_side  # a source wider or taller than this is skipped before decoding


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
    if reason := playlist_problem(job.path, by_extension=False):
        return [], [Skip(job.source, reason)]
    try:
        info = probe_video(job.path)
    except VideoReadError as e:
        return [], [Skip(job.source, str(e).replace(str(job.path), "").lstrip(": "))]
    limits = VideoLimits(opts.max_side, 1 << 62)  # only a window of frames is decoded: no frame ceiling
    if reason := size_problem(0, info.height, info.width, limits, what="source"):
        return [], [Skip(job.source, reason)]
    clip_seconds = opts.frames / opts.fps
    if info.duration and info.duration + 0.5 / opts.fps < clip_seconds:
        need = f"{clip_seconds:.2f} s for {opts.frames} frames at {opts.fps:g} fps"
        reason = f"video shorter than the clip ({info.duration:.2f} s < {need})"
        return [], [Skip(job.source, reason)]
    samples, skips = [], []
    for i, start in enumerate(clip_starts(info.duration, clip_seconds, opts.clips_per_video)):
        try:
            video = read_video(job.path, num_frames=opts.frames, start=start, fps=opts.fps, size=opts.size, crop=opts.crop,
                               max_shape=(opts.frames, opts.max_side, opts.max_side))
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


_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key = name up to the first dot


def _tar_writer(file):
    """The one tar writer of lvd's shards (clip and latent): a webdataset ``TarWriter`` on an open binary file.

    mtime=0 and bytes-only values: the same inputs give byte-identical shards, with nothing pickled."""
    import webdataset as wds

    return wds.TarWriter(file, encoder=False, mtime=0)


def write_tar_samples(path: Path, samples: Iterable[dict]) -> Path:
    """Write samples ``{"__key__": str, ext: bytes, ...}`` as one shard at ``path``, atomically
    (:func:`lvd.atomic.atomic_write`); returns ``path``."""
    with atomic_write(path) as f, _tar_writer(f) as tar:
        for sample in samples:
            tar.write(sample)
    return Path(path)


def read_tar_samples(path: Path) -> Iterator[dict[str, bytes | str]]:
    """Samples of a shard as ``{"__key__": str, ext: bytes, ...}``, in file order, nothing decoded."""
    sample: dict = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            m = _KEY_EXT.match(member.name)
            if m is None:
                continue
            key, ext = m.groups()
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield sample


class ShardWriter:
    """Samples -> ``out/shard-000000.tar``, ... with ``maxcount`` samples each, every shard atomic.

    A shard is written to a temporary beside it (:class:`lvd.atomic.AtomicFile`), fsynced and renamed when full
    or at :meth:`close`, so a ``.tar`` is always complete; none is made before its first sample. :meth:`abort`
    (an exception inside ``with``) removes the partial one. ``shards`` lists the finished shards.
    """

    def __init__(self, out: Path, maxcount: int):
        self.out, self.maxcount = Path(out), maxcount
        self.shards: list[Path] = []
        self._tar = self._file = None
        self._count = 0

    def write(self, sample: dict) -> None:
        if self._tar is not None and self._count >= self.maxcount:
            self._finish()
        if self._tar is None:
            self._file = AtomicFile(self.out / (SHARD_PATTERN % len(self.shards)))
            self._tar = _tar_writer(self._file.file)
            self._count = 0
        self._tar.write(sample)
        self._count += 1

    def _finish(self) -> None:
        self._tar.close()  # ends the tar; the file is ours to sync and close
        self.shards.append(self._file.commit())
        self._tar = self._file = None

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written (its temporary); finished shards stay."""
        if self._file is not None:
            try:
                self._tar.close()  # else the tar stream writes its end into the closed file when collected
            except Exception:  # noqa: BLE001 - the file is removed either way
                pass
            self._file.discard()
        self._tar = self._file = None

    def __enter__(self):
        return self

    def __exit__(self, kind, *rest) -> None:
        self.abort() if kind is not None else self.close()


def write_shards(
    jobs: list[Job], work, out: Path, *, shard_size: int, workers: int, expected: int, skips=(), progress=True
) -> Summary:
    """Run ``work(job) -> (samples, skips)`` over ``jobs`` on ``workers`` threads; write in job order.

    Shards are atomic (:class:`ShardWriter`); on an exception (KeyboardInterrupt too) the partial shard is
    removed and the finished ones stay."""
    from tqdm import tqdm

    summary = Summary(skipped=list(skips))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=expected, unit="clip", desc="writing shards", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for s in summary.skipped:
        _warn(s, bar)
    with ShardWriter(out, shard_size) as sink:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: collections.deque = collections.deque()
            for job in jobs:  # keep at most 4 jobs per worker in flight; results are taken in order
                pending.append(pool.submit(_guarded, work, job))
                if len(pending) < 4 * workers:
                    continue
                _drain(pending.popleft().result(), sink, summary, bar)
            while pending:
                _drain(pending.popleft().result(), sink, summary, bar)
    bar.close()
    summary.shards = len(sink.shards)
    summary.seconds = time.perf_counter() - start
    summary.bytes = sum(p.stat().st_size for p in sink.shards)
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
captions, non-video files, duplicate keys, playlists and concat lists, symlinks out of SOURCE unless
--follow-symlinks, videos larger than --max-side) are skipped with a one-line warning and counted.
Each shard appears under its name only when complete (written as a hidden .tmp, then renamed); a run that
was killed leaves complete shards and no summary.json, and rerunning it asks for --overwrite.
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
    p.add_argument("--follow-symlinks", action="store_true",
                   help="follow symlinks that resolve outside SOURCE (default: skip and name them)")
    p.add_argument("--max-side", type=int, default=VideoLimits.max_side,
                   help=f"skip a source video wider or taller than this many pixels, read from its header before "
                        f"decoding (default {VideoLimits.max_side})")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_synthetic_arguments(p)
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
    for name in ("clips_per_video", "workers", "shard_size", "max_side"):
        if getattr(a, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if synthetic:
        if a.source is not None:
            problems.append(f"synthetic takes no SOURCE (got '{a.source}'); use --count and --seed")
        if a.count is None or a.count < 1:
            problems.append("synthetic needs --count N (N >= 1)")
        if a.seed < 0:
            problems.append(f"--seed must be >= 0, got {a.seed}")
        problems += shapes_config_from_args(a, size=a.size, frames=a.frames, fps=a.fps)[1]
    else:
        if a.source is None:
            problems.append(f"{a.kind} needs a SOURCE folder")
        elif not a.source.is_dir():
            problems.append(f"SOURCE '{a.source}' is not a folder")
        if a.count is not None:
            problems.append("--count is only for synthetic")
        problems += [f"{flag} is only for synthetic" for flag in synthetic_flags_given(a)]
    if a.split_list is not None and (a.kind != "ucf101" or not a.split_list.is_file()):
        problems.append(f"--split-list must be an existing file and KIND ucf101 (got '{a.split_list}', {a.kind})")
    if a.annotations is not None and (a.kind != "kinetics" or not a.annotations.is_file()):
        problems.append(f"--annotations must be an existing file and KIND kinetics (got '{a.annotations}', {a.kind})")
    if a.split is not None and a.kind != "kinetics":
        problems.append("--split is only for kinetics (ucf101 uses --split-list)")
    if a.out.exists() and not a.out.is_dir():
        problems.append(f"--out '{a.out}' exists and is not a folder")
    elif (problem := _existing_run(a.out)) is not None and not a.overwrite:
        problems.append(problem)
    elif (problem := folder_problem("--out", a.out)) is not None:  # e.g. under /proc, or on a read-only disk
        problems.append(problem)
    if problems:
        p.error("\n  ".join(problems))


def _existing_run(out: Path) -> str | None:
    """One line when ``out`` holds shards already: a finished run's, or an unfinished (killed) one's."""
    if not out.is_dir():
        return None
    done, partial = sorted(out.glob("shard-*.tar")), temporaries(out, "shard-*.tar")
    if partial or (done and not (out / "summary.json").is_file()):
        return (f"--out '{out}' holds an unfinished run ({len(done)} complete shards, {len(partial)} partial, "
                f"no summary.json); pass --overwrite to start it again")
    if done:
        return f"--out '{out}' already holds shards; pass --overwrite to replace them"
    return None


def _clear(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote (shards, partial shards, its summary)."""
    for old in [*out.glob("shard-*.tar"), *temporaries(out, "shard-*.tar"), out / "summary.json"]:
        old.unlink(missing_ok=True)


def write_summary(out: Path, report: dict) -> None:
    """summary.json, atomically (written last: a folder without one holds an unfinished run)."""
    with atomic_write(out / "summary.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2) + "\n")


def _list_jobs(parser: argparse.ArgumentParser, a: argparse.Namespace) -> tuple[list[Job], list[Skip]]:
    """The jobs of SOURCE; a SOURCE with nothing to write is a usage error (exit 2, one line, nothing written)."""
    try:
        if a.kind == "synthetic":
            jobs, skips = list_synthetic(a.count, a.seed)
        elif a.kind == "folder":
            jobs, skips = list_folder(a.source, a.follow_symlinks)
        elif a.kind == "ucf101":
            jobs, skips = list_ucf101(a.source, a.split_list, a.follow_symlinks)
        else:
            jobs, skips = list_kinetics(a.source, a.annotations, a.split, a.follow_symlinks)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if not jobs:
        for skip in skips:
            _warn(skip)
        what = f"all {len(skips)} inputs were skipped (see above)" if skips else "it holds no input files"
        parser.error(f"no clips to write from {a.kind} SOURCE '{a.source}': {what}")
    return jobs, skips


def _work(a: argparse.Namespace):
    """``(work(job) -> (samples, skips), clips expected)`` for the layout."""
    if a.kind == "synthetic":
        cfg, _ = shapes_config_from_args(a, size=a.size, frames=a.frames, fps=a.fps)  # checked in _check_args
        return (lambda job: clips_from_shapes(job, cfg, a.seed)), 1
    opts = ClipOptions(a.frames, a.fps, a.size, crop=not a.no_crop, clips_per_video=a.clips_per_video,
                       max_side=a.max_side)
    return (lambda job: clips_from_video(job, opts)), a.clips_per_video


def _report(a: argparse.Namespace, summary: Summary) -> int:
    """summary.json and the closing lines; status 1 (and no summary) when no clip was written."""
    report = summary.to_dict()
    if summary.written:
        report["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
        write_summary(a.out, report)
        rate = summary.written / summary.seconds if summary.seconds else 0.0
        print(
            f"wrote {summary.written} clips in {summary.shards} shards ({summary.bytes / 1e6:.1f} MB) to {a.out} "
            f"in {summary.seconds:.1f} s ({rate:.1f} clips/s)"
        )
        print(f"shards: {a.out}/shard-{{000000..{summary.shards - 1:06d}}}.tar")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} inputs:")
        for category, n in report["skipped"].items():
            print(f"  {n:6d}  {category}")
    if not summary.written:
        print(f"error: no clips were written: all {len(summary.skipped)} inputs were skipped (see the warnings); "
              f"no shard and no summary.json in {a.out}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _check_args(parser, a)
    jobs, skips = _list_jobs(parser, a)
    work, per_job = _work(a)
    if a.overwrite and a.out.is_dir():
        _clear(a.out)
    try:
        summary = write_shards(jobs, work, a.out, shard_size=a.shard_size, workers=a.workers,
                               expected=len(jobs) * per_job, skips=skips, progress=not a.quiet)
    except KeyboardInterrupt:
        done = len(list(a.out.glob("shard-*.tar")))
        print(f"interrupted: {a.out} holds {done} complete shards and no partial one; rerun with --overwrite to "
              "start again", file=sys.stderr)
        return 130
    return _report(a, summary)


if __name__ == "__main__":
    run_cli(main, prog="python -m lvd.data.shards")
