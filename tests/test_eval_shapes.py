"""The pixel scorer of lvd.eval.shapes on ground-truth clips from the moving-shapes generator."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvd.data.synthetic import ShapesConfig, all_captions, make_clip, render_clip
from lvd.eval.shapes_score import format_report, parse_caption, score_clip, summarize
from lvd.video_io import decode_video_bytes, encode_video_bytes


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a thread pool; on a shared CPU its barriers cost ~20 ms an op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ground_truth(seeds=(0, 1)):
    return [make_clip(i, seed)[:2] for seed in seeds for i in range(84)]


def test_ground_truth_clips_score_full_colour_and_direction_and_95_shape():
    scores = [score_clip(video, caption) for video, caption in _ground_truth()]
    summary = summarize(scores)
    assert summary["clips"] == 168
    assert {s["caption"] for s in scores} == set(all_captions())
    assert summary["accuracy"]["color"] == 1.0
    assert summary["accuracy"]["direction"] == 1.0
    assert summary["accuracy"]["shape"] >= 0.95
    assert summary["consistency"] > 0.95


def test_ground_truth_survives_h264_round_trip():
    """Generated clips reach the scorer through mp4 too: compression must not flip an attribute."""
    scores = []
    for video, caption in _ground_truth(seeds=(3,))[::4]:  # 21 clips, all colours
        decoded = decode_video_bytes(encode_video_bytes(video, fps=8))  # (3, T, H, W) uint8
        scores.append(score_clip(decoded, caption))
    summary = summarize(scores)
    assert summary["accuracy"]["color"] == 1.0
    assert summary["accuracy"]["direction"] == 1.0
    assert summary["accuracy"]["shape"] >= 0.9


def _gaussian_blur(video: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur each frame of a uint8 (3, T, H, W) clip, as a soft VAE decoder would."""
    radius = int(3 * sigma) + 1
    kernel = torch.exp(-torch.arange(-radius, radius + 1).float() ** 2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, K)
    x = video.float().permute(1, 0, 2, 3) / 255  # (T, 3, H, W)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel, groups=3)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.transpose(2, 3), groups=3)
    return (x.permute(1, 0, 2, 3) * 255).round().clamp(0, 255).to(torch.uint8)


def test_blurred_triangles_are_still_triangles():
    """σ = 1.5 px blur rounds the apex: the fill ratio alone calls 75% of triangles circles; the centroid offset
    keeps them."""
    clips = _ground_truth(seeds=(0,))
    scores = [score_clip(_gaussian_blur(video, 1.5), caption) for video, caption in clips]
    summary = summarize(scores)
    assert summary["accuracy"] == {"color": 1.0, "shape": 1.0, "direction": 1.0}
    triangles = [s for s in scores if s["true_shape"] == "triangle"]
    assert sum(s["fill_ratio"] >= 0.64 for s in triangles) > len(triangles) / 2  # the ratio alone would fail
    assert min(s["centroid_offset"] for s in triangles) > 0.06


def test_fill_ratio_matches_the_ideal_shapes():
    cfg = ShapesConfig(size=64, frames=5, shape_size=(0.4, 0.4), speed=(0.5, 0.5))
    for shape, ideal in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)):
        video = render_clip("white", shape, "right", cfg, np.random.default_rng(0))
        assert score_clip(video)["fill_ratio"] == pytest.approx(ideal, abs=0.05), shape


def test_float_input_scores_like_uint8():
    video, caption, _ = make_clip(7, 0)
    as_float = video.float() / 127.5 - 1.0  # (3, T, H, W) in [-1, 1]
    a, b = score_clip(video, caption), score_clip(as_float, caption)
    assert {k: a[k] for k in ("color", "shape", "direction")} == {k: b[k] for k in ("color", "shape", "direction")}
    assert a["fill_ratio"] == pytest.approx(b["fill_ratio"], abs=1e-6)


def test_empty_noisy_and_static_clips_are_not_credited():
    black = torch.zeros(3, 5, 32, 32, dtype=torch.uint8)
    result = score_clip(black, "a red circle moving left")
    assert (result["color"], result["shape"], result["direction"]) == ("none", "none", "none")
    assert not (result["color_ok"] or result["shape_ok"] or result["direction_ok"])
    noise = torch.randint(0, 256, (3, 5, 32, 32), dtype=torch.uint8)
    result = score_clip(noise, "a white circle moving left")
    assert (result["color"], result["shape"], result["direction"], result["consistency"]) == ("none",) * 3 + (0.0,)
    static = torch.zeros(3, 5, 32, 32, dtype=torch.uint8)
    static[0, :, 10:20, 10:20] = 255
    result = score_clip(static, "a red square moving up")
    assert (result["color"], result["shape"], result["direction"]) == ("red", "square", "static")


