"""Score moving-shapes clips by pixel statistics: colour, shape, direction, consistency. No learned model.

The clips are bright shapes on black (:mod:`lvd.data.synthetic`). Per frame, with V = max(R, G, B) / 255:

- **coverage** ``c = clip((V − 0.15) / 0.7, 0, 1)``: anti-aliased foreground in [0, 1]. The ramp is symmetric
  about V = 0.5, so it leaves the expected area of an anti-aliased edge unchanged while it removes faint
  background noise from generated clips; the hard foreground mask is ``V > 0.5``.
- **colour**: the dominant hue of the foreground. Each mask pixel votes, weighted by coverage, for the nearest
  hue of the palette's chromatic colours (by default the six of ``HUES``: red 0°, yellow 60°, green 120°,
  cyan 180°, blue 240°, magenta 300°), or for white when its HSV saturation is below 0.35. A palette
  (``palette=`` of :func:`score_clip`, ``--colors`` of the CLI) maps names to RGB 0–255 or to a hue in degrees,
  e.g. ``{**COLORS, "orange": (255, 128, 0)}`` adds orange at 30°, between red and yellow; the hue of an RGB
  is HSV's. A palette colour must be bright enough to be foreground (max channel ≥ 128), chromatic
  (saturation ≥ 0.35, except white itself) and at least 10° of hue from every other one.
- **direction**: the coverage-weighted centroid of the last frame minus that of the first (y grows downward);
  the larger axis gives left / right / up / down, or "static" below ``0.03 · size`` pixels.
- **shape**: the fill ratio ``Σc / (w · h)`` of the foreground in its bounding box, where the soft extents
  ``w = Σ_x max_y c``, ``h = Σ_y max_x c`` are exact for pixel-straddling edges. Ideal shapes give square 1,
  circle π/4 ≈ 0.785, triangle 0.5; the per-frame median is classified at the midpoints 0.89 and 0.64.
  A blurry decoder rounds a triangle's apex and lifts its ratio toward a circle's, so a triangle is also
  recognised by its centroid sitting below the centre of its mask's box: ``(c_y − box centre) / box height``
  is 1/6 for the apex-up triangle, 0 for circle and square, and blur leaves the centroid in place. Measured
  on the 168 ground-truth clips of seeds 0–1 blurred by a Gaussian of σ = 1.5 px: the ratio alone names
  25% of triangles (the rest "circle"), with the offset (> 0.06) all of them; circles and squares stay at
  100%, their offsets within ±0.035.
- a clip whose mask covers more than 40% of its pixels is not a shape on black (noise, a washed-out frame):
  every attribute is "none" (the largest true shape covers 12%).
- **consistency**: ``1 − std_t(A_t) / mean_t(A_t)`` of the foreground area ``A_t = Σc`` over frames (1 = the
  shape keeps its size, as every true clip does).

:func:`score_clip` is a pure function usable on any clip; ``python -m lvd.eval.shapes`` (:mod:`lvd.eval.shapes`)
generates and scores a model's clips.
"""

from __future__ import annotations

import numbers
import re
from collections import Counter

import numpy as np
import torch

from lvd.data.synthetic import COLORS, DIRECTIONS, SHAPES, color_problems

HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}
FILL_RATIO = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
_CAPTION = re.compile(r"^a (\w+) (\w+) moving (\w+)$")
_MASK_LEVEL = 0.5  # V above this is foreground
_RAMP = (0.15, 0.85)  # V → coverage ramp, symmetric about 0.5
_WHITE_SATURATION = 0.35
_TRIANGLE_OFFSET = 0.06  # centroid below the box centre by more than this fraction of its height → triangle
_MAX_FOREGROUND = 0.4  # the largest true shape covers 12% of the frame (side 0.35 of it)
_STATIC_FRACTION = 0.03  # centroid moves less than this fraction of the frame side → "static"
_MIN_HUE_GAP = 10.0  # degrees between palette hues: anti-aliasing and H.264 chroma move a hue by a few degrees
ATTRIBUTES = ("color", "shape", "direction")


