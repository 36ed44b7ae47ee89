"""Every entry point turns a user error into a message and exit status 2, before any work, never a traceback.

Entry points: ``python -m lvd.generate``, ``python -m lvd.data.shards``, ``python -m lvd.cache_latents``,
``python recipes/train_vae.py`` and ``python recipes/train_latent_diffusion.py``. Most checks call ``main(argv)``
or ``config.run_cli(main, argv)`` (what each ``__main__`` block does) in this process; each ``__main__`` block
also runs here through runpy, and two entry points run as real processes to show stderr holds no traceback.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_recipes import TINY_VAE

from lvd import config, generate
from lvd.config import ConfigError, load_config
from lvd.pipeline import LVDPipeline
from lvd.video_io import probe_video, read_video, write_video

ROOT = Path(__file__).resolve().parents[1]
VAE_YAML = ROOT / "recipes/configs/shapes_vae.yaml"
DIT_YAML = ROOT / "recipes/configs/shapes_dit.yaml"
UNCREATABLE = "/proc/lvd-test/x"  # /proc refuses new folders, even for root
GEN_ARGS = ["--frames", "5", "--height", "16", "--width", "16", "--steps", "2", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def dummy_shards(tmp_path_factory):
    """A folder holding one (empty) shard: enough for the start checks, which only look for the files."""
    folder = tmp_path_factory.mktemp("dummy_shards")
    (folder / "shard-000000.tar").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def clip_shards(tmp_path_factory):
    """Two tiny synthetic clip shards: train (2 clips) and val (1 clip)."""
    from lvd.data.shards import main as shards_main

    root = tmp_path_factory.mktemp("clips")
    common = ["--frames", "5", "--size", "16", "--shard-size", "2", "--workers", "1", "--quiet"]
    assert shards_main(["synthetic", "--out", str(root / "train"), "--count", "2", *common]) == 0
    assert shards_main(["synthetic", "--out", str(root / "val"), "--count", "1", "--seed", "7", *common]) == 0
    return root


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a recipe builds a model, reads data or samples: bad input must stop it before."""
    from lvd.dit import VideoDiT
    from lvd.train import loop
    from lvd.vae import CausalVideoVAE

    def refuse(*args, **kwargs):
        raise AssertionError("work started although the input was bad")

    for owner, name in [(CausalVideoVAE, "from_preset"), (CausalVideoVAE, "from_pretrained"),
                        (VideoDiT, "from_preset"), (loop.Trainer, "__init__"), (LVDPipeline, "__call__")]:
        monkeypatch.setattr(owner, name, refuse)


def vae_argv(shards, run_dir, *extra):
    return ["--config", str(VAE_YAML), f"run.dir={run_dir}", f"data.shards={shards}", "eval.shards=", *extra]


def dit_argv(shards, run_dir, *extra):
    return ["--config", str(DIT_YAML), f"run.dir={run_dir}", f"data.shards={shards}", "components.vae=tiny",
            "components.text_encoder=", "diffusion.cfg_dropout=0", *extra]


def recipe_main(name):
    if name == "vae":
        from recipes.train_vae import main
    else:
        from recipes.train_latent_diffusion import main
    return main


def exit_code_and_err(main, argv, capsys):
    """Run ``main`` the way its ``__main__`` block does; (status, stderr)."""
    with pytest.raises(SystemExit) as e:
        config.run_cli(main, argv, prog="test")
    return e.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 1. Bad configs and command lines: exit 2, the problems listed, no traceback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["vae", "dit"])
@pytest.mark.parametrize("case", ["unknown key", "wrong type", "bad yaml", "missing file", "bad override yaml",
                                  "unknown model argument"])
