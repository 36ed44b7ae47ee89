"""Teach the bundled demo a new colour with a LoRA adapter, end to end on a CPU.

Launch line (from the repository root)::

    python recipes/train_shapes_lora.py --work runs/lora_purple --threads 1

Steps, each a documented command of its own (the script prints them as it runs them):

1. **Data.** Clips of the new colour (``--color purple=128,0,255``) in the demo's ranges
   (:func:`lvd.data.synthetic.demo_config`), in every direction but one (``--held-out down``),
   plus replay clips of the seven colours the demo knows, so the adapter does not forget them.
2. **Latents.** ``python -m lvd.cache_latents`` with the demo's own VAE and all-MiniLM-L6-v2 at 16 tokens.
3. **LoRA.** ``recipes/train_latent_diffusion.py --config recipes/configs/shapes_lora.yaml`` with
   ``model.init_from`` the demo: rank-8 adapters on every attention projection and the MLPs, the base frozen.
   The export is the adapter alone: ``WORK/lora/export/lora/pytorch_lora_weights.safetensors``.
4. **Evaluation** with ``lvd.eval.shapes`` (the new colour in its palette) → ``benchmarks/results/shapes_lora.json``:
   the new colour on the held-out direction's captions, which fine-tuning never saw, before and after; the
   demo's 84 original captions with the adapter loaded.

Use the adapter: ``python -m lvd.generate --prompt "a purple circle moving down" --lora WORK/lora/export/lora``.
Every step is skipped when its output exists, and training resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lvd.data.synthetic import DEMO_TEXT_ENCODER, DEMO_TEXT_TOKENS
from lvd.train.stages import run_command, run_stage

REPO = Path(__file__).resolve().parents[1]


def write_clips(out: Path, count: int, seed: int, **subset) -> None:
    """``count`` clips in the demo's ranges, drawn from ``subset`` (colors / only_* of ShapesConfig)."""
    import dataclasses

    from lvd.data.shards import clips_from_shapes, write_shards, write_summary
    from lvd.data.sources import list_synthetic
    from lvd.data.synthetic import demo_config

    cfg = demo_config(**subset)
    jobs, skips = list_synthetic(count, seed)
    summary = write_shards(jobs, lambda job: clips_from_shapes(job, cfg, seed), out, shard_size=256, workers=1,
                           expected=count, skips=skips, progress=False)
    write_summary(out, {**summary.to_dict(), "shapes_config": dataclasses.asdict(cfg), "seed": seed})
    if summary.written != count:
        raise SystemExit(f"{out}: wrote {summary.written} of {count} clips")


def evaluate(model: Path, lora: Path | None, captions: list[str], seeds, palette: dict, threads: int) -> dict:
    """lvd.eval.shapes's summary of ``model`` (with the adapter ``lora``) on ``captions`` × ``seeds``."""
    import torch

    from lvd.eval.shapes import evaluate_pipeline
    from lvd.eval.shapes_score import summarize
    from lvd.pipeline import LVDPipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = LVDPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    scores = evaluate_pipeline(pipe, captions=captions, seeds=seeds, palette=palette)
    return summarize(scores)


