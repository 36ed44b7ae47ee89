"""lvd.eval.shapes_i2v: the image-to-video and continuation measurements, checked with stand-in pipelines whose
answers are known (the reference itself, a frozen clip, a clip that jumps at the seam), and the CLI's modes end to
end on a tiny random pipeline."""

import json
from types import SimpleNamespace

import numpy as np
import torch

from lvd.data.synthetic import all_captions
from lvd.eval import shapes_i2v
from lvd.eval.shapes_score import frame_centres

CAPTIONS = all_captions()[:4]  # red circle: left, right, up, down


def _np(video: torch.Tensor) -> np.ndarray:
    """uint8 (3, T, H, W) → a pipeline's "np" output (1, T, H, W, 3) in [0, 1]."""
    return (video.permute(1, 2, 3, 0).float() / 255).numpy()[None]


class Oracle:
    """Answers with the reference clip itself (or a frozen / jumping version of it)."""

    def __init__(self, kind="exact"):
        self.kind = kind

    def __call__(self, caption, image, num_frames, **kwargs):
        i = CAPTIONS.index(caption)
        video = shapes_i2v.reference_clip(caption, i, 0, frames=num_frames)
        assert torch.equal(video[:, 0], image)
        if self.kind == "frozen":
            video = video[:, :1].expand_as(video)
        return SimpleNamespace(frames=_np(video))

    def extend(self, video, caption, num_frames, window_frames, context_frames, **kwargs):
        i = CAPTIONS.index(caption)
        full = shapes_i2v.reference_clip(caption, i, 0, frames=num_frames)
        assert torch.equal(full[:, :video.shape[1]], video) and (window_frames, context_frames) == (17, 9)
        if self.kind == "jump":  # the generated part is pushed 3 px along the motion
            move = frame_centres(full)[-1] - frame_centres(full)[0]
            dx, dy = np.rint(move / np.abs(move).max()).astype(int)  # (±1, 0) or (0, ±1)
            full = full.clone()
            full[:, video.shape[1]:] = torch.roll(full[:, video.shape[1]:], shifts=(3 * dy, 3 * dx), dims=(2, 3))
        return SimpleNamespace(frames=_np(full))


def test_references_start_where_the_motion_can_run_and_are_deterministic():
    for i, caption in enumerate(CAPTIONS):
        clip = shapes_i2v.reference_clip(caption, i, 0, frames=33)
        assert torch.equal(clip, shapes_i2v.reference_clip(caption, i, 0, frames=33))
        centres = frame_centres(clip)
        assert np.isfinite(centres).all()  # the shape stays in the frame all 33 frames
        move = centres[-1] - centres[0]
        axis = 0 if caption.endswith(("left", "right")) else 1
        assert abs(move[axis]) > 15 and abs(move[1 - axis]) < 0.5


def test_the_reference_itself_meets_every_target():
    i2v = shapes_i2v.summarize_image_to_video(shapes_i2v.evaluate_image_to_video(Oracle(), CAPTIONS))
    assert i2v["accuracy"] == {"color": 1.0, "shape": 1.0, "direction": 1.0}
    assert i2v["psnr_first_db"]["min"] == float("inf") and i2v["centre_error_px"]["max"] == 0.0
    cont = shapes_i2v.summarize_continuation(shapes_i2v.evaluate_continuation(Oracle(), CAPTIONS))
    assert cont["accuracy"]["direction"] == 1.0 and cont["given_frames_kept"] == 1.0
    assert cont["seam_excess_px"]["max"] < 0.3 and cont["later_seams_excess_px"]["share_within_1.5"] == 1.0
    steps = cont["median_step_px"]
    assert 0.5 < steps["given"] < 1.5 and abs(steps["made"] - steps["given"]) < 0.1  # the demo's speeds over 33 frames
    assert abs(cont["speed_following"]["slope"] - 1) < 0.15 and cont["speed_following"]["correlation"] > 0.95


def test_speed_following_tells_a_carried_speed_from_a_fixed_one():
    given = [0.8, 1.0, 1.2, 1.4]
    doubled = shapes_i2v.speed_following(given, [2 * g for g in given])
    assert abs(doubled["slope"] - 2) < 1e-9 and abs(doubled["correlation"] - 1) < 1e-9 and doubled["clips"] == 4
    fixed = shapes_i2v.speed_following(given, [1.4, 1.4, 1.4, 1.4])
    assert abs(fixed["slope"]) < 1e-9 and fixed["correlation"] == 0.0
    assert shapes_i2v.speed_following([1.0, float("nan"), 1.2], [1.0, 5.0, 1.2])["clips"] == 2  # NaN clips left out
    assert np.isnan(shapes_i2v.speed_following([1.0, 1.0], [1.0, 2.0])["slope"])  # given steps do not vary


def test_a_frozen_clip_and_a_jump_at_the_seam_fail():
    frozen = shapes_i2v.summarize_image_to_video(shapes_i2v.evaluate_image_to_video(Oracle("frozen"), CAPTIONS))
    assert frozen["accuracy"]["direction"] == 0.0 and frozen["psnr_first_db"]["min"] == float("inf")
    jump = shapes_i2v.evaluate_continuation(Oracle("jump"), CAPTIONS)
    assert all(2.3 < s["seam_excess_px"] < 3.7 and s["given_kept"] for s in jump)
    assert shapes_i2v.summarize_continuation(jump)["seam_excess_px"]["share_within_1.5"] == 0.0


def test_cli_modes_write_their_sections(model_dir, tmp_path, capsys):
    """--modes i2v continuation on a tiny random pipeline (1 caption, 1 step): both sections, the given frames kept."""
    from lvd.eval.shapes import main

    out = tmp_path / "i2v.json"
    assert main(["--model", str(model_dir), "--limit", "1", "--seeds", "0", "--steps", "1", "--size", "32",
                 "--modes", "i2v", "continuation", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "summary" not in report and report["i2v"]["summary"]["clips"] == 1
    assert report["continuation"]["clips"][0]["given_kept"] is True
    assert report["i2v"]["clips"][0]["psnr_first_db"] > 0
    assert "continuation: 1 clips" in capsys.readouterr().out


def test_continuation_speed_benchmark_pools_its_three_settings(model_dir, tmp_path):
    """benchmarks/continuation_speed.py on a tiny random pipeline (2 captions, 1 step): every setting's clips
    scored, the given steps faster for fewer frames, one regression over the first three settings' clips."""
    from benchmarks.continuation_speed import main

    out = tmp_path / "speed.json"
    assert main(["--model", str(model_dir), "--limit", "2", "--steps", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    settings = report["by_setting"]
    assert list(settings) == ["9 of 17", "17 of 25", "17 of 33", "9 of 33"] and report["captions"] == 2
    assert all(s["clips"] == 2 for s in settings.values())
    given = [s["given_step_px"]["mean"] for s in settings.values()]
    assert given[0] > given[1] > given[2] > 0.5 and given[3] > 0.5  # the same travel over 17, 25, 33 frames
    assert report["speed_following"]["clips"] <= 6  # the first three settings' clips only
    assert set(report["speed_following"]) == {"slope", "correlation", "clips"}
