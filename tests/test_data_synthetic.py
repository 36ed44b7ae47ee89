"""lvd.data.synthetic: exact captions, determinism, geometry (inside the frame, constant speed)."""

import re

import numpy as np
import pytest
import torch

from lvd.data.synthetic import COLORS, DIRECTIONS, SHAPES, ShapesConfig, all_captions, make_clip, render_clip


def centroid(video: torch.Tensor) -> np.ndarray:
    """(T, 2) intensity-weighted (x, y) centre of each frame."""
    m = video.float().sum(0).numpy()  # (T, H, W)
    t, h, w = m.shape
    total = m.sum(axis=(1, 2))
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    return np.stack([(m * xs).sum(axis=(1, 2)) / total, (m * ys).sum(axis=(1, 2)) / total], axis=1)


def test_captions_are_the_84_exact_strings():
    caps = all_captions()
    assert len(caps) == len(set(caps)) == 84 == len(COLORS) * len(SHAPES) * len(DIRECTIONS)
    assert all(re.fullmatch(r"a (\w+) (circle|square|triangle) moving (left|right|up|down)", c) for c in caps)


def test_defaults_and_any_size():
    video, caption, meta = make_clip(0, 0)
    assert video.shape == (3, 17, 64, 64) and video.dtype == torch.uint8
    assert meta["fps"] == 8 and caption in all_captions()
    video, _, _ = make_clip(1, 0, ShapesConfig(size=40, frames=5))
    assert video.shape == (3, 5, 40, 40)


def test_same_seed_same_clip_different_seed_different_clip():
    a, ca, ma = make_clip(7, 3)
    b, cb, mb = make_clip(7, 3)
    assert torch.equal(a, b) and ca == cb and ma == mb
    c, _, _ = make_clip(7, 4)
    assert not torch.equal(a, c)


def test_each_block_of_84_indices_covers_every_caption():
    cfg = ShapesConfig(size=16, frames=1)
    for block in (0, 1):
        caps = {make_clip(84 * block + i, 5, cfg)[1] for i in range(84)}
        assert caps == set(all_captions())


def test_caption_matches_colour_and_direction_of_the_pixels():
    cfg = ShapesConfig(size=48, frames=9)
    for i in range(12):
        video, caption, meta = make_clip(i, 1, cfg)
        _, color, shape, _, direction = caption.split()
        assert (meta["color"], meta["shape"], meta["direction"]) == (color, shape, direction)
        brightest = video.float().sum(dim=(1, 2, 3))
        expected = torch.tensor(COLORS[color], dtype=torch.float32)
        assert torch.equal(brightest > 0, expected > 0)  # exactly the colour's channels light up
        c = centroid(video)
        dx, dy = c[-1] - c[0]
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}
        assert moved[direction] > 3 and abs(dy if direction in ("left", "right") else dx) < 0.5


@pytest.mark.parametrize("size,frames", [(64, 17), (32, 9), (96, 5)])
def test_shape_stays_inside_and_moves_at_constant_speed(size, frames):
    cfg = ShapesConfig(size=size, frames=frames, shape_size=(0.2, 0.45), speed=(0.9, 1.0), jitter=1.0)
    for i in range(10):
        video, _, meta = make_clip(i, 2, cfg)
        mass = video.float().sum(dim=(0, 2, 3))
        # a shape cut by the border would lose mass in some frames
        assert (mass.max() - mass.min()) / mass.mean() < 0.06  # aliasing of a ~10 px shape is ~4%
        half = meta["shape_size_px"] / 2
        for x, y in (meta["start_xy"], meta["end_xy"]):
            assert half - 1e-6 <= x <= size - half + 1e-6 and half - 1e-6 <= y <= size - half + 1e-6
        steps = np.linalg.norm(np.diff(centroid(video), axis=0), axis=1)
        assert steps.std() < 0.1 * steps.mean() + 0.05
        assert steps.mean() == pytest.approx(meta["speed_px_per_frame"], rel=0.1, abs=0.1)


def test_render_clip_direct_and_validation():
    rng = np.random.default_rng(0)
    video = render_clip("red", "triangle", "up", ShapesConfig(size=32, frames=5), rng)
    assert video.shape == (3, 5, 32, 32) and video[1:].sum() == 0 and video[0].max() == 255
    with pytest.raises(ValueError, match="unknown color"):
        render_clip("purple", "circle", "up", ShapesConfig(), rng)
    with pytest.raises(ValueError, match="speed"):
        ShapesConfig(speed=(0.9, 0.1))
    with pytest.raises(ValueError, match="size"):
        ShapesConfig(size=4)