def test_bad_config_exits_2_listing_the_problems(recipe, case, dummy_shards, tmp_path, capsys, no_work):
    argv = (vae_argv if recipe == "vae" else dit_argv)(dummy_shards, tmp_path / "run")
    typo, meant = ("latent_chanels", "latent_channels") if recipe == "vae" else ("hiden_size", "hidden_size")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  max_steps: [3\n")
    argv, expected = {
        "unknown key": (argv + ["train.max_stepz=3", "optim.lrr=1"], ["train.max_stepz", "'max_steps'", "optim.lrr"]),
        "wrong type": (argv + ["train.max_steps=many"], ["train.max_steps: expected int, got 'many'"]),
        "bad yaml": (["--config", str(bad_yaml)], [f"config file {bad_yaml} is not valid YAML: line 3"]),
        "missing file": (["--config", str(tmp_path / "nope.yaml")], ["config file not found"]),
        "bad override yaml": (argv + ["model.overrides={a: [1"], ["override 'model.overrides={a: [1'"]),
        "unknown model argument": (argv + [f"model.overrides.{typo}=64"],
                                   [f"model.overrides.{typo}: not an argument of", f"'{meant}'"]),
    }[case]
    code, err = exit_code_and_err(recipe_main(recipe), argv, capsys)
    assert code == 2
    assert err.startswith("test: error: ")
    for text in expected:
        assert text in err
    assert not (tmp_path / "run").exists()


def test_a_dataclass_value_check_is_a_config_problem(capsys):
    from recipes.train_vae import VAERecipeConfig

    with pytest.raises(ConfigError) as e:
        load_config(VAERecipeConfig, VAE_YAML, ["data.batch_size=0", "train.seed=x"])
    assert "data: invalid ClipDataConfig: batch_size must be >= 1, got 0" in str(e.value)
    assert "train.seed: expected int" in str(e.value)


def test_non_utf8_config_file_is_a_config_error(tmp_path):
    from recipes.train_vae import VAERecipeConfig

    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(VAERecipeConfig, path)


# ---------------------------------------------------------------------------------------------
# 2. Values that cannot work: refused at start, naming key and value, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["vae", "dit"])
@pytest.mark.parametrize("override, message", [
    ("checkpoint.every=0", "checkpoint.every=0: must be >= 1"),
    ("checkpoint.every=-5", "checkpoint.every=-5: must be >= 1"),
    ("train.max_steps=0", "train.max_steps=0: must be >= 1"),
    ("train.max_steps=-1", "train.max_steps=-1: must be >= 1"),
    ("samples.every=-1", "samples.every=-1: must be >= 0 (0: off)"),
    ("samples.format=avi", "samples.format='avi': must be 'gif' or 'mp4'"),
])
def test_values_that_cannot_work_are_refused_at_start(recipe, override, message, dummy_shards, tmp_path, no_work):
    argv = (vae_argv if recipe == "vae" else dit_argv)(dummy_shards, tmp_path / "run", override)
    with pytest.raises(ConfigError) as e:
        recipe_main(recipe)(argv)
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_all_value_problems_are_listed_together(dummy_shards, tmp_path, capsys, no_work):
    argv = dit_argv(dummy_shards, tmp_path / "run", "checkpoint.every=0", "train.max_steps=0",
                    "samples.guidance_scale=.inf")
    code, err = exit_code_and_err(recipe_main("dit"), argv, capsys)
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == "test: error: invalid config:"
    assert {"  checkpoint.every=0: must be >= 1", "  train.max_steps=0: must be >= 1",
            "  samples.guidance_scale=inf: must be a finite number >= 0"} <= set(lines)


def test_samples_every_0_turns_samples_off(clip_shards, tmp_path):
    """Before: Hook(every=0) divided by zero after the first step."""
    from recipes.train_vae import main

    run = tmp_path / "run"
    argv = vae_argv(clip_shards / "train", run, *TINY_VAE, f"eval.shards={clip_shards / 'val'}", "eval.num_clips=1",
                    "train.max_steps=2", "samples.every=0", "eval.every=1", "export.enabled=false")
    assert main(argv) == 0
    assert list((run / "samples").iterdir()) == []
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/psnr" in r] == [1, 2]


def test_dit_samples_every_0_is_accepted(dummy_shards, tmp_path):
    from recipes.train_latent_diffusion import DiTRecipeConfig, check_config

    check_config(load_config(DiTRecipeConfig, DIT_YAML, dit_argv(dummy_shards, tmp_path / "r", "samples.every=0")[2:]))


def test_trainer_refuses_values_that_cannot_work(tmp_path):
    from lvd.train.checkpoint import CheckpointConfig
    from lvd.train.distributed import DistEnv
    from lvd.train.loop import OptimConfig, TrainConfig, Trainer

    with pytest.raises(ConfigError, match="checkpoint.every=0.*\n.*train.ema_decay=1.0"):
        Trainer(run_dir=tmp_path, model=torch.nn.Linear(2, 2), loss_fn=None, optim=OptimConfig(),
                train=TrainConfig(ema_decay=1.0), checkpoint=CheckpointConfig(every=0), env=DistEnv())


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_generate_refuses_a_non_finite_guidance(value, model_dir, tmp_path, capsys, no_work):
    """Before: inf gave a black video, nan turned guidance off; both exited 0."""
    out = tmp_path / "o.mp4"
    argv = ["--model", str(model_dir), *GEN_ARGS, "--prompt", "x", "--output", str(out), f"--guidance={value}"]
    assert generate.main(argv) == 2
    assert f"--guidance must be a finite number >= 0, got {float(value)}" in capsys.readouterr().err
    assert not out.exists()


def test_generate_refuses_sizes_whose_video_cannot_fit_in_memory(model_dir, tmp_path, capsys, no_work):
    """Before: the allocator's traceback once sampling started."""
    big = ["--frames", "100001", "--height", "65536", "--width", "65536"]
    argv = ["--model", str(model_dir), *GEN_ARGS, *big, "--prompt", "x", "--output", str(tmp_path / "o.mp4")]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert "--frames 100001 --height 65536 --width 65536: the decoded videos need" in err
    assert "of memory available" in err
    assert not list(tmp_path.iterdir())


def test_generate_refuses_an_output_folder_it_cannot_create(model_dir, capsys, no_work):
    """Before: as root the permission check passed, and the write failed after sampling."""
    argv = ["--model", str(model_dir), *GEN_ARGS, "--prompt", "x", "--output", f"{UNCREATABLE}/y.mp4"]
    assert generate.main(argv) == 2
    assert f"--output {UNCREATABLE}/y.mp4: cannot write into /proc" in capsys.readouterr().err


def test_generate_refuses_a_prompts_file_that_is_not_utf8(model_dir, tmp_path, capsys, no_work):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe moving left\n")
    argv = ["--model", str(model_dir), *GEN_ARGS, "--prompts-file", str(prompts), "--output", str(tmp_path / "o.mp4")]
    assert generate.main(argv) == 2
    assert f"--prompts-file {prompts} is not UTF-8 text (byte 13)" in capsys.readouterr().err


def test_shards_refuses_an_out_folder_it_cannot_create(capsys):
    from lvd.data.shards import main

    with pytest.raises(SystemExit) as e:
        main(["synthetic", "--count", "1", "--out", UNCREATABLE])
    assert e.value.code == 2
    assert f"--out {UNCREATABLE}: cannot write into /proc" in capsys.readouterr().err


def test_cache_latents_refuses_an_out_folder_it_cannot_create(clip_shards, capsys):
    from lvd.cache_latents import main

    argv = ["--shards", str(clip_shards / "val"), "--out", UNCREATABLE, "--vae", "tiny", "--text-encoder", "x"]
    assert main(argv) == 2
    assert f"--out {UNCREATABLE}: cannot write into /proc" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["vae", "dit"])
