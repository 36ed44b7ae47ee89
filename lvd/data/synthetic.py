"""Moving shapes with exact captions: the tiny end-to-end dataset for CPU training and the demo.

Each clip is one shape (circle, square or triangle) in one of seven colours, moving at constant
speed left, right, up or down over a black background, captioned exactly
``"a {color} {shape} moving {direction}"`` (7 x 3 x 4 = 84 captions).

Geometry, in pixels of an ``S x S`` frame with ``T`` frames. The shape's bounding box has side
``s = shape_size * S``; its centre may range over ``[s/2, S - s/2]``, a free length ``F = S - s``.
Over the clip the centre moves ``L = speed * F`` along the direction of motion, i.e.
``L / (T - 1)`` pixels per frame. The path is centred on the frame centre, offset by up to
``jitter * (F - L) / 2`` along the motion and ``jitter * F / 2`` across it. Every position on the
path therefore keeps the whole shape inside the frame. Edges are anti-aliased by 4x4
supersampling, so sub-pixel motion stays smooth.

Everything is a function of ``(seed, index)``: ``make_clip(i, seed, cfg)`` is the same clip on any
machine, in any order, in any worker. Each run of 84 consecutive indices covers every caption once.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

__all__ = ["COLORS", "SHAPES", "DIRECTIONS", "ShapesConfig", "all_captions", "render_clip", "make_clip"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
_SUPERSAMPLE = 4  # sub-samples per pixel side for anti-aliased coverage
_STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y down


@dataclasses.dataclass
class ShapesConfig:
    """Moving-shapes clip parameters. Ranges are ``(low, high)``, drawn uniformly per clip.

    size:        frame height and width in pixels.
    frames:      frames per clip (1 + 4k for the causal VAE; any count renders).
    fps:         frame rate written into the clip's metadata and its mp4.
    shape_size:  side of the shape's bounding box, as a fraction of ``size``.
    speed:       fraction of the free length (frame minus shape) the shape crosses over the clip.
    jitter:      start jitter: offset of the path centre from the frame centre, as a fraction
                 of the slack that keeps the whole path inside the frame (0 = always centred).
    """

    size: int = 64
    frames: int = 17
    fps: float = 8.0
    shape_size: tuple[float, float] = (0.2, 0.35)
    speed: tuple[float, float] = (0.4, 0.9)
    jitter: float = 0.5

    def __post_init__(self):
        problems = []
        if self.size < 8:
            problems.append(f"size must be >= 8 pixels, got {self.size}")
        if self.frames < 1:
            problems.append(f"frames must be >= 1, got {self.frames}")
        if self.fps <= 0:
            problems.append(f"fps must be > 0, got {self.fps}")
        for name in ("shape_size", "speed"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                problems.append(f"{name} must satisfy 0 < low <= high <= 1, got ({lo}, {hi})")
        if not 0 <= self.jitter <= 1:
            problems.append(f"jitter must be in [0, 1], got {self.jitter}")
        if problems:
            raise ValueError("invalid ShapesConfig: " + "; ".join(problems))


def all_captions() -> list[str]:
    """The 84 captions, in the order colour x shape x direction."""
    return [f"a {c} {s} moving {d}" for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]


def _coverage(shape: str, cx: np.ndarray, cy: np.ndarray, side: float, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape centred at (cx[t], cy[t]). -> (T, H, W) float32."""
    n = size * _SUPERSAMPLE
    grid = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE  # sub-sample centres in pixel units
    x = grid[None, None, :] - cx[:, None, None].astype(np.float32)  # (T, 1, n): x offset from the centre
    y = grid[None, :, None] - cy[:, None, None].astype(np.float32)  # (T, n, 1)
    half = side / 2
    if shape == "circle":
        inside = x**2 + y**2 <= half**2
    elif shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":  # apex up, base at the bottom of the box; width grows linearly downward
        inside = (y >= -half) & (y <= half) & (np.abs(x) <= (y + half) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    t = inside.shape[0]
    inside = inside.reshape(t, size, _SUPERSAMPLE, size, _SUPERSAMPLE)  # (T, H, q, W, r)
    return inside.mean(axis=(2, 4), dtype=np.float32)  # (T, H, W)


def render_clip(color: str, shape: str, direction: str, cfg: ShapesConfig, rng: np.random.Generator) -> torch.Tensor:
    """One clip of ``shape`` in ``color`` moving in ``direction``. -> uint8 (3, T, H, W).

    Size, speed and start are drawn from ``rng`` within the ranges of ``cfg`` (see the module
    docstring for the geometry). Use :func:`make_clip` to get the drawn values back as metadata.
    """
    video, _ = _render(color, shape, direction, cfg, rng)
    return video


def _render(color: str, shape: str, direction: str, cfg: ShapesConfig, rng: np.random.Generator):
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {list(COLORS)}")
    if direction not in _STEP:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    S, T = cfg.size, cfg.frames
    side = float(rng.uniform(*cfg.shape_size)) * S
    free = S - side  # the centre ranges over [side/2, S - side/2]
    travel = float(rng.uniform(*cfg.speed)) * free if T > 1 else 0.0
    along = float(rng.uniform(-1, 1)) * cfg.jitter * (free - travel) / 2  # path-centre offset along the motion
    across = float(rng.uniform(-1, 1)) * cfg.jitter * free / 2  # and across it
    dx, dy = _STEP[direction]
    t = np.arange(T, dtype=np.float64)
    progress = (t / (T - 1) - 0.5) * travel if T > 1 else np.zeros(1)  # -L/2 .. L/2, constant speed
    if dx:  # horizontal motion
        cx = S / 2 + dx * (progress + along)
        cy = np.full(T, S / 2 + across)
    else:
        cx = np.full(T, S / 2 + across)
        cy = S / 2 + dy * (progress + along)
    cover = _coverage(shape, cx, cy, side, S)  # (T, H, W)
    rgb = np.asarray(COLORS[color], np.float32)
    video = np.rint(cover[None] * rgb[:, None, None, None]).astype(np.uint8)  # (3, T, H, W)
    meta = {
        "color": color,
        "shape": shape,
        "direction": direction,
        "shape_size_px": round(side, 3),
        "speed_px_per_frame": round(travel / (T - 1), 4) if T > 1 else 0.0,
        "start_xy": [round(float(cx[0]), 3), round(float(cy[0]), 3)],
        "end_xy": [round(float(cx[-1]), 3), round(float(cy[-1]), 3)],
    }
    return torch.from_numpy(video), meta


def make_clip(index: int, seed: int, cfg: ShapesConfig | None = None) -> tuple[torch.Tensor, str, dict]:
    """Clip number ``index`` of the dataset ``seed``. -> (uint8 (3, T, H, W), caption, metadata).

    The caption is chosen so that indices ``84k .. 84k + 83`` cover all 84 captions once, in an
    order shuffled by ``(seed, k)``; size, speed and start come from ``rng(seed, index)``.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    cfg = cfg or ShapesConfig()
    combos = list(itertools.product(COLORS, SHAPES, DIRECTIONS))
    block, pos = divmod(index, len(combos))
    order = np.random.default_rng([seed, block, 84]).permutation(len(combos))
    color, shape, direction = combos[order[pos]]
    video, meta = _render(color, shape, direction, cfg, np.random.default_rng([seed, index]))
    caption = f"a {color} {shape} moving {direction}"
    meta.update(index=index, seed=seed, fps=cfg.fps, num_frames=cfg.frames, height=cfg.size, width=cfg.size)
    return video, caption, meta
