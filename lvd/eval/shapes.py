"""Score a moving-shapes model: generate captions with it and measure the clips (``python -m lvd.eval.shapes``).

``python -m lvd.eval.shapes --model DIR`` generates every one of the 84 captions with 2 seeds and prints
per-attribute accuracy and confusion tables. The flags of :func:`lvd.data.synthetic.add_synthetic_arguments`
extend the palette and choose the captions, as they do for the data: ``--colors orange=255,128,0
--only-colors orange`` scores the 12 orange captions with orange in the palette (``--limit N`` then keeps the
first N). :func:`score_clip` is a pure function usable on any clip.

``--modes i2v continuation`` adds image-to-video and continuation (:mod:`lvd.eval.shapes_i2v`). The measurements
themselves are :mod:`lvd.eval.shapes_score` (colour, shape, direction, consistency; re-exported here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lvd.data.synthetic import add_synthetic_arguments, all_captions, shapes_config_from_args
from lvd.eval.shapes_score import COLORS, format_report, palette_hues, parse_caption, score_clip, summarize

__all__ = ["MODES", "evaluate_pipeline", "main"]

MODES = ("t2v", "i2v", "continuation")


def evaluate_pipeline(pipe, *, captions: list[str] | None = None, seeds=(0, 1), num_frames: int = 17,
                      height: int = 64, width: int = 64, num_inference_steps: int = 25,
                      guidance_scale: float = 5.0, batch_size: int = 12, progress: bool = False,
                      palette=None) -> list[dict]:
    """Generate every caption with every seed through ``pipe`` (an :class:`lvd.pipeline.LVDPipeline`) and score
    each clip against ``palette`` (see :func:`score_clip`). Clip (caption i, seed s) uses
    ``torch.Generator().manual_seed(1000 · s + i)``, so a score does not depend on the batch size."""
    captions = captions or all_captions()
    for caption in captions:  # a bad caption or palette fails here, before any generation
        parse_caption(caption, COLORS if palette is None else palette)
    palette_hues(palette)
    jobs = [(caption, seed, 1000 * seed + i) for seed in seeds for i, caption in enumerate(captions)]
    scores = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(noise_seed) for _, _, noise_seed in chunk]
        frames = pipe(
            [caption for caption, _, _ in chunk], num_frames=num_frames, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generators,
            output_type="pt",
        ).frames  # (B, T, 3, H, W) in [0, 1]
        for (caption, seed, _), clip in zip(chunk, frames):
            video = (clip.permute(1, 0, 2, 3) * 255).round().to(torch.uint8)  # (3, T, H, W)
            scores.append({**score_clip(video, caption, palette), "seed": seed})
        if progress:
            print(f"  {len(scores)}/{len(jobs)} clips", file=sys.stderr, flush=True)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvd.eval.shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder (model_index.json, transformer/, vae/, ...)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--sampler", default=None, help="euler, ddim, dpm++ or unipc (default: the saved scheduler)")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N captions (after --only-*; smoke tests)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lora", default=None, metavar="PATH", help="apply this LoRA adapter (folder or file)")
    parser.add_argument("--json", default=None, help="also write per-clip scores and the summary here")
    parser.add_argument("--modes", nargs="+", default=["t2v"], choices=MODES,
                        help="t2v (text-to-video, default), i2v (from a reference's first frame) and/or continuation "
                             "(17 frames of a reference continued to 33); see lvd.eval.shapes_i2v")
    parser.add_argument("--context-frames", type=int, default=9,
                        help="continuation: frames kept clean at the start of each new window (default 9)")
    add_synthetic_arguments(parser)  # --colors (the palette), --only-colors/-shapes/-directions (the captions)
    args = parser.parse_args(argv)
    cfg, problems = shapes_config_from_args(args)
    if cfg is not None:
        try:
            palette_hues(cfg.palette)
        except ValueError as e:  # e.g. a colour the scorer cannot tell apart from white or another one
            problems = [f"--colors: {e}"]
    if problems:
        parser.error("\n  ".join(problems))

    from lvd.pipeline import LVDPipeline  # the scorer above needs no model; only the CLI loads one

    pipe = LVDPipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        try:
            pipe.load_lora_weights(args.lora)
        except ValueError as e:
            parser.error(f"--lora: {e}")
    if args.sampler:
        pipe.set_sampler(args.sampler)
    captions = all_captions(cfg)[: args.limit] if args.limit else all_captions(cfg)
    result: dict = {"args": vars(args)}
    if "t2v" in args.modes:
        start = time.perf_counter()
        scores = evaluate_pipeline(pipe, captions=captions, seeds=args.seeds, num_frames=args.frames,
                                   height=args.size, width=args.size,
                                   num_inference_steps=args.steps, guidance_scale=args.guidance,
                                   batch_size=args.batch_size, progress=True, palette=cfg.palette)
        seconds = time.perf_counter() - start
        summary = summarize(scores)
        print(format_report(summary, colors=list(cfg.palette)))
        print(f"\n{len(scores)} clips in {seconds:.1f} s ({seconds / max(len(scores), 1):.2f} s per clip), "
              f"{args.steps} steps, guidance {args.guidance}, sampler {args.sampler or type(pipe.scheduler).__name__}")
        result.update(summary=summary, clips=scores, seconds=seconds)
    result.update(_clean_frame_modes(pipe, args, captions, cfg.colors))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


def _clean_frame_modes(pipe, args, captions: list[str], colors: dict) -> dict:
    """The i2v and continuation modes asked for: {mode: {"summary", "clips", "seconds"}}, reports printed."""
    from lvd.eval import shapes_i2v

    common = {"seeds": args.seeds, "size": args.size, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
              "progress": True, "colors": colors}
    runs = {
        "i2v": (lambda: shapes_i2v.evaluate_image_to_video(pipe, captions, num_frames=args.frames, **common),
                shapes_i2v.summarize_image_to_video),
        "continuation": (lambda: shapes_i2v.evaluate_continuation(pipe, captions, context=args.context_frames,
                                                                  **common), shapes_i2v.summarize_continuation),
    }
    out = {}
    for mode, (evaluate, summarize_mode) in runs.items():
        if mode not in args.modes:
            continue
        start = time.perf_counter()
        scores = evaluate()
        seconds = time.perf_counter() - start
        summary = summarize_mode(scores)
        print("\n" + shapes_i2v.format_i2v_report(mode, summary) + f"\n  {seconds:.1f} s")
        out[mode] = {"summary": summary, "clips": scores, "seconds": seconds}
    return out


if __name__ == "__main__":
    sys.exit(main())
