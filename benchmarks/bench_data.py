"""Data-stage throughput: writing shards, and loading clips from shards vs. from individual files.

    python -m benchmarks.bench_data                     # ~2 min on 2 cores; writes benchmarks/results/data.json
    python -m benchmarks.bench_data --videos 32 --workers 1 2 4

1. Make ``--videos`` source videos: 640x360, 30 fps, ``--seconds`` long, H.264 yuv420p (a
   moving textured scene, so the codec has real work).
2. Write shards: ``python -m lvd.data.shards folder`` logic, 2 clips of 17 frames at 8 fps per
   video, 256 px, with 1 and 2 workers. Reports clips/s and MB/s of shards written.
3. Load 17x256x256 clips as training batches (B=4, float in [-1, 1]) with 1 and 2 DataLoader
   workers, from
   - the shards (``lvd.data.loader.make_clip_loader``), and
   - the same clips from the individual source files, the way a loader without shards does it:
     imageio-ffmpeg's ``read_frames`` (imageio's ffmpeg backend) with ``-ss`` seeking, full-size
     frames at the native rate, every n-th frame kept, then a torch resize and centre crop.
   Reports clips/s and MB/s of compressed input read (for per-file, the whole source files).
The goal: shards >= 2x per-file at equal workers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import report
from lvd.data.codecs import Bucket, crop_clip
from lvd.data.loader import ClipDataConfig, make_clip_loader
from lvd.data.shards import ClipOptions, clip_starts, clips_from_video, write_shards
from lvd.data.sources import list_folder
from lvd.video_io import probe_video, write_video

FRAMES, FPS, SIZE, BATCH = 17, 8.0, 256, 4


def make_sources(folder: Path, count: int, seconds: float, seed: int = 0) -> None:
    """``count`` 640x360 30 fps videos of a drifting smooth texture with a moving bright block."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * 30))
    for i in range(count):
        base = torch.from_numpy(rng.random((1, 3, 12, 20), dtype=np.float32))
        tex = F.interpolate(base, size=(480, 800), mode="bicubic", align_corners=False)[0].clamp(0, 1)  # (3, 480, 800)
        frames = torch.empty(3, n, 360, 640)
        dy, dx = rng.integers(1, 3, size=2)
        for t in range(n):
            y, x = (t * dy) % 120, (t * dx) % 160
            frames[:, t] = tex[:, y : y + 360, x : x + 640]
            bx = (40 + 5 * t) % 560
            frames[:, t, 140:220, bx : bx + 80] = 1.0
        write_video(folder / f"video_{i:03d}.mp4", (frames * 255).round().to(torch.uint8), fps=30, crf=20)
        (folder / f"video_{i:03d}.txt").write_text(f"benchmark clip {i}\n")


class PerFileClips(torch.utils.data.IterableDataset):
    """The no-shards baseline: each clip decoded from its source file with imageio-ffmpeg."""

    def __init__(self, items: list[tuple[Path, float, str]]):
        self.items = items

    def __iter__(self):
        import imageio_ffmpeg

        info = torch.utils.data.get_worker_info()
        mine = self.items[info.id :: info.num_workers] if info else self.items
        batch = []
        for path, start, caption in mine:
            meta = probe_video(path)
            step = meta.fps / FPS
            need = int(np.ceil((FRAMES - 1) * step)) + 1
            gen = imageio_ffmpeg.read_frames(str(path), input_params=["-ss", f"{start:.3f}"])
            m = next(gen)  # metadata dict
            w, h = m["size"]
            frames = []
            for raw in gen:
                frames.append(np.frombuffer(raw, np.uint8).reshape(h, w, 3))
                if len(frames) == need:
                    break
            gen.close()
            picks = [int(round(k * step)) for k in range(FRAMES)]
            video = torch.from_numpy(np.stack([frames[p] for p in picks])).permute(3, 0, 1, 2)  # (C, T, H, W)
            video = video.float() / 127.5 - 1
            batch.append(crop_clip(video, Bucket(FRAMES, SIZE, SIZE, BATCH), None))
            if len(batch) == BATCH:
                yield {"video": torch.stack(batch), "caption": [caption] * BATCH}
                batch = []