def test_bad_caption_and_layout_are_rejected():
    with pytest.raises(ValueError, match="caption"):
        parse_caption("a purple hexagon moving sideways")
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        score_clip(torch.zeros(5, 32, 32, 3, dtype=torch.uint8))


def test_report_has_accuracy_and_confusion_tables():
    scores = [score_clip(v, c) for v, c in _ground_truth(seeds=(0,))[:12]]
    text = format_report(summarize(scores))
    assert "color accuracy" in text and "shape confusion" in text and "direction confusion" in text


def test_cli_generates_scores_and_writes_json(tmp_path, capsys):
    """`python -m lvd.eval.shapes` end to end on a tiny random pipeline (2 captions, 1 seed, 1 step)."""
    from test_pipeline import tiny_components  # tests/ is on sys.path under pytest

    from lvd.eval.shapes import main
    from lvd.pipeline import LVDPipeline

    LVDPipeline(**tiny_components()).save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--limit", "2", "--seeds", "0", "--steps", "1", "--size", "16",
            "--frames", "5", "--json", str(tmp_path / "scores.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "color accuracy" in printed and "direction confusion" in printed
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report["summary"]["clips"] == 2 and [c["caption"] for c in report["clips"]] == all_captions()[:2]


def test_cli_scores_with_a_lora_adapter(model_dir, tmp_path, capsys):
    """--lora applies an adapter before scoring (a zero-initialised one scores like the base); a bad file exits 2."""
    from lvd.eval.shapes import main
    from lvd.dit.lora import LoraConfig, add_lora, save_lora
    from lvd.pipeline import LVDPipeline

    pipe = LVDPipeline.from_pretrained(model_dir)
    add_lora(pipe.transformer, LoraConfig(rank=2))
    save_lora(pipe.transformer, tmp_path / "adapter")
    argv = ["--model", str(model_dir), "--limit", "2", "--seeds", "0", "--steps", "1", "--size", "16", "--frames", "5"]
    for extra, name in (([], "base"), (["--lora", str(tmp_path / "adapter")], "lora")):
        assert main([*argv, *extra, "--json", str(tmp_path / f"{name}.json")]) == 0
    base, lora = (json.loads((tmp_path / f"{n}.json").read_text())["clips"] for n in ("base", "lora"))
    assert [c["displacement"] for c in base] == [c["displacement"] for c in lora]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--lora", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2 and "--lora:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Palettes with extra colours (issue 18 item 4)
# ---------------------------------------------------------------------------------------------

EXTRA = {"orange": (255, 128, 0), "purple": (128, 0, 255)}  # hues 30.1° (red 0°, yellow 60°) and 270.1° (blue, magenta)


def test_default_palette_is_the_six_built_in_hues():
    from lvd.data.synthetic import COLORS
    from lvd.eval.shapes_score import HUES, palette_hues

    assert list(palette_hues(None).items()) == list(HUES.items())
    assert list(palette_hues(COLORS).items()) == list(HUES.items())  # same hues, same tie order; white is separate
    for video, caption in _ground_truth(seeds=(2,))[::6]:
        assert score_clip(video, caption, palette=COLORS) == score_clip(video, caption)


def test_extra_colours_are_scored_and_their_neighbours_stay_right():
    """One block of clips per colour (every shape and direction) with orange and purple in the palette: all
    correct raw, and through H.264 for the colours next to the new hues. (50 clips per colour, raw, H.264 and
    blurred at 1.5 px, measured 100% for all nine colours.)"""
    palette = ShapesConfig(colors=EXTRA).palette
    for color in palette:
        cfg = ShapesConfig(colors=EXTRA, only_colors=(color,))
        clips = [make_clip(i, 7, cfg)[:2] for i in range(12)]
        scores = [score_clip(video, caption, palette) for video, caption in clips]
        assert [s["color"] for s in scores] == [color] * 12, color
        assert all(s["direction_ok"] for s in scores)
        if color in ("red", "orange", "yellow", "blue", "purple", "magenta"):
            for video, caption in clips[::4]:
                decoded = decode_video_bytes(encode_video_bytes(video, fps=8))
                assert score_clip(decoded, caption, palette)["color"] == color, (color, caption)


def test_palette_by_hue_and_a_colour_missing_from_the_palette():
    orange = make_clip(0, 0, ShapesConfig(colors=EXTRA, only_colors=("orange",)))[0]
    by_hue = {"red": 0.0, "orange": 30, "yellow": 60.0}
    assert score_clip(orange, palette=by_hue)["color"] == "orange"
    assert score_clip(orange)["color"] in ("red", "yellow")  # without orange it is a neighbour, never "orange"
    white = render_clip("white", "circle", "up", ShapesConfig(size=32, frames=5), np.random.default_rng(0))
    assert score_clip(white, palette=by_hue)["color"] == "white"  # achromatic handling is unchanged


@pytest.mark.parametrize("palette,named", [
    ({"maroon": (100, 0, 0)}, "'maroon'=(100, 0, 0) is too dark"),
    ({"grey": (200, 200, 200)}, "'grey'=(200, 200, 200) has saturation 0.00"),
    ({"red": (255, 0, 0), "scarlet": (255, 20, 0)}, "'red' (0.0°) and 'scarlet' (4.7°)"),
    ({"red": 0.0, "rose": 355.0}, "'red' (0.0°) and 'rose' (355.0°) are 5.0° apart"),
    ({"orange": (255, 128)}, "(255, 128)"),
    ({"orange": (255, 128, 256)}, "(255, 128, 256)"),
    ({"orange": float("nan")}, "'orange': hue must be a finite"),
    ({"red": (200, 0, 0)}, "clashes with the built-in red"),
    ({"white": (255, 255, 255)}, "no chromatic colour in ['white']"),
    ([("orange", (255, 128, 0))], "expected a dict"),
])
def test_bad_palette_is_a_value_error_naming_the_colour(palette, named):
    from lvd.eval.shapes_score import palette_hues

    with pytest.raises(ValueError, match=re.escape(named)):
        palette_hues(palette)
    with pytest.raises(ValueError, match=re.escape(named)):
        score_clip(torch.zeros(3, 2, 16, 16, dtype=torch.uint8), palette=palette)


def test_captions_and_report_with_an_extra_colour():
    palette = ShapesConfig(colors=EXTRA).palette
    with pytest.raises(ValueError, match="caption"):
        parse_caption("a orange circle moving left")
    assert parse_caption("a orange circle moving left", palette)["color"] == "orange"
    cfg = ShapesConfig(colors=EXTRA, only_colors=("orange", "red"), only_directions=("up",))
    scores = [score_clip(v, c, palette) for v, c in (make_clip(i, 0, cfg)[:2] for i in range(6))]
    text = format_report(summarize(scores), colors=list(palette))
    assert re.search(r"^orange +0 +0 +0 +0 +0 +0 +0 +3 +0$", text, re.M), text  # its row, its column
    assert re.search(r"^orange\b", format_report(summarize(scores)), re.M)  # an unlisted truth still gets a row


def test_cli_scores_an_extra_colour_and_refuses_bad_flags(tmp_path, capsys):
    from test_pipeline import tiny_components  # tests/ is on sys.path under pytest

    from lvd.eval.shapes import main
    from lvd.pipeline import LVDPipeline

    for bad, named in ((["--colors", "orange=255,128"], "'orange=255,128'"), (["--only-colors", "orange"], "'orange'"),
                       (["--colors", "grey=200,200,200"], "'grey'")):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", str(tmp_path / "absent"), *bad])  # refused before any model is loaded
        assert exit_.value.code == 2 and named in capsys.readouterr().err

    LVDPipeline(**tiny_components()).save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--colors", "orange=255,128,0", "purple=128,0,255",
            "--only-colors", "orange", "--only-shapes", "square", "--limit", "2", "--seeds", "0", "--steps", "1",
            "--size", "16", "--frames", "5", "--json", str(tmp_path / "scores.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^ +red .*orange +purple", printed, re.M)  # the palette's columns in the colour table
    report = json.loads((tmp_path / "scores.json").read_text())
    assert [c["caption"] for c in report["clips"]] == ["a orange square moving left", "a orange square moving right"]
