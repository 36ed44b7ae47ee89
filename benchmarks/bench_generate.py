"""Generation speed and memory on this machine, per stage: text encoding, denoising (s/step), decoding.

    python -m benchmarks.bench_generate                      # every config, writes benchmarks/results/generate.json
    python -m benchmarks.bench_generate --configs tiny-256   # one config
    python -m benchmarks.bench_generate --steps 10 --device cuda

Configs:
- ``demo``: the bundled demo pipeline (lvd/assets/shapes-demo/) at 64×64, 17 frames, 25 steps, guidance 5.
  Skipped, with a note in the JSON, while that folder does not exist.
- ``tiny-64``: the ``tiny-256`` model at the demo's 64×64, 17 frames: the demo's cost before it is trained.
- ``tiny-256``: random weights, VideoDiT preset "tiny" (width 128, 4 blocks, patch 1×2×2) over CausalVideoVAE
  preset "tiny" (4× time, 4× space, 16 channels) at 256×256, 17 frames (5120 tokens), 25 steps, guidance 5,
  with the real all-MiniLM-L6-v2 text encoder when its package is installed (else a small random CLIP).

``--threads 1 2`` runs each config once per torch thread count. On a CPU shared with other busy processes,
2 threads can be far slower than 1: every op ends at a thread-pool barrier that waits for a descheduled
thread (at load average 11 on 2 cores, a VideoDiT "tiny" forward over 320 tokens takes 4.5 s with 2 threads,
0.1 s with 1).

Each config runs in its own subprocess, so ``peak_rss_gb`` (ru_maxrss) is that config's peak, not the
largest so far; ``rss_after_load_gb`` is the resident size before generating. One warm-up call (2 steps)
precedes the timed call. The header (:func:`benchmarks.report.header`) records the load average, because other
processes share the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "lvd" / "assets" / "shapes-demo"
CONFIGS = {
    "demo": dict(frames=17, height=64, width=64),
    "tiny-256": dict(frames=17, height=256, width=256),
    "tiny-64": dict(frames=17, height=64, width=64),  # the demo's shapes with random weights, while it is missing
}


def _rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def build_tiny(folder: Path) -> str:
    """Save a random tiny pipeline to ``folder``; returns a description of its text encoder."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lvd.pipeline.assembly import load_text_encoder
    from lvd.diffusion import DiffusionConfig
    from lvd.dit import VideoDiT
    from lvd.pipeline import LVDPipeline
    from lvd.vae import CausalVideoVAE

    torch.manual_seed(0)
    try:
        text_model, tokenizer = load_text_encoder("all-minilm-l6-v2")  # at its own length, as the demo generates
        described = f"all-MiniLM-L6-v2 (max_length {tokenizer.model_max_length})"
    except (FileNotFoundError, OSError, ImportError):
        chars = "abcdefghijklmnopqrstuvwxyz"
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(chars)},
                 **{c + "</w>": 28 + i for i, c in enumerate(chars)}}
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
        text_model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=384, intermediate_size=1536,
                                                  num_hidden_layers=6, num_attention_heads=6))
        described = "random CLIP text model (384 wide, 6 layers; all-MiniLM-L6-v2 not installed)"
    width = text_model.config.hidden_size
    vae = CausalVideoVAE.from_preset("tiny")
    transformer = VideoDiT.from_preset("tiny", in_channels=vae.latent_channels, text_dim=width, pooled_dim=width)
    LVDPipeline.from_components(transformer=transformer, vae=vae, text_encoder=text_model, tokenizer=tokenizer,
                                diffusion=DiffusionConfig(objective="flow")).save_pretrained(folder)
    return described


