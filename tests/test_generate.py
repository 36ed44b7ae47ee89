"""`python -m lvd.generate` on a tiny random pipeline folder: files, sizes, determinism, and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lvd import generate
from lvd.pipeline import LVDPipeline
from lvd.video_io import probe_video, read_video

ARGS = ["--frames", "5", "--height", "16", "--width", "16", "--steps", "2", "--device", "cpu", "--threads", "1"]


def cli(model_dir, *argv):
    return generate.main(["--model", str(model_dir), *ARGS, *argv])


def test_cli_writes_mp4_with_frames_size_and_fps(model_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "video.mp4"
    assert cli(model_dir, "--prompt", "a red circle moving right", "--output", str(out), "--fps", "6") == 0
    info = probe_video(out)
    assert (info.num_frames, info.width, info.height, info.fps, info.codec) == (5, 16, 16, 6.0, "h264")
    assert read_video(out).shape == (3, 5, 16, 16)
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert "text encoding" in printed and "s/step" in printed and "decoding" in printed


def test_cli_writes_gif(model_dir, tmp_path):
    out = tmp_path / "video.gif"
    assert cli(model_dir, "--prompt", "a blue square moving up", "--output", str(out)) == 0
    assert read_video(out).shape == (3, 5, 16, 16)


@pytest.mark.parametrize("argv, old_flag, new_flag", [
    (["--text", "a blue square moving up"], "--text", "--prompt"),
    (["--text=a blue square moving up"], "--text", "--prompt"),
    (["--prompt", "a blue square", "--output_path", "out.mp4"], "--output_path", "--output"),
])
def test_renamed_flags_exit_2_with_one_line_naming_the_new_flag(model_dir, capsys, no_sampling, argv, old_flag,
                                                                 new_flag):
    """--text / --output_path are refused, not aliased, and --text is never read as a prefix of --text-encoder."""
    with pytest.raises(SystemExit) as exit_info:
        cli(model_dir, *argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"python -m lvd.generate: error: {old_flag} is not an option; use {new_flag}\n"


def test_same_seed_gives_the_same_video_bit_for_bit(model_dir, tmp_path):
    paths = [tmp_path / f"{name}.mp4" for name in ("a", "b", "c")]
    for path, seed in zip(paths, ("7", "7", "8")):
        assert cli(model_dir, "--prompt", "a cyan circle moving left", "--seed", seed, "--output", str(path)) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert not torch.equal(read_video(paths[0]), read_video(paths[2]))


def test_a_seed_gives_the_same_video_whatever_the_batch_size(model_dir, tmp_path):
    """Video k is drawn from its own generator seeded seed + k, so batching changes only float rounding (the
    batched matmuls' shapes): at most one 8-bit level, not another video."""
    args = ["--prompt", "a red circle moving right", "--num-videos", "3", "--seed", "5"]
    for batch in ("1", "3"):
        assert cli(model_dir, *args, "--batch-size", batch, "--output", str(tmp_path / f"b{batch}.mp4")) == 0
    alone = tmp_path / "alone.mp4"  # video 2 of that run, made on its own: seed 5 + 2
    assert cli(model_dir, "--prompt", "a red circle moving right", "--seed", "7", "--output", str(alone)) == 0
    batched = [read_video(tmp_path / f"b3_{k:03d}.mp4").int() for k in range(3)]
    for k in range(3):
        assert (read_video(tmp_path / f"b1_{k:03d}.mp4").int() - batched[k]).abs().max() <= 1
    assert (read_video(alone).int() - batched[2]).abs().max() <= 1
    assert (batched[0] - batched[1]).abs().max() > 10  # different seeds: different videos


def test_several_videos_get_numbered_files(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n\na white triangle moving down\n")
    out = tmp_path / "clip.mp4"
    assert cli(model_dir, "--prompts-file", str(prompts), "--num-videos", "2", "--batch-size", "3",
               "--output", str(out), "--sampler", "unipc") == 0
    written = sorted(p.name for p in tmp_path.glob("clip_*.mp4"))
    assert written == ["clip_000.mp4", "clip_001.mp4", "clip_002.mp4", "clip_003.mp4"]
    assert "'a white triangle moving down'" in capsys.readouterr().out


def test_empty_prompt_and_negative_prompt_are_accepted(model_dir, tmp_path):
    assert cli(model_dir, "--prompt", "", "--output", str(tmp_path / "empty.mp4")) == 0
    assert cli(model_dir, "--prompt", "a red circle", "--negative-prompt", "a blue square",
               "--output", str(tmp_path / "neg.mp4")) == 0


def test_bfloat16_runs_with_a_note_on_cpu(model_dir, tmp_path, capsys):
    assert cli(model_dir, "--prompt", "a red circle", "--dtype", "bfloat16", "--output", str(tmp_path / "b.mp4")) == 0
    assert "--dtype bfloat16 on a CPU is very slow" in capsys.readouterr().err
    assert probe_video(tmp_path / "b.mp4").num_frames == 5


@pytest.fixture
def no_sampling(monkeypatch):
    """Make any call to the pipeline fail the test: bad input must be refused before sampling."""
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was called although the input was bad")
    monkeypatch.setattr(LVDPipeline, "__call__", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--steps", "-3"], "--steps must be a positive integer, got -3"),
        (["--sampler", "heun"], "--sampler 'heun' is unknown; choose one of euler, ddim, dpm++, unipc"),
        (["--sampler", "ddim"], "sampler 'ddim' does not fit objective 'flow'"),
        (["--frames", "6"], "num_frames=6 is not a frame count the VAE produces (1 + 4·k); nearest: 5 or 9"),
        (["--height", "20"], "height=20 must be a positive multiple of 8 (VAE spatial factor 4 × transformer patch"),
        (["--width", "0"], "width=0 must be a positive multiple of 8"),
        (["--output", "clip.avi"], "the suffix must be .mp4 or .gif, got '.avi'"),
        (["--num-videos", "0"], "--num-videos must be a positive integer"),
        (["--offload"], "--offload needs a CUDA GPU"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(model_dir, tmp_path, capsys, no_sampling, argv, message):
    argv = ["--prompt", "a red circle", "--output", str(tmp_path / "out.mp4"), *argv]
    assert cli(model_dir, *argv) == 2
    err = capsys.readouterr().err
    assert "cannot start" in err and message in err
    assert not list(tmp_path.glob("*.mp4"))


def test_unwritable_output_is_refused(model_dir, tmp_path, capsys, no_sampling):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    assert cli(model_dir, "--prompt", "x", "--output", str(blocker / "out.mp4")) == 2
    assert f"cannot write into {blocker}" in capsys.readouterr().err
    assert cli(model_dir, "--prompt", "x", "--output", str(tmp_path)) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_broken_pipeline_folder_is_refused(model_dir, tmp_path, capsys, no_sampling):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "transformer")
    assert generate.main(["--model", str(broken), "--prompt", "x", "--output", str(tmp_path / "o.mp4")]) == 2
    assert f"--model {broken}: could not load the pipeline" in capsys.readouterr().err


def test_a_text_encoder_outside_the_model_folder_needs_the_users_own_flag(model_dir, tmp_path, capsys):
    """A model folder cannot point its text_encoder_id outside itself; --text-encoder PATH is the user's choice."""
    folder, encoder = tmp_path / "model", tmp_path / "encoder"
    shutil.copytree(model_dir, folder)
    encoder.mkdir()
    for name in ("text_encoder", "tokenizer"):
        shutil.move(folder / name, encoder / name)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None], text_encoder_id=str(encoder))
    (folder / "model_index.json").write_text(json.dumps(index))
    out = ["--prompt", "a red circle moving right", "--output", str(tmp_path / "o.mp4")]
    assert generate.main(["--model", str(folder), *ARGS, *out]) == 2
    err = capsys.readouterr().err
    assert f"text_encoder_id={str(encoder)!r} points outside the model folder" in err and "Traceback" not in err
    assert generate.main(["--model", str(folder), *ARGS, *out, "--text-encoder", str(encoder)]) == 0
    assert probe_video(tmp_path / "o.mp4").num_frames == 5


def test_lora_adapters_apply_with_their_scales(model_dir, tmp_path, capsys):
    from lvd.dit.lora import LoraConfig, add_lora, save_lora

    pipe = LVDPipeline.from_pretrained(model_dir)
    add_lora(pipe.transformer, LoraConfig(rank=2))
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.2)
    save_lora(pipe.transformer, tmp_path / "adapter")
    prompt = ["--prompt", "a red circle moving right"]
    paths = {name: tmp_path / f"{name}.mp4" for name in ("base", "lora", "zero", "two")}
    assert cli(model_dir, *prompt, "--output", str(paths["base"])) == 0
    assert cli(model_dir, *prompt, "--output", str(paths["lora"]), "--lora", str(tmp_path / "adapter")) == 0
    assert cli(model_dir, *prompt, "--output", str(paths["zero"]), "--lora", str(tmp_path / "adapter"),
               "--lora-scale", "0") == 0
    assert cli(model_dir, *prompt, "--output", str(paths["two"]), "--lora", str(tmp_path / "adapter"),
               "--lora", str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors"), "--lora-scale", "0.5") == 0
    base, lora = read_video(paths["base"]).int(), read_video(paths["lora"]).int()
    assert (base - lora).abs().max() > 3
    assert paths["zero"].read_bytes() == paths["base"].read_bytes()
    assert (read_video(paths["two"]).int() - lora).abs().max() <= 2  # two halves of one adapter

    capsys.readouterr()
    out = ["--output", str(tmp_path / "x.mp4")]
    assert cli(model_dir, *prompt, *out, "--lora", str(tmp_path / "nowhere")) == 2
    assert "--lora " + str(tmp_path / "nowhere") + ": no such file or folder" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    assert cli(model_dir, *prompt, *out, "--lora", str(junk)) == 2
    err = capsys.readouterr().err
    assert "not a safetensors file" in err and "Traceback" not in err
    assert cli(model_dir, *prompt, *out, "--lora", str(junk), "--lora", str(junk), "--lora-scale", "1",
               "--lora-scale", "2", "--lora-scale", "3") == 2
    assert "--lora-scale given 3 times for 2 --lora" in capsys.readouterr().err


def test_missing_or_non_pipeline_model_folder_is_refused(tmp_path, capsys, no_sampling):
    out = ["--prompt", "x", "--output", str(tmp_path / "out.mp4")]
    assert generate.main(["--model", str(tmp_path / "nowhere"), *out]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert generate.main(["--model", str(tmp_path / "empty"), *out]) == 2
    assert "is not a pipeline folder: it has no model_index.json" in capsys.readouterr().err


@pytest.mark.skipif(generate.DEFAULT_MODEL.joinpath("model_index.json").exists(), reason="the demo exists")
def test_missing_demo_says_how_to_point_at_a_model(tmp_path, capsys, no_sampling):
    assert generate.main(["--prompt", "a red circle moving right", "--output", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert "bundled demo pipeline" in err and "point --model at a pipeline folder" in err


def test_all_problems_are_listed_together(model_dir, tmp_path, capsys, no_sampling):
    assert cli(model_dir, "--output", str(tmp_path / "x.webm"), "--steps", "0", "--sampler", "heun") == 2
    err = capsys.readouterr().err
    assert "--prompt" in err and ".webm" in err and "--steps" in err and "heun" in err


def test_python_dash_m_in_a_fresh_process(model_dir, tmp_path):
    """The folder loads in a new interpreter: model_index.json names lvd modules that diffusers can resolve."""
    out = tmp_path / "fresh.mp4"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "lvd.generate", "--model", str(model_dir), *ARGS, "--prompt", "a red circle",
         "--output", str(out)], capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert probe_video(out).num_frames == 5
