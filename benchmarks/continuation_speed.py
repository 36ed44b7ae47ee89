"""Does a continued clip keep its own speed? The bundled demo continues clips of three speed ranges, and the made
speed is regressed on the given one over all of them.

Each setting is :func:`lvd.eval.shapes_i2v.evaluate_continuation` with its own ``given`` and ``total``: the
reference is a motion over ``total`` frames (the demo's travel spread over them, so fewer frames move faster),
its first ``given`` frames are continued to ``total`` (windows of 17 frames, the last 9 kept clean).

- ``9 of 17``: the first 9 frames of a full-length clip of :func:`lvd.data.synthetic.demo_config` (about 1.4–2.5 px
  a frame);
- ``17 of 25``: a motion over 25 frames (about 0.9–1.7 px a frame);
- ``17 of 33``: the continuation evaluation itself (about 0.7–1.25 px a frame);
- ``9 of 33``: as slow, but seen from the path's start as a full-length clip is: with ``17 of 33`` (the same speeds
  seen mid-path) it tells whether the model takes the speed from where the shape is rather than how far it moved.

A model that carries the speed of what it is given makes ``slope`` ≈ 1 (made median step on given median step,
least squares over every clip of the first three settings); one that moves at its own speed whatever it is given, ≈ 0.

    python -m benchmarks.continuation_speed                               # the bundled demo, seed 0
    python -m benchmarks.continuation_speed --model runs/demo/model --out /tmp/speed.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import report
from lvd.data.synthetic import all_captions
from lvd.eval import shapes_i2v
from lvd.pipeline import LVDPipeline

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ((9, 17), (17, 25), (17, 33), (9, 33))  # (given, total) frames
POOLED = 3  # the regression pools the first three settings (one speed range each)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "lvd/assets/shapes-demo"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--limit", type=int, default=None, help="only the first N of the 84 captions")
    p.add_argument("--out", type=Path, default=report.RESULTS / "shapes_continuation_speed.json")
    a = p.parse_args(argv)
    head = report.header("continuation_speed", argv)

    pipe = LVDPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    captions = all_captions()[:a.limit]
    by_setting, given_all, made_all = {}, [], []
    for n, (given, total) in enumerate(SETTINGS):
        start = time.perf_counter()
        scores = shapes_i2v.evaluate_continuation(pipe, captions, seeds=a.seeds, given=given, total=total,
                                                  num_inference_steps=a.steps, guidance_scale=a.guidance)
        g = [s["median_step_px"] for s in scores]
        m = [s["made_median_step_px"] for s in scores]
        if n < POOLED:
            given_all += g
            made_all += m
        s = shapes_i2v.summarize_continuation(scores)
        by_setting[f"{given} of {total}"] = {
            "clips": s["clips"], "direction": s["accuracy"]["direction"],
            "given_step_px": {"mean": float(np.mean(g)), "min": float(np.min(g)), "max": float(np.max(g))},
            "made_step_px": {"mean": float(np.nanmean(m)), "min": float(np.nanmin(m)), "max": float(np.nanmax(m))},
            "speed_following": s["speed_following"], "seam_excess_px": s["seam_excess_px"],
            "seconds": round(time.perf_counter() - start, 1)}
        print(f"{given} of {total}: given step {np.mean(g):.2f} px, made {np.nanmean(m):.2f} px, "
              f"direction {s['accuracy']['direction']:.1%}", flush=True)
    pooled = shapes_i2v.speed_following(given_all, made_all)
    print(f"all: made step = {pooled['slope']:.2f} x given step + c, correlation {pooled['correlation']:.2f} "
          f"over {pooled['clips']} clips", flush=True)
    model = str(Path(a.model).resolve()).removeprefix(f"{REPO}/")
    result = {**head, "model": model, "seeds": a.seeds, "steps": a.steps, "guidance": a.guidance,
              "captions": len(captions), "speed_following": pooled, "by_setting": by_setting}
    report.write(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