def run_one(name: str, steps: int, guidance: float, device: str, threads: int) -> dict:
    """Load, warm up and time one config in this process."""
    import torch

    from lvd.dit import count_parameters
    from lvd.pipeline import LVDPipeline

    torch.set_num_threads(threads)
    size = CONFIGS[name]
    with tempfile.TemporaryDirectory(prefix="lvd-bench-") as tmp:
        if name == "demo":
            folder, text = DEMO, "as shipped"
        else:
            folder = Path(tmp) / name
            text = build_tiny(folder)
        began = time.perf_counter()
        pipe = LVDPipeline.from_pretrained(folder).to(device)
        load_s = time.perf_counter() - began
    pipe.set_progress_bar_config(disable=True)
    rss_loaded = _current_rss_gb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    prompt = "a red circle moving right"
    kwargs = dict(num_frames=size["frames"], height=size["height"], width=size["width"], guidance_scale=guidance,
                  output_type="pt")
    pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs)  # warm-up
    began = time.perf_counter()
    out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)
    total = time.perf_counter() - began
    latent = pipe.video_vae.latent_shape(size["frames"], size["height"], size["width"])
    pt, ph, pw = pipe.patch_size
    result = {
        "config": name,
        "frames": size["frames"], "height": size["height"], "width": size["width"],
        "steps": steps, "guidance": guidance, "device": device, "threads": torch.get_num_threads(),
        "scheduler": type(pipe.scheduler).__name__,
        "latent_shape": list(latent),
        "tokens": latent[1] // pt * (latent[2] // ph) * (latent[3] // pw),
        "transformer_params_m": round(count_parameters(pipe.transformer) / 1e6, 2),
        "vae_params_m": round(count_parameters(pipe.vae) / 1e6, 2),
        "text_encoder": text,
        "text_encoder_params_m": round(count_parameters(pipe.text_encoder) / 1e6, 2),
        "load_s": round(load_s, 2),
        "seconds_per_video": round(total, 2),
        "text_encoding_s": round(out.timings["text_encoding"], 3),
        "denoising_s": round(out.timings["denoising"], 2),
        "denoising_s_per_step": round(out.timings["denoising_per_step"], 3),
        "decoding_s": round(out.timings["decoding"], 2),
        "rss_after_load_gb": round(rss_loaded, 2),
        "peak_rss_gb": round(_rss_gb(), 2),
    }
    if device.startswith("cuda"):
        result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["demo", "tiny-64", "tiny-256"], choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1],
                        help="torch threads; several values run each config once per value")
    parser.add_argument("--output", default=str(report.RESULTS / "generate.json"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args(argv)

    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.guidance, args.device, args.threads[0])))
        return 0

    head = report.header("bench_generate", argv)
    results, skipped = [], {}
    for name in args.configs:
        if name == "demo" and not (DEMO / "model_index.json").is_file():
            skipped[name] = f"{DEMO.relative_to(ROOT)} does not exist yet (the shapes-demo recipe builds it)"
            print(f"skip {name}: {skipped[name]}")
            continue
        for threads in args.threads:
            cmd = [sys.executable, "-m", "benchmarks.bench_generate", "--one", name, "--steps", str(args.steps),
                   "--guidance", str(args.guidance), "--device", args.device, "--threads", str(threads)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"config {name} failed (exit {proc.returncode})")
            results.append(json.loads(lines[-1][len("RESULT "):]))

    header = (f"{'config':<10}{'thr':>4}{'size':>14}{'tokens':>8}{'s/video':>9}{'text s':>8}{'s/step':>8}{'decode s':>10}"
              f"{'peak GB':>9}")
    print(header)
    for r in results:
        size = f"{r['frames']}x{r['height']}x{r['width']}"
        print(f"{r['config']:<10}{r['threads']:>4}{size:>14}{r['tokens']:>8}{r['seconds_per_video']:>9.2f}{r['text_encoding_s']:>8.3f}"
              f"{r['denoising_s_per_step']:>8.3f}{r['decoding_s']:>10.2f}{r['peak_rss_gb']:>9.2f}")
    report.write({**head, "results": results, "skipped": skipped}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
