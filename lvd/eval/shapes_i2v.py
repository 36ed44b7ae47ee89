"""Image-to-video and continuation scores for moving-shapes models (the ``i2v`` and ``continuation`` modes of
``python -m lvd.eval.shapes``). No learned model: the measurements of :mod:`lvd.eval.shapes_score`.

Each caption gets a reference clip rendered by :mod:`lvd.data.synthetic` with the demo's geometry
(:func:`lvd.data.synthetic.demo_config`, so the shape starts where the caption's motion can run); clip
(caption i, seed s) is drawn from ``numpy.random.default_rng([s, i, 7])`` and generated with
``torch.Generator().manual_seed(1000 · s + i)``.

- **i2v**: the reference's first frame is the ``image=``. Per clip: PSNR (dB, pixels in [0, 1]) of the first
  generated frame against the image, the distance (px) between the shape's centre in the two (centres as
  :func:`lvd.eval.shapes_score.frame_centres` measures them), and colour / shape / direction of the whole generated
  clip (:func:`lvd.eval.shapes_score.score_clip`). Targets of the bundled demo: PSNR ≥ 28 dB, centre within 3 px,
  direction ≥ 90%.
- **continuation**: the reference is a motion over ``total`` frames (33: the demo's speed range spread over
  twice the frames); its first ``given`` (17) frames are continued to ``total`` by :meth:`LVDPipeline.extend`
  (``window`` 17 frames, the last ``context`` 9 kept clean). Per clip: the centre's step across the seam (the
  last given frame to the first generated one) against the median step of the given frames (the seam is
  smooth when they differ by ≤ 1.5 px), the same at each later window's seam, the median step of the
  generated frames (the speed kept), and colour / shape / direction of the part from the last given frame on.
  Over all clips, ``speed_following``: the least-squares slope and the correlation of the made median step on
  the given one (slope 1: the continuation carries each clip's own speed; 0: one speed whatever the clip's).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from lvd.data.synthetic import demo_config, render_clip
from lvd.eval.shapes_score import frame_centres, parse_caption, score_clip

PSNR_TARGET_DB = 28.0
CENTRE_TARGET_PX = 3.0
SEAM_TARGET_PX = 1.5


def reference_clip(caption: str, index: int, seed: int, frames: int = 17, size: int = 64,
                   colors: dict | None = None) -> torch.Tensor:
    """The reference clip (3, frames, size, size) uint8 of caption ``index`` and ``seed`` (module docstring);
    ``colors``: extra colours {name: RGB} the caption may name."""
    cfg = demo_config(frames=frames, size=size, colors=colors or {})
    truth = parse_caption(caption, cfg.palette)
    return render_clip(truth["color"], truth["shape"], truth["direction"], cfg, np.random.default_rng([seed, index, 7]))


def _uint8(frames: np.ndarray) -> torch.Tensor:
    """A pipeline's ``output_type="np"`` video (T, H, W, 3) in [0, 1] → uint8 (3, T, H, W)."""
    return torch.from_numpy(np.rint(np.asarray(frames) * 255).astype(np.uint8)).permute(3, 0, 1, 2)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two uint8 images or clips of one shape, pixels in [0, 1]."""
    mse = float(((a.double() - b.double()) / 255).pow(2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def _jobs(captions, seeds):
    return [(caption, i, seed) for seed in seeds for i, caption in enumerate(captions)]


def evaluate_image_to_video(pipe, captions: list[str], *, seeds=(0,), num_frames: int = 17, size: int = 64,
                            num_inference_steps: int = 25, guidance_scale: float = 5.0,
                            progress: bool = False, colors: dict | None = None) -> list[dict]:
    """Generate each caption from its reference's first frame; per-clip measurements (module docstring).
    ``colors``: extra colours {name: RGB} of the captions (scored against the palette they join)."""
    palette = demo_config(colors=colors or {}).palette
    scores = []
    for caption, i, seed in _jobs(captions, seeds):
        reference = reference_clip(caption, i, seed, frames=num_frames, size=size, colors=colors)
        image = reference[:, 0]  # (3, H, W) uint8
        frames = pipe(caption, image=image, num_frames=num_frames, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(1000 * seed + i),
                      output_type="np").frames[0]
        video = _uint8(frames)
        (x0, y0), (x1, y1) = frame_centres(reference[:, :1])[0], frame_centres(video[:, :1])[0]
        scores.append({**score_clip(video, caption, palette), "seed": seed, "psnr_first_db": psnr_db(video[:, 0], image),
                       "centre_error_px": float(np.hypot(x1 - x0, y1 - y0))})
        if progress:
            print(f"  i2v {len(scores)}/{len(captions) * len(seeds)}", file=sys.stderr, flush=True)
    return scores


def evaluate_continuation(pipe, captions: list[str], *, seeds=(0,), given: int = 17, total: int = 33, size: int = 64,
                          window: int = 17, context: int = 9, num_inference_steps: int = 25,
                          guidance_scale: float = 5.0, progress: bool = False,
                          colors: dict | None = None) -> list[dict]:
    """Continue the first ``given`` frames of each caption's ``total``-frame reference; per-clip measurements."""
    palette = demo_config(colors=colors or {}).palette
    scores = []
    for caption, i, seed in _jobs(captions, seeds):
        reference = reference_clip(caption, i, seed, frames=total, size=size, colors=colors)
        frames = pipe.extend(reference[:, :given], caption, num_frames=total, window_frames=window,
                             context_frames=context, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(1000 * seed + i),
                             output_type="np").frames[0]
        video = _uint8(frames)
        steps = np.linalg.norm(np.diff(frame_centres(video), axis=0), axis=1)  # (total - 1,) px; NaN if empty
        median = float(np.median(steps[:given - 1]))  # the given clip's own step (its shape is always in frame)
        made = steps[given - 1:]
        made_median = float(np.nanmedian(made)) if np.isfinite(made).any() else float("nan")
        seams = list(range(given - 1, total - 1, window - context))  # step k: frame k → k + 1, a new window's first
        excess = [abs(float(steps[k]) - median) for k in seams]
        scores.append({**score_clip(video[:, given - 1:], caption, palette), "seed": seed,
                       "given_kept": bool(torch.equal(video[:, :given], reference[:, :given])),
                       "median_step_px": median, "made_median_step_px": made_median,
                       "seam_step_px": float(steps[given - 1]), "seam_excess_px": excess[0],
                       "later_seams_excess_px": excess[1:], "steps_px": [round(float(v), 3) for v in steps]})
        if progress:
            print(f"  continuation {len(scores)}/{len(captions) * len(seeds)}", file=sys.stderr, flush=True)
    return scores