def time_loader(make, clips_expected: int) -> tuple[float, int]:
    start = time.perf_counter()
    clips = 0
    for b in make():
        assert b["video"].shape[1:] == (3, FRAMES, SIZE, SIZE)
        clips += b["video"].shape[0]
    return time.perf_counter() - start, clips


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--seconds", type=float, default=2.5)
    p.add_argument("--clips-per-video", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=report.RESULTS / "data.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    head = report.header("bench_data", argv)

    with tempfile.TemporaryDirectory(prefix="lvd-bench-data-") as tmp:
        tmp = Path(tmp)
        src = tmp / "videos"
        src.mkdir()
        t0 = time.perf_counter()
        make_sources(src, a.videos, a.seconds)
        src_bytes = sum(f.stat().st_size for f in src.glob("*.mp4"))
        print(f"made {a.videos} source videos (640x360, 30 fps, {a.seconds:g} s, {src_bytes / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")

        # 2. Write shards.
        jobs, _ = list_folder(src)
        opts = ClipOptions(frames=FRAMES, fps=FPS, size=SIZE, clips_per_video=a.clips_per_video)
        write_rows = []
        for w in a.workers:
            out = tmp / f"shards_w{w}"
            s = write_shards(jobs, lambda job: clips_from_video(job, opts), out, shard_size=8, workers=w,
                             expected=len(jobs) * a.clips_per_video, progress=False)  # fmt: skip
            write_rows.append({"workers": w, "clips": s.written, "seconds": round(s.seconds, 2),
                               "clips_per_s": round(s.written / s.seconds, 2), "MB_per_s": round(s.bytes / 1e6 / s.seconds, 3),
                               "shard_MB": round(s.bytes / 1e6, 2)})  # fmt: skip
        shards = tmp / f"shards_w{a.workers[0]}"
        shard_bytes = sum(f.stat().st_size for f in shards.glob("*.tar"))

        # 3. Load.
        n_clips = len(jobs) * a.clips_per_video
        items = []
        for job in jobs:
            dur = probe_video(job.path).duration
            items += [(job.path, s, job.caption) for s in clip_starts(dur, FRAMES / FPS, a.clips_per_video)]
        load_rows = []
        for w in a.workers:
            cfg = ClipDataConfig(shards=str(shards), frames=FRAMES, size=SIZE, batch_size=BATCH, shuffle=16,
                                 workers=w, epochs=1, random_crop=False)  # fmt: skip
            sec, clips = time_loader(lambda: make_clip_loader(cfg, seed=0), n_clips)
            load_rows.append({"path": "shards", "workers": w, "clips": clips, "seconds": round(sec, 2),
                              "clips_per_s": round(clips / sec, 2), "MB_per_s": round(shard_bytes / 1e6 / sec, 3)})  # fmt: skip
            sec, clips = time_loader(
                lambda: torch.utils.data.DataLoader(PerFileClips(items), batch_size=None, num_workers=w), n_clips
            )
            load_rows.append({"path": "per-file imageio-ffmpeg", "workers": w, "clips": clips, "seconds": round(sec, 2),
                              "clips_per_s": round(clips / sec, 2), "MB_per_s": round(src_bytes / 1e6 / sec, 3)})  # fmt: skip

    speedup = {}
    for w in a.workers:
        sh = next(r for r in load_rows if r["path"] == "shards" and r["workers"] == w)
        pf = next(r for r in load_rows if r["path"] != "shards" and r["workers"] == w)
        speedup[str(w)] = round(sh["clips_per_s"] / pf["clips_per_s"], 2)

    import imageio_ffmpeg

    result = {
        **head,
        "ffmpeg": imageio_ffmpeg.get_ffmpeg_version(),
        "setup": {"videos": a.videos, "seconds": a.seconds, "source": "640x360 30 fps H.264 yuv420p",
                  "clip": f"{FRAMES}x{SIZE}x{SIZE} at {FPS:g} fps", "clips_per_video": a.clips_per_video,
                  "batch_size": BATCH},
        "write": write_rows,
        "load": load_rows,
        "shards_speedup_over_per_file": speedup,
    }
    report.write(result, a.out)

    print(f"\nwriting shards ({FRAMES}x{SIZE}x{SIZE} clips from 640x360 sources)")
    print("| workers | clips/s | MB/s written |\n|---|---|---|")
    for r in write_rows:
        print(f"| {r['workers']} | {r['clips_per_s']:.1f} | {r['MB_per_s']:.2f} |")
    print(f"\nloading {FRAMES}x{SIZE}x{SIZE} clips, batches of {BATCH}")
    print("| path | workers | clips/s | MB/s read | shards speed-up |\n|---|---|---|---|---|")
    for r in load_rows:
        up = f"{speedup[str(r['workers'])]:.2f}x" if r["path"] == "shards" else ""
        print(f"| {r['path']} | {r['workers']} | {r['clips_per_s']:.1f} | {r['MB_per_s']:.2f} | {up} |")
    print(f"\n{result['date']}, {result['machine']['cpu']}, {result['machine']['cores']} cores")


if __name__ == "__main__":
    main()
