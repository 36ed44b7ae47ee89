"""Continuation of the bundled demo against the guidance scale: does classifier-free guidance set the speed at which
a continued clip moves on (and so the step at the seam)?

Each guidance value runs ``python -m lvd.eval.shapes --modes continuation --guidance G``'s measurement (17 given
frames of each caption's reference continued to 33, every caption × the seeds) and keeps its summary.

    python -m benchmarks.continuation_guidance                     # the bundled demo, guidance 2 3 4 5
    python -m benchmarks.continuation_guidance --model runs/demo/model --guidance 1 5 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import report
from lvd.data.synthetic import all_captions
from lvd.eval import shapes_i2v
from lvd.pipeline import LVDPipeline

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "lvd/assets/shapes-demo"))
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", type=Path, default=report.RESULTS / "shapes_continuation_guidance.json")
    a = p.parse_args(argv)
    head = report.header("continuation_guidance", argv)

    pipe = LVDPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    captions = all_captions()
    by_guidance = {}
    for g in a.guidance:
        start = time.perf_counter()
        scores = shapes_i2v.evaluate_continuation(pipe, captions, seeds=a.seeds, num_inference_steps=a.steps,
                                                  guidance_scale=g)
        s = shapes_i2v.summarize_continuation(scores)
        by_guidance[f"{g:g}"] = {"clips": s["clips"], "direction": s["accuracy"]["direction"],
                                 "median_step_px": s["median_step_px"], "seam_excess_px": s["seam_excess_px"],
                                 "seconds": round(time.perf_counter() - start, 1)}
        e = s["seam_excess_px"]
        print(f"guidance {g:g}: made median step {s['median_step_px']['made']:.2f} px "
              f"(given {s['median_step_px']['given']:.2f}), seam excess max {e['max']:.2f} px, "
              f"{round(e['share_within_1.5'] * s['clips'])}/{s['clips']} within 1.5, "
              f"direction {s['accuracy']['direction']:.1%}", flush=True)
    model = str(Path(a.model).resolve()).removeprefix(f"{REPO}/")
    report.write({**head, "model": model, "seeds": a.seeds, "steps": a.steps, "by_guidance": by_guidance}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