def _rate(values, ok) -> float:
    return float(np.mean([ok(v) for v in values])) if values else float("nan")


def summarize_image_to_video(scores: list[dict]) -> dict:
    """Accuracies and the first-frame figures against the targets."""
    psnr = [s["psnr_first_db"] for s in scores]
    centre = [s["centre_error_px"] for s in scores]
    return {
        "clips": len(scores),
        "accuracy": {a: _rate(scores, lambda s, a=a: s[f"{a}_ok"]) for a in ("color", "shape", "direction")},
        "psnr_first_db": {"mean": float(np.mean(psnr)), "min": float(np.min(psnr)),
                          f"share_at_least_{PSNR_TARGET_DB:g}": _rate(psnr, lambda v: v >= PSNR_TARGET_DB)},
        "centre_error_px": {"mean": float(np.nanmean(centre)), "max": float(np.nanmax(centre)),
                            f"share_within_{CENTRE_TARGET_PX:g}": _rate(centre, lambda v: v <= CENTRE_TARGET_PX)},
    }


def speed_following(given, made) -> dict:
    """Slope and correlation of ``made`` on ``given`` (per-clip median steps, px), over the clips where both are
    finite; NaN where fewer than two clips or the given steps do not vary."""
    given, made = np.asarray(given, float), np.asarray(made, float)
    ok = np.isfinite(given) & np.isfinite(made)
    given, made = given[ok], made[ok]
    if len(given) < 2 or np.ptp(given) == 0:
        return {"slope": float("nan"), "correlation": float("nan"), "clips": int(len(given))}
    slope = float(np.polyfit(given, made, 1)[0])
    correlation = float(np.corrcoef(given, made)[0, 1]) if np.ptp(made) > 0 else 0.0
    return {"slope": slope, "correlation": correlation, "clips": int(len(given))}


def summarize_continuation(scores: list[dict]) -> dict:
    """Accuracies of the continued part and the seam figures against the target."""
    seam = [s["seam_excess_px"] for s in scores]
    later = [v for s in scores for v in s["later_seams_excess_px"]]
    return {
        "clips": len(scores),
        "accuracy": {a: _rate(scores, lambda s, a=a: s[f"{a}_ok"]) for a in ("color", "shape", "direction")},
        "given_frames_kept": _rate(scores, lambda s: s["given_kept"]),
        "median_step_px": {"given": float(np.mean([s["median_step_px"] for s in scores])),
                           "made": float(np.nanmean([s["made_median_step_px"] for s in scores]))},
        "speed_following": speed_following([s["median_step_px"] for s in scores],
                                           [s["made_median_step_px"] for s in scores]),
        "seam_excess_px": {"mean": float(np.nanmean(seam)), "max": float(np.nanmax(seam)),
                           f"share_within_{SEAM_TARGET_PX:g}": _rate(seam, lambda v: v <= SEAM_TARGET_PX)},
        "later_seams_excess_px": {"mean": float(np.nanmean(later)) if later else float("nan"),
                                  f"share_within_{SEAM_TARGET_PX:g}": _rate(later, lambda v: v <= SEAM_TARGET_PX)},
    }


def format_i2v_report(name: str, summary: dict) -> str:
    """A few lines: accuracies, then each figure's mean / max / share against its target."""
    lines = [f"{name}: {summary['clips']} clips; " + ", ".join(f"{a} {v:.1%}" for a, v in summary["accuracy"].items())]
    for key, value in summary.items():
        if isinstance(value, dict) and key != "accuracy":
            lines.append(f"  {key}: " + ", ".join(f"{k} {v:.3g}" for k, v in value.items()))
    return "\n".join(lines)
