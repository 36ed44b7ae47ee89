"""lvd.data.synthetic: exact captions, determinism, geometry (inside the frame, constant speed), the extendable
palette and subsets (defaults pinned byte for byte), and the command-line flags."""

import argparse
import hashlib
import json
import re

import numpy as np
import pytest
import torch

from lvd.data.synthetic import (COLORS, DIRECTIONS, SHAPES, ShapesConfig, add_synthetic_arguments, all_captions,
                                make_clip, parse_colors, render_clip, shapes_config_from_args, synthetic_flags_given)


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


# ---------------------------------------------------------------------------------------------
# Extendable palette and subsets (issue 18 item 4)
# ---------------------------------------------------------------------------------------------

ORANGE, PURPLE = (255, 128, 0), (128, 0, 255)

# (index, seed, small config?) -> (caption, sha256[:16] of the video bytes, sha256[:16] of the sorted-key meta
# json), computed with the fixed-palette code before ShapesConfig grew colours and subsets.
PINNED = {
    (0, 0, False): ("a white triangle moving left", "672a1c3377fd8fa1", "8adf24e5c22f8c66"),
    (1, 0, False): ("a yellow square moving left", "daf0f41503c3a8db", "f62e05beba11e81f"),
    (83, 0, False): ("a magenta square moving up", "d7f8c5a0cc67dfff", "707e4730d19e492e"),
    (84, 0, False): ("a green square moving down", "a621b6ce0b8dd60a", "79908334032420ff"),
    (200, 1, False): ("a magenta triangle moving right", "bcbb261fbea49e20", "e99ccccecaa0fb43"),
    (7, 3, False): ("a magenta circle moving left", "81e66a3f384c5070", "5a878adfaa6ac7e2"),
    (1000, 5, False): ("a magenta square moving right", "a353967594dc2f33", "85c093cd7f5e6031"),
    (0, 0, True): ("a white triangle moving left", "3a93a39ef51b8383", "dfbca2927570de29"),
    (5, 2, True): ("a green triangle moving down", "dbbf7096ece4c183", "e765aa60ce3f2cda"),
}
PINNED_ALL_CAPTIONS = "73744a6185889135"  # sha256[:16] of "\n".join(all_captions())
PINNED_168_CAPTIONS = "63d77e9a0fbc0b2d"  # of the captions of make_clip(0..167, seed 0)


def _digest(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:16]


def test_defaults_are_byte_identical_to_the_fixed_palette():
    """Cached data and the bundled demo depend on these exact clips and captions."""
    for (index, seed, small), (caption, video_hash, meta_hash) in PINNED.items():
        cfg = ShapesConfig(size=32, frames=5) if small else ShapesConfig()
        video, got_caption, meta = make_clip(index, seed, cfg)
        assert (got_caption, _digest(video.numpy().tobytes()), _digest(json.dumps(meta, sort_keys=True).encode())) \
            == (caption, video_hash, meta_hash), (index, seed, small)
    assert _digest("\n".join(all_captions()).encode()) == PINNED_ALL_CAPTIONS
    tiny = ShapesConfig(size=8, frames=1)
    assert _digest("\n".join(make_clip(i, 0, tiny)[1] for i in range(168)).encode()) == PINNED_168_CAPTIONS
    # an extra colour that is drawn from nowhere (only the built-in ones) changes nothing either
    same = ShapesConfig(colors={"red": (255, 0, 0)})
    assert same.combos() == ShapesConfig().combos() and torch.equal(make_clip(83, 0, same)[0], make_clip(83, 0)[0])


def test_extra_colours_render_their_rgb_and_join_the_captions():
    cfg = ShapesConfig(size=32, frames=5, colors={"orange": ORANGE, "purple": [128, 0, 255]})
    assert cfg.colors["purple"] == PURPLE and list(cfg.palette) == [*COLORS, "orange", "purple"]
    caps = all_captions(cfg)
    assert len(caps) == 9 * 3 * 4 and caps[:84] == all_captions() and "a orange circle moving left" in caps
    assert {make_clip(i, 1, cfg)[1] for i in range(108)} == set(caps)  # one block covers every caption once
    video = render_clip("orange", "square", "right", cfg, np.random.default_rng(0))
    full = video.reshape(3, -1)[:, video[0].reshape(-1) == 255]  # fully covered pixels
    assert full.shape[1] > 0 and (full == torch.tensor(ORANGE, dtype=torch.uint8)[:, None]).all()