def test_recipes_refuse_a_run_folder_they_cannot_create(recipe, dummy_shards, capsys, no_work):
    argv = (vae_argv if recipe == "vae" else dit_argv)(dummy_shards, UNCREATABLE)
    code, err = exit_code_and_err(recipe_main(recipe), argv, capsys)
    assert code == 2
    assert f"run.dir='{UNCREATABLE}': cannot write into /proc" in err


# ---------------------------------------------------------------------------------------------
# 3. A colon in an output name is a file name, not an ffmpeg protocol
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["take:1.mp4", "take:2.gif"])
def test_video_with_a_colon_in_its_name_writes_and_reads_back(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    video = torch.zeros(3, 5, 16, 16, dtype=torch.uint8)
    video[:, :, 4:12, 4:12] = 200
    write_video(name, video, fps=8)
    assert (tmp_path / name).is_file() and os.listdir(tmp_path) == [name]
    assert probe_video(name).num_frames == 5
    assert read_video(name).shape == (3, 5, 16, 16)


def test_generate_writes_an_output_with_a_colon(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert generate.main(["--model", str(model_dir), *GEN_ARGS, "--prompt", "x", "--output", "take:1.mp4"]) == 0
    assert probe_video(tmp_path / "take:1.mp4").num_frames == 5


# ---------------------------------------------------------------------------------------------
# 4. Every path a recipe or cache_latents names is checked at start, all missing ones reported at once
# ---------------------------------------------------------------------------------------------


def test_vae_recipe_reports_every_missing_path(tmp_path, no_work):
    gone = tmp_path / "gone"
    argv = vae_argv(gone / "train", tmp_path / "run", f"eval.shards={gone / 'val'}", f"model.init_from={gone / 'vae'}")
    with pytest.raises(ConfigError) as e:
        recipe_main("vae")(argv)
    msg = str(e.value)
    assert f"data.shards='{gone / 'train'}': '{gone / 'train'}' does not exist" in msg
    assert f"eval.shards='{gone / 'val'}'" in msg
    assert f"model.init_from='{gone / 'vae'}': no such folder" in msg
    assert not (tmp_path / "run").exists()


def test_dit_recipe_reports_every_missing_path(tmp_path, no_work):
    """Before: a missing components.vae trained to the end, then crashed in the sample hook."""
    gone = tmp_path / "gone"
    argv = dit_argv(gone / "latents", tmp_path / "run", f"components.vae={gone / 'vae'}",
                    f"components.text_encoder={gone / 'text'}", f"components.uncond={gone / 'uncond.safetensors'}")
    with pytest.raises(ConfigError) as e:
        recipe_main("dit")(argv)
    lines = str(e.value).splitlines()
    assert lines[0] == "invalid config:" and len(lines) == 5
    for key in ("data.shards", "components.vae", "components.text_encoder", "components.uncond"):
        assert any(line.startswith(f"  {key}='{gone}") for line in lines), key
    assert not (tmp_path / "run").exists()


def test_dit_recipe_missing_vae_with_real_shards_stops_before_training(dummy_shards, tmp_path, capsys, no_work):
    argv = dit_argv(dummy_shards, tmp_path / "run", f"components.vae={tmp_path / 'no_vae'}")
    code, err = exit_code_and_err(recipe_main("dit"), argv, capsys)
    assert code == 2 and f"components.vae='{tmp_path / 'no_vae'}': no such folder, and not a VAE preset" in err


def test_cache_latents_checks_vae_and_text_encoder_before_writing(clip_shards, tmp_path, capsys):
    from lvd.cache_latents import main

    out = tmp_path / "latents"
    argv = ["--shards", str(clip_shards / "val"), "--out", str(out), "--vae", str(tmp_path / "no_vae"),
            "--text-encoder", str(tmp_path / "no_text"), "--device", "tpu9", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--vae {tmp_path / 'no_vae'}: no such folder" in err
    assert f"--text-encoder {tmp_path / 'no_text'}: no such folder" in err
    assert "--device 'tpu9' is not a device" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 5. Bugs keep their traceback; the real processes print one message and exit 2
# ---------------------------------------------------------------------------------------------


def test_run_cli_catches_user_errors_only(capsys):
    def user_error(argv):
        raise config.UserError("--flag x: bad")

    def bug(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(SystemExit) as e:
        config.run_cli(user_error, [], prog="tool")
    assert e.value.code == 2 and capsys.readouterr().err == "tool: error: --flag x: bad\n"
    with pytest.raises(ZeroDivisionError):
        config.run_cli(bug, [], prog="tool")
    with pytest.raises(SystemExit) as e:
        config.run_cli(lambda argv: 3, [], prog="tool")
    assert e.value.code == 3


def _entry_points(model_dir, clip_shards, dummy_shards, tmp_path) -> dict:
    """name -> (argv after the interpreter, texts stderr must hold); every one has bad input."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {max_steps: 3\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\n")
    return {
        "train_vae": ([str(ROOT / "recipes/train_vae.py"), "--config", str(bad_yaml)], ["is not valid YAML"]),
        "train_dit": ([str(ROOT / "recipes/train_latent_diffusion.py"),
                       *dit_argv(dummy_shards, tmp_path / "run", "checkpoint.every=0", f"components.vae={tmp_path}/v")],
                      ["checkpoint.every=0", "components.vae="]),
        "generate": (["-m", "lvd.generate", "--model", str(model_dir), "--prompts-file", str(prompts),
                      "--guidance", "nan", "--output", f"{UNCREATABLE}/o.mp4"], ["--prompts-file", "--guidance", "--output"]),
        "cache_latents": (["-m", "lvd.cache_latents", "--shards", str(clip_shards / "val"), "--out", str(tmp_path / "lat"),
                           "--vae", str(tmp_path / "v"), "--text-encoder", "t"], ["--vae", "--text-encoder"]),
        "shards": (["-m", "lvd.data.shards", "synthetic", "--count", "1", "--out", UNCREATABLE], ["--out"]),
    }


@pytest.mark.parametrize("name", ["train_vae", "train_dit", "generate", "cache_latents", "shards"])
def test_each_main_block_exits_2_with_the_message(name, model_dir, clip_shards, dummy_shards, tmp_path, monkeypatch,
                                                  capsys):
    """The ``if __name__ == "__main__"`` block of each entry point, run in this process (runpy)."""
    import runpy
    import warnings

    argv, texts = _entry_points(model_dir, clip_shards, dummy_shards, tmp_path)[name]
    monkeypatch.setattr(sys, "argv", [argv[0] if argv[0] != "-m" else argv[1], *argv[(2 if argv[0] == "-m" else 1):]])
    with pytest.raises(SystemExit) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": the module runs a second time
        if argv[0] == "-m":
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    for text in texts:
        assert text in err, (text, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "lat").exists()


def test_real_processes_exit_2_without_a_traceback(model_dir, clip_shards, dummy_shards, tmp_path):
    """Two entry points as real processes, side by side (a recipe spends ~10 s importing diffusers)."""
    runs = _entry_points(model_dir, clip_shards, dummy_shards, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = {name: subprocess.Popen([sys.executable, *runs[name][0]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
             for name in ("train_dit", "shards")}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in err, (name, err[-2000:])
        assert all(text in err for text in runs[name][1]), (name, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", ["vae", "dit"])
def test_a_pipe_shard_spec_is_refused_and_runs_nothing(recipe, tmp_path, capsys, no_work):
    marker = tmp_path / "ran"
    argv = (vae_argv if recipe == "vae" else dit_argv)(f"pipe:touch {marker}", tmp_path / "run")
    code, err = exit_code_and_err(recipe_main(recipe), argv, capsys)
    assert code == 2 and "data.allow_pipe=true" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "run").exists()
