"""`python -m lvd.generate --image / --video` on the tiny pipeline folder (conftest's model_dir)."""

import numpy as np
import PIL.Image
import pytest
import torch

from lvd import generate
from lvd.video_io import probe_video, read_video, write_video

FAST = ["--steps", "2", "--device", "cpu", "--threads", "1", "--prompt", "a red circle moving right"]


def cli(model_dir, *argv):
    return generate.main(["--model", str(model_dir), *FAST, *argv])


def _png(path, size=16, seed=0):
    PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _clip(path, frames=5, size=16):
    video = torch.from_numpy(np.random.RandomState(1).randint(0, 256, (3, frames, size, size), dtype=np.uint8))
    write_video(path, video, fps=8)
    return path


def test_image_to_video_takes_its_size_from_the_image(model_dir, tmp_path, capsys):
    out = tmp_path / "i2v.mp4"
    assert cli(model_dir, "--image", str(_png(tmp_path / "first.png")), "--frames", "5", "--output", str(out)) == 0
    info = probe_video(out)
    assert (info.num_frames, info.width, info.height) == (5, 16, 16)
    assert f"wrote {out}" in capsys.readouterr().out


def test_video_continuation_writes_the_total_length_starting_with_the_clip(model_dir, tmp_path):
    clip = _clip(tmp_path / "clip.mp4", frames=6)
    out = tmp_path / "longer.mp4"
    assert cli(model_dir, "--video", str(clip), "--frames", "14", "--window-frames", "9", "--context-frames", "5",
               "--output", str(out)) == 0
    assert probe_video(out).num_frames == 14
    given, written = read_video(clip).float(), read_video(out).float()
    assert (given - written[:, :6]).abs().mean() < 6  # the clip's own frames (through two lossy encodes)


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was called although the input was bad")

    monkeypatch.setattr(generate.LVDPipeline, "__call__", refuse)
    monkeypatch.setattr(generate.LVDPipeline, "extend", refuse)


@pytest.mark.parametrize("setup, message", [
    (lambda d: ["--image", str(d / "missing.png")], "missing.png: cannot read it as an image"),
    (lambda d: ["--image", str(d / "notes.png")], "notes.png: cannot read it as an image"),
    (lambda d: ["--image", str(_png(d / "a.png")), "--height", "32"],
     "is 16x16 (width x height) but --width/--height ask for 16x32"),
    (lambda d: ["--image", str(_png(d / "a.png")), "--frames", "1"], "num_frames=1 leaves nothing to generate"),
    (lambda d: ["--video", str(_clip(d / "c.mp4", frames=3)), "--frames", "9"],
     "has 3 frames; continuing it needs at least --context-frames 9"),
    (lambda d: ["--video", str(_clip(d / "c.mp4", frames=5)), "--frames", "5"],
     "--frames 5 is the total length with --video: it must be more than the video's 5 frames"),
    (lambda d: ["--video", str(d / "notes.png")], "notes.png: cannot read it as a video"),
    (lambda d: ["--video", str(_clip(d / "c.mp4")), "--image", str(_png(d / "a.png"))], "give --image or --video"),
    (lambda d: ["--video", str(_clip(d / "c.mp4")), "--frames", "9", "--context-frames", "4"],
     "--context-frames: video= has 4 frames; the VAE encodes 1 + 4·j frames"),
    (lambda d: ["--video", str(_clip(d / "c.mp4")), "--frames", "9", "--window-frames", "5"],
     "--context-frames 9 must be at least 1 and fewer than --window-frames 5"),
])
def test_bad_first_frames_are_one_line_errors_with_status_2(model_dir, tmp_path, capsys, no_sampling, setup, message):
    (tmp_path / "notes.png").write_text("not an image")
    assert cli(model_dir, *setup(tmp_path), "--output", str(tmp_path / "out.mp4")) == 2
    err = capsys.readouterr().err
    assert "cannot start" in err and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if message in line]) == 1
    assert not (tmp_path / "out.mp4").exists()