def test_subsets_draw_only_the_chosen_names():
    cfg = ShapesConfig(size=16, frames=5, colors={"orange": ORANGE}, only_colors=["orange"],
                       only_shapes=("square", "circle"), only_directions=("up",))
    assert cfg.only_shapes == ("square", "circle")
    assert all_captions(cfg) == ["a orange circle moving up", "a orange square moving up"]  # SHAPES order
    clips = [make_clip(i, 0, cfg) for i in range(4)]
    assert {c for _, c, _ in clips[:2]} == {c for _, c, _ in clips[2:]} == set(all_captions(cfg))
    assert all(m["color"] == "orange" and m["direction"] == "up" for _, _, m in clips)
    reds = ShapesConfig(size=16, frames=1, only_colors=("red",))
    assert {make_clip(i, 3, reds)[1] for i in range(12)} == {c for c in all_captions() if " red " in c}


@pytest.mark.parametrize("kwargs,named", [
    ({"only_colors": ("orange",)}, "'orange'"),  # not in the palette unless added
    ({"only_shapes": ("hexagon",)}, "'hexagon'"),
    ({"only_directions": ("sideways",)}, "'sideways'"),
    ({"only_colors": ()}, "only_colors must name at least one"),
    ({"only_shapes": "circle"}, "the string 'circle'"),
    ({"colors": {"orange": (255, 128)}}, "(255, 128)"),
    ({"colors": {"orange": (255, 128, 300)}}, "(255, 128, 300)"),
    ({"colors": {"orange": (255, 128.5, 0)}}, "(255, 128.5, 0)"),
    ({"colors": {"orange": "255,128,0"}}, "'255,128,0'"),
    ({"colors": {"orange": (0, 0, 0)}}, "invisible"),
    ({"colors": {"red": (200, 0, 0)}}, "'red'=(200, 0, 0) clashes with the built-in red=(255, 0, 0)"),
    ({"colors": {"Dark Red": (128, 0, 0)}}, "'Dark Red'"),
    ({"colors": {"circle": (128, 0, 0)}}, "'circle'"),
    ({"colors": {"none": (128, 0, 0)}}, "'none'"),
])
def test_bad_palette_or_subset_is_a_value_error_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        ShapesConfig(**kwargs)


def test_parse_colors():
    assert parse_colors(["orange=255,128,0", " purple = 128, 0, 255 ", "red=255,0,0", "orange=255,128,0"]) == \
        {"orange": ORANGE, "purple": PURPLE, "red": (255, 0, 0)}
    assert parse_colors([]) == {}
    for token, named in [("orange", "'orange'"), ("orange=255,128", "'orange=255,128'"),
                         ("orange=255,128,0,1", "'orange=255,128,0,1'"), ("orange=-1,0,0", "'orange=-1,0,0'"),
                         ("orange=256,0,0", "(256, 0, 0)"), ("orange=a,b,c", "'orange=a,b,c'"),
                         ("=1,2,3", "''"), ("red=1,2,3", "clashes with the built-in red")]:
        with pytest.raises(ValueError, match=re.escape(named)) as error:
            parse_colors([token])
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"'orange=1,2,3'.*already given as \(255, 128, 0\)"):
        parse_colors(["orange=255,128,0", "orange=1,2,3"])
    with pytest.raises(ValueError, match="'x'.*'y=1'"):  # every bad token, in one line
        parse_colors(["x", "ok=1,2,3", "y=1"])