def matmul_gflops(threads: int) -> float:
    """This CPU's fp32 matmul rate now (2048² by 2048²), to read the timings against: shared machines vary."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return round(5 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9, 1)


def main(argv: list[str] | None = None) -> int:
    from lvd.data.latents import uncond_path
    from lvd.data.synthetic import COLORS, DIRECTIONS, SHAPES, all_captions, parse_colors

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/lora_purple"), help="data, run and logs")
    p.add_argument("--model", type=Path, default=REPO / "lvd/assets/shapes-demo", help="the model to adapt")
    p.add_argument("--color", default="purple=128,0,255", help="NAME=R,G,B of the colour to teach")
    p.add_argument("--held-out", default="down", choices=DIRECTIONS, help="direction never shown in the new colour")
    p.add_argument("--clips", type=int, default=384, help="clips of the new colour")
    p.add_argument("--replay", type=int, default=256, help="clips of the colours the model knows")
    p.add_argument("--steps", type=int, default=None, help="default: shapes_lora.yaml's train.max_steps")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for train_latent_diffusion.py")
    p.add_argument("--eval-seeds", type=int, default=8, help="seeds per held-out caption of the new colour")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (0: torch's default)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/results", help="where shapes_lora.json goes")
    a = p.parse_args(argv)
    colors = parse_colors([a.color])
    name = next(iter(colors))
    work = a.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    py = sys.executable

    def stage(label: str, done: bool, fn) -> None:
        run_stage(timings, label, done, fn)

    def run_logged(cmd: list[str], log: str) -> None:  # the printed commands are relative to the repository root
        run_command(cmd, work / "logs" / log, threads=a.threads, cwd=REPO)

    data, latents, run = work / "data", work / "latents", work / "lora"
    seen = tuple(d for d in DIRECTIONS if d != a.held_out)
    stage("data", (data / "replay/summary.json").is_file(), lambda: (
        write_clips(data / "new", a.clips, seed=1, colors=colors, only_colors=(name,), only_directions=seen),
        write_clips(data / "replay", a.replay, seed=2)))
    for part in ("new", "replay"):
        cmd = [py, "-m", "lvd.cache_latents", "--shards", str(data / part), "--out", str(latents / part),
               "--vae", str(a.model / "vae"), "--text-encoder", DEMO_TEXT_ENCODER, "--max-length", str(DEMO_TEXT_TOKENS),
               "--device", "cpu", "--quiet"]
        stage(f"cache_{part}", uncond_path(latents / part).is_file(),
              lambda cmd=cmd, part=part: run_logged(cmd, f"cache_{part}.log"))
    shards = "::".join(str(p) for part in ("new", "replay") for p in sorted((latents / part).glob("shard-*.tar")))
    train_cmd = [py, "recipes/train_latent_diffusion.py", "--config", "recipes/configs/shapes_lora.yaml",
                 f"run.dir={run}", f"data.shards={shards}", f"model.init_from={a.model}",
                 f"components.vae={a.model / 'vae'}", f"components.uncond={uncond_path(latents / 'new')}",
                 *([f"train.cpu_threads={a.threads}"] if a.threads else []), *a.set]
    if a.steps:
        train_cmd.append(f"train.max_steps={a.steps}")
    stage("lora", (run / "export/lora/pytorch_lora_weights.safetensors").is_file(),
          lambda: run_logged(train_cmd, "lora.log"))

    lora = run / "export" / "lora"
    held_out = [f"a {name} {shape} moving {a.held_out}" for shape in SHAPES]
    seeds = tuple(range(a.eval_seeds))
    palette = {**COLORS, **colors}  # the scorer tells the new colour from the seven it knows
    print(f"[eval] {len(held_out)} held-out captions x {len(seeds)} seeds, then 84 x 2", flush=True)
    result = {
        "color": {name: list(colors[name])}, "held_out_direction": a.held_out, "held_out_captions": held_out,
        "new_color_before": evaluate(a.model, None, held_out, seeds, palette, a.threads)["accuracy"],
        "new_color_after": evaluate(a.model, lora, held_out, seeds, palette, a.threads)["accuracy"],
        "original_84_with_adapter": evaluate(a.model, lora, all_captions(), (0, 1), palette, a.threads)["accuracy"],
        "fine_tuning_seconds": round(sum(v for k, v in timings.items() if k != "data"), 1) if "lora" in timings else None,
        "stage_seconds": timings, "threads": a.threads, "cpu_fp32_matmul_gflops": matmul_gflops(a.threads), "adapter_bytes": (lora / "pytorch_lora_weights.safetensors").stat().st_size,
        "train_overrides": train_cmd[train_cmd.index("--config") + 2:],
    }
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "shapes_lora.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