def parse_caption(caption: str, colors=None) -> dict[str, str]:
    """"a red circle moving right" → {"color": "red", "shape": "circle", "direction": "right"}.

    ``colors``: the colour names allowed (default: the built-in COLORS)."""
    colors = list(COLORS if colors is None else colors)
    match = _CAPTION.match(caption.strip())
    if not match or match[1] not in colors or match[2] not in SHAPES or match[3] not in DIRECTIONS:
        raise ValueError(f"caption {caption!r} is not 'a {{color}} {{shape}} moving {{direction}}' with "
                         f"color in {colors}, shape in {list(SHAPES)}, direction in {list(DIRECTIONS)}")
    return {"color": match[1], "shape": match[2], "direction": match[3]}


def _hsv(rgb) -> tuple[float, float, float]:
    """Hue (degrees), saturation and value (0..1) of one RGB 0..255, with the formula _classify_color uses."""
    r, g, b = (float(v) / 255.0 for v in rgb)
    value, chroma = max(r, g, b), max(r, g, b) - min(r, g, b)
    if chroma == 0:
        return 0.0, 0.0, value
    hue = ((g - b) / chroma) % 6 if value == r else (b - r) / chroma + 2 if value == g else (r - g) / chroma + 4
    return 60.0 * hue, chroma / value, value


def palette_hues(palette=None) -> dict[str, float]:
    """The hue (degrees) of each chromatic colour of ``palette`` (name → RGB 0..255, or name → hue in degrees).

    None gives ``HUES`` (the six built-in hues). White (achromatic) is not in the result: low-saturation pixels
    always vote "white". Names of ``HUES`` come first in its order, so a palette holding the built-in colours
    breaks ties exactly as the default does. Raises ValueError naming the entry for bad RGB, a colour too dark to
    be foreground, an achromatic colour other than white, or two hues closer than 10°."""
    if palette is None:
        return dict(HUES)
    if not isinstance(palette, dict):
        raise ValueError(f"invalid palette: expected a dict {{name: (R, G, B) or hue}}, got {palette!r}")
    hues, problems = {}, []
    for name, value in palette.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not np.isfinite(value):
                problems.append(f"colour {name!r}: hue must be a finite number of degrees, got {value!r}")
            else:
                hues[name] = float(value) % 360.0
            continue
        if bad := color_problems({name: value}):
            problems += bad
            continue
        hue, saturation, brightness = _hsv(value)
        if brightness <= _MASK_LEVEL:
            problems.append(f"colour {name!r}={tuple(value)} is too dark to score (max channel must be >= 128)")
        elif saturation < _WHITE_SATURATION:
            if name != "white":
                problems.append(f"colour {name!r}={tuple(value)} has saturation {saturation:.2f} < "
                                f"{_WHITE_SATURATION}: the scorer cannot tell it from white")
        else:
            hues[name] = hue
    names = [n for n in HUES if n in hues] + [n for n in hues if n not in HUES]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            gap = abs((hues[a] - hues[b] + 180.0) % 360.0 - 180.0)
            if gap < _MIN_HUE_GAP:
                problems.append(f"colours {a!r} ({hues[a]:.1f}°) and {b!r} ({hues[b]:.1f}°) are {gap:.1f}° apart; "
                                f"the scorer needs >= {_MIN_HUE_GAP:g}°")
    if not hues and not problems:
        problems.append(f"no chromatic colour in {list(palette)}: pixels would have no hue to vote for")
    if problems:
        raise ValueError("invalid palette: " + "; ".join(problems))
    return {n: hues[n] for n in names}