def _flags(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    add_synthetic_arguments(parser)
    return parser.parse_args(argv)


def test_cli_flags_give_the_config_or_one_line_per_problem():
    args = _flags(["--colors", "orange=255,128,0", "purple=128,0,255", "--only-colors", "orange", "red",
                   "--only-shapes", "circle", "--only-directions", "left", "up"])
    cfg, problems = shapes_config_from_args(args, size=32, frames=5)
    assert problems == [] and (cfg.size, cfg.frames) == (32, 5)
    assert cfg.colors == {"orange": ORANGE, "purple": PURPLE} and cfg.only_colors == ("orange", "red")
    assert all_captions(cfg) == ["a red circle moving left", "a red circle moving up",
                                 "a orange circle moving left", "a orange circle moving up"]
    assert synthetic_flags_given(args) == ["--colors", "--only-colors", "--only-shapes", "--only-directions"]
    default, problems = shapes_config_from_args(_flags([]))
    assert problems == [] and default == ShapesConfig() and synthetic_flags_given(_flags([])) == []

    args = _flags(["--colors", "orange=255,128", "--only-colors", "teal", "--only-shapes", "hexagon"])
    cfg, problems = shapes_config_from_args(args)
    assert cfg is None and len(problems) == 3
    assert "--colors" in problems[0] and "'orange=255,128'" in problems[0]
    assert "--only-colors" in problems[1] and "'teal'" in problems[1] and "'hexagon'" in problems[2]
    cfg, problems = shapes_config_from_args(_flags([]), size=4)  # the fields are checked by ShapesConfig
    assert cfg is None and len(problems) == 1 and "size must be >= 8" in problems[0]


def test_random_rgb_recolours_a_fraction_and_keeps_every_geometry():
    """random_rgb (VAE training data): that fraction of clips take a random colour; each clip's shape, path and
    size stay those of the same clip without it, and the default draws nothing (PINNED above)."""
    plain, mixed = ShapesConfig(size=32, frames=5), ShapesConfig(size=32, frames=5, random_rgb=0.5)
    recoloured = 0
    for index in range(40):
        a_video, a_caption, a_meta = make_clip(index, 3, plain)
        b_video, b_caption, b_meta = make_clip(index, 3, mixed)
        assert a_meta["start_xy"] == b_meta["start_xy"] and a_meta["shape_size_px"] == b_meta["shape_size_px"]
        assert torch.equal(a_video.amax(0) > 0, b_video.amax(0) > 0)  # the same pixels are covered
        if "rgb" in b_meta:
            recoloured += 1
            assert b_caption.startswith("a colored ") and b_caption.endswith(a_caption.split(" ", 2)[2])
            assert max(b_meta["rgb"]) >= 0.6 * 255 - 1
        else:
            assert torch.equal(a_video, b_video) and a_caption == b_caption
    assert 10 <= recoloured <= 30
    with pytest.raises(ValueError, match="random_rgb must be in"):
        ShapesConfig(random_rgb=1.5)


def test_long_motion_windows_are_frames_of_the_same_path_twice_as_long():
    """long_motion (continuation training data): that fraction of clips are frames s..s+T-1 (s = 0, (T-1)/2 or T-1)
    of the clip the same index draws with 2(T-1)+1 frames, so they may start mid-path at half the speed; the others
    are byte-identical to the clips without it."""
    plain, mixed = ShapesConfig(size=32, frames=9), ShapesConfig(size=32, frames=9, long_motion=0.5)
    long = ShapesConfig(size=32, frames=17)
    starts = []
    for index in range(40):
        a_video, a_caption, _ = make_clip(index, 3, plain)
        b_video, b_caption, b_meta = make_clip(index, 3, mixed)
        assert a_caption == b_caption
        if "window_start" in b_meta:
            s = b_meta["window_start"]
            starts.append(s)
            assert torch.equal(b_video, make_clip(index, 3, long)[0][:, s:s + 9]) and b_meta["motion_frames"] == 17
            steps = np.linalg.norm(np.diff(centroid(b_video), axis=0), axis=1)
            assert abs(steps.mean() - b_meta["speed_px_per_frame"]) < 0.05 and np.ptp(steps) < 0.35
        else:
            assert torch.equal(a_video, b_video)
    assert 10 <= len(starts) <= 30 and set(starts) == {0, 4, 8}
    for bad, named in [({"long_motion": -0.1}, "long_motion must be in"), ({"long_motion": 0.5, "frames": 8}, "odd")]:
        with pytest.raises(ValueError, match=named):
            ShapesConfig(**bad)