def _as_unit_rgb(video) -> np.ndarray:
    """(3, T, H, W) uint8 or float in [-1, 1] (torch or numpy) → float64 (3, T, H, W) in [0, 1]."""
    array = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if array.ndim != 4 or array.shape[0] != 3:
        raise ValueError(f"video must be (3, T, H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip((array.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


def _classify_color(rgb: np.ndarray, mask: np.ndarray, weight: np.ndarray, hues: dict[str, float] = HUES) -> str:
    """Dominant hue of the masked pixels: rgb (3, N) in [0, 1]; returns a name of ``hues``, "white" or "none"."""
    if not mask.any():
        return "none"
    rgb, weight = rgb[:, mask], weight[mask]  # (3, n), (n,)
    value = rgb.max(axis=0)
    chroma = value - rgb.min(axis=0)
    saturation = chroma / np.maximum(value, 1e-8)
    r, g, b = rgb
    safe = np.maximum(chroma, 1e-8)
    hue = np.where(value == r, ((g - b) / safe) % 6, np.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = hue * 60.0  # degrees
    names = list(hues)
    centres = np.array([hues[n] for n in names])
    distance = np.abs((hue[:, None] - centres[None, :] + 180.0) % 360.0 - 180.0)  # (n, colours) circular
    nearest = distance.argmin(axis=1)
    votes = Counter()
    colored = saturation >= _WHITE_SATURATION
    votes["white"] = float(weight[~colored].sum())
    for k, name in enumerate(names):
        votes[name] = float(weight[colored & (nearest == k)].sum())
    return max(votes, key=votes.get)


def _fill_ratio(coverage: np.ndarray) -> float:
    """Σc / (w · h) with soft extents w = Σ_x max_y c, h = Σ_y max_x c. coverage (H, W); nan if empty."""
    area = coverage.sum()
    width, height = coverage.max(axis=0).sum(), coverage.max(axis=1).sum()
    if area < 1.0 or width * height <= 0:
        return float("nan")
    return float(area / (width * height))


def _centroid_offset(coverage: np.ndarray, mask: np.ndarray) -> float:
    """(c_y − centre of the mask's rows) / their height for one frame (H, W): 1/6 for an apex-up triangle,
    0 for shapes symmetric top to bottom; nan if the frame is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0 or coverage.sum() < 1.0:
        return float("nan")
    ys = np.arange(coverage.shape[0], dtype=np.float64)[:, None] + 0.5  # pixel centres
    cy = float((ys * coverage).sum() / coverage.sum())
    top, bottom = rows[0], rows[-1] + 1
    return (cy - (top + bottom) / 2) / (bottom - top)


def _classify_shape(ratio: float, offset: float) -> str:
    if not np.isfinite(ratio):
        return "none"
    if ratio < (FILL_RATIO["circle"] + FILL_RATIO["triangle"]) / 2 or offset > _TRIANGLE_OFFSET:  # 0.64
        return "triangle"
    if ratio >= (FILL_RATIO["square"] + FILL_RATIO["circle"]) / 2:  # 0.89
        return "square"
    return "circle"


def _coverage(value: np.ndarray) -> np.ndarray:
    """V = max(R, G, B) in [0, 1] → coverage in [0, 1] by the ramp of the module docstring."""
    lo, hi = _RAMP
    return np.clip((value - lo) / (hi - lo), 0.0, 1.0)


def frame_centres(video) -> np.ndarray:
    """Coverage-weighted (x, y) centre of the shape in each frame of a clip (3, T, H, W) (uint8, or float in
    [-1, 1]) → (T, 2) in pixels, NaN for a frame with no foreground."""
    coverage = _coverage(_as_unit_rgb(video).max(axis=0))
    return np.array([_centroid(c) or (np.nan, np.nan) for c in coverage], dtype=np.float64).reshape(-1, 2)


def _centroid(coverage: np.ndarray) -> tuple[float, float] | None:
    """Coverage-weighted (x, y) centre of one frame (H, W), or None if the frame is empty."""
    total = coverage.sum()
    if total < 1.0:
        return None
    ys, xs = np.indices(coverage.shape)
    return float((xs * coverage).sum() / total), float((ys * coverage).sum() / total)


def score_clip(video, caption: str | None = None, palette=None) -> dict:
    """Pixel analysis of one clip (3, T, H, W) (uint8, or float in [-1, 1]).

    ``palette``: the colours to tell apart, name → RGB 0..255 or hue in degrees (default: the built-in
    COLORS; see :func:`palette_hues`); a caption may name any of them.

    Returns predictions ``color``, ``shape``, ``direction`` (each may be "none"/"static"), the measurements
    ``fill_ratio``, ``centroid_offset``, ``displacement`` (dx, dy) in pixels, ``consistency`` in [0, 1] and ``foreground``
    (mean fraction of pixels in the mask); with a caption, also the truth and ``<attr>_ok`` booleans.
    """
    hues = palette_hues(palette)  # validates the palette before any work
    rgb = _as_unit_rgb(video)  # (3, T, H, W)
    _, frames, height, width = rgb.shape
    value = rgb.max(axis=0)  # (T, H, W)
    coverage = _coverage(value)  # (T, H, W)
    mask = value > _MASK_LEVEL  # (T, H, W)

    if mask.mean() > _MAX_FOREGROUND:  # not a shape on black (noise, a washed-out frame): credit nothing
        coverage = np.zeros_like(coverage)
        mask = np.zeros_like(mask)
    color = _classify_color(rgb.reshape(3, -1), mask.reshape(-1), coverage.reshape(-1), hues)

    ratios = np.array([_fill_ratio(coverage[t]) for t in range(frames)])
    fill = float(np.nanmedian(ratios)) if np.isfinite(ratios).any() else float("nan")
    offsets = np.array([_centroid_offset(coverage[t], mask[t]) for t in range(frames)])
    offset = float(np.nanmedian(offsets)) if np.isfinite(offsets).any() else float("nan")
    shape = _classify_shape(fill, offset)

    first, last = _centroid(coverage[0]), _centroid(coverage[-1])
    if first is None or last is None:
        direction, displacement = "none", (float("nan"), float("nan"))
    else:
        dx, dy = last[0] - first[0], last[1] - first[1]
        displacement = (dx, dy)
        if max(abs(dx), abs(dy)) < _STATIC_FRACTION * max(height, width):
            direction = "static"
        elif abs(dx) >= abs(dy):
            direction = "right" if dx > 0 else "left"
        else:
            direction = "down" if dy > 0 else "up"

    areas = coverage.sum(axis=(1, 2))  # (T,)
    consistency = float(np.clip(1.0 - areas.std() / areas.mean(), 0.0, 1.0)) if areas.mean() >= 1.0 else 0.0

    result = {
        "color": color,
        "shape": shape,
        "direction": direction,
        "fill_ratio": fill,
        "centroid_offset": offset,
        "displacement": displacement,
        "consistency": consistency,
        "foreground": float((value > _MASK_LEVEL).mean()),
    }
    if caption is not None:
        truth = parse_caption(caption, COLORS if palette is None else palette)
        result["caption"] = caption
        for attr in ATTRIBUTES:
            result[f"true_{attr}"] = truth[attr]
            result[f"{attr}_ok"] = result[attr] == truth[attr]
    return result


def summarize(scores: list[dict]) -> dict:
    """Accuracy per attribute, mean consistency, and confusion counts {attr: {true: {pred: n}}}."""
    summary: dict = {"clips": len(scores), "accuracy": {}, "confusion": {}}
    for attr in ATTRIBUTES:
        summary["accuracy"][attr] = float(np.mean([s[f"{attr}_ok"] for s in scores])) if scores else float("nan")
        table: dict[str, dict[str, int]] = {}
        for s in scores:
            row = table.setdefault(s[f"true_{attr}"], {})
            row[s[attr]] = row.get(s[attr], 0) + 1
        summary["confusion"][attr] = table
    summary["consistency"] = float(np.mean([s["consistency"] for s in scores])) if scores else float("nan")
    return summary


def format_report(summary: dict, colors=None) -> str:
    """Accuracy lines followed by one confusion table per attribute (rows: truth, columns: prediction).

    ``colors``: the colour names to list (default: the built-in COLORS); others seen are appended."""
    lines = [f"clips: {summary['clips']}"]
    for attr in ATTRIBUTES:
        lines.append(f"{attr + ' accuracy':<20} {100 * summary['accuracy'][attr]:6.1f} %")
    lines.append(f"{'consistency (mean)':<20} {summary['consistency']:8.3f}")
    labels = {"color": list(COLORS if colors is None else colors), "shape": list(SHAPES),
              "direction": list(DIRECTIONS)}
    for attr in ATTRIBUTES:
        table = summary["confusion"][attr]
        predicted = {p for row in table.values() for p in row}
        columns = labels[attr] + sorted(predicted - set(labels[attr]))
        width = max(8, *(len(c) + 1 for c in columns))
        lines.append("")
        lines.append(f"{attr} confusion (rows: caption, columns: measured)")
        lines.append(" " * 10 + "".join(f"{c:>{width}}" for c in columns))
        for true in labels[attr] + sorted(set(table) - set(labels[attr])):
            row = table.get(true, {})
            lines.append(f"{true:<10}" + "".join(f"{row.get(c, 0):>{width}}" for c in columns))
    return "\n".join(lines)
