"""The training recipes end to end on tiny data the test writes: run folder, exact resume, torchrun.

A "kill" is simulated by making the trainer raise KeyboardInterrupt before its 4th optimizer step,
after the step-3 checkpoint; the same command then resumes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lvd.train import loop
from lvd.train.checkpoint import CheckpointError, latest_checkpoint, load_tree

ROOT = Path(__file__).resolve().parents[1]

TINY_VAE = [
    "data.frames=5", "data.size=16", "data.batch_size=2", "data.workers=0", "data.shuffle=4",
    "model.overrides={block_out_channels: [8, 8, 16], norm_num_groups: 4, spatial_compression: 2}",
    "train.cpu_threads=1", "train.progress=false", "train.log_every=1", "checkpoint.every=1", "checkpoint.keep_last=10",
    "optim.warmup_steps=2", "eval.every=2", "eval.frames=5", "eval.num_clips=2", "eval.batch_size=2", "samples.every=2", "samples.num=1",
    "loss.adv_weight=0.1", "loss.adv_start_step=2", "discriminator.base_channels=8", "discriminator.num_layers=1",
    "export.calibration_batches=1",
]


@pytest.fixture(scope="module")
def clip_shards(tmp_path_factory):
    from lvd.data.shards import main as shards_main

    root = tmp_path_factory.mktemp("clips")
    common = ["--frames", "5", "--size", "16", "--shard-size", "4", "--workers", "1", "--quiet"]
    assert shards_main(["synthetic", "--out", str(root / "train"), "--count", "8", *common]) == 0
    assert shards_main(["synthetic", "--out", str(root / "val"), "--count", "2", "--seed", "7", *common]) == 0
    return root


def _vae_args(shards, run_dir, *extra):
    return ["--config", str(ROOT / "recipes/configs/shapes_vae.yaml"), f"run.dir={run_dir}",
            f"data.shards={shards / 'train'}", f"eval.shards={shards / 'val'}", *TINY_VAE, *extra]


def _kill_before_step(monkeypatch, step):
    real = loop.Trainer.train_step

    def dying(self, batches):
        if self.step == step:
            raise KeyboardInterrupt(f"simulated kill before step {step + 1}")
        return real(self, batches)

    monkeypatch.setattr(loop.Trainer, "train_step", dying)


def _final_state(run_dir):
    step_dir = latest_checkpoint(run_dir)
    out = {}
    for name in ("model", "ema", "optimizer", "discriminator", "discriminator_optimizer", "trainer", "rank0"):
        if (step_dir / f"{name}.safetensors").exists() or (step_dir / f"{name}.json").exists():
            out[name] = load_tree(step_dir, name)
    return step_dir.name, out


def _assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    elif hasattr(a, "tolist"):  # numpy RNG keys
        assert a.tolist() == b.tolist(), path
    else:
        assert a == b, path


def _assert_same_files(full, resumed, steps=(3, 4)):
    """Every checkpoint file of two runs byte-identical, rank0's RNG states included. config.yaml names its
    run.dir and max_steps, so it (and its hash in meta.json) is the one file allowed to differ."""
    for step in steps:
        a, b = (run / "checkpoints" / f"step_{step:06d}" for run in (full, resumed))
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir()) and "rank0.safetensors" in names
        for name in sorted(names, key=lambda n: n == "meta.json"):  # the data files first: they name the culprit
            if name == "meta.json":
                ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
                for m in (ma, mb):
                    del m["files"]["config.yaml"], m["sha256"]["config.yaml"]
                assert ma == mb, f"{a.name}/{name}"
            elif name != "config.yaml":
                assert (a / name).read_bytes() == (b / name).read_bytes(), f"{a.name}/{name}"


# The shipped configs load data with one worker process: torch's DataLoader then draws a base seed from the
# global generator whenever an iterator starts, which a resume does once more than an uninterrupted run.
@pytest.mark.parametrize("workers", [0, 1])
def test_vae_recipe_two_steps_then_four_gives_the_same_files(clip_shards, tmp_path, workers):
    from recipes.train_vae import main

    fast = [f"data.workers={workers}", "eval.shards=", "export.enabled=false", "train.max_steps=4"]
    assert main(_vae_args(clip_shards, tmp_path / "full", *fast)) == 0
    assert main(_vae_args(clip_shards, tmp_path / "cut", *fast, "train.max_steps=2")) == 0
    assert main(_vae_args(clip_shards, tmp_path / "cut", *fast)) == 0
    _assert_same_files(tmp_path / "full", tmp_path / "cut")


def test_vae_recipe_resume_from_errors_are_one_line(clip_shards, tmp_path, capsys):
    from test_checkpoint import overwrite_middle

    from lvd.config import run_cli
    from recipes.train_vae import main

    def cli(*extra):
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, _vae_args(clip_shards, tmp_path, "eval.shards=", "export.enabled=false", *extra),
                    prog="train_vae.py", user_errors=(CheckpointError,))
        return exit_.value.code, capsys.readouterr().err.strip()

    code, err = cli("train.max_steps=1", f"checkpoint.resume_from={tmp_path / 'nope'}")
    assert code == 2 and err.splitlines()[1:] == [f"  checkpoint.resume_from='{tmp_path / 'nope'}': no such folder"]
    assert not (tmp_path / "checkpoints").exists()  # reported before anything ran
    assert cli("train.max_steps=1") == (0, "")
    step_dir = tmp_path / "checkpoints" / "step_000001"
    overwrite_middle(step_dir / "model.safetensors")
    code, err = cli("train.max_steps=2", f"checkpoint.resume_from={step_dir}")
    assert code == 2 and "model.safetensors" in err and "\n" not in err, err
    assert latest_checkpoint(tmp_path).name == "step_000001"


def test_vae_recipe_resume_is_bit_exact(clip_shards, tmp_path, monkeypatch):
    from recipes.train_vae import main

    assert main(_vae_args(clip_shards, tmp_path / "full", "train.max_steps=5")) == 0
    with monkeypatch.context() as m:
        _kill_before_step(m, 3)
        with pytest.raises(KeyboardInterrupt):
            main(_vae_args(clip_shards, tmp_path / "cut", "train.max_steps=5"))
    assert latest_checkpoint(tmp_path / "cut").name == "step_000003"
    assert main(_vae_args(clip_shards, tmp_path / "cut", "train.max_steps=5")) == 0

    name_a, a = _final_state(tmp_path / "full")
    name_b, b = _final_state(tmp_path / "cut")
    assert name_a == name_b == "step_000005"
    _assert_same(a, b)
    # The run folder: resolved config, metrics, tensorboard, samples, export with calibrated latents.
    run = tmp_path / "cut"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert any("eval/psnr" in r for r in rows) and "discriminator_loss" in rows[-2]
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())
    assert sorted(p.name for p in (run / "samples").iterdir())[-1] == "step_000005.gif"
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["_class_name"] == "CausalVideoVAE" and len(config["latent_std"]) == 16


def test_vae_recipe_three_steps_then_extend(clip_shards, tmp_path):
    """Train 3 steps (a finished run), then the same command with train.max_steps=5 continues it."""
    from recipes.train_vae import main

    const = ["optim.schedule=constant", "export.enabled=false", "eval.shards="]
    assert main(_vae_args(clip_shards, tmp_path / "full", "train.max_steps=5", *const)) == 0
    assert main(_vae_args(clip_shards, tmp_path / "ext", "train.max_steps=3", *const)) == 0
    assert main(_vae_args(clip_shards, tmp_path / "ext", "train.max_steps=5", *const)) == 0
    _assert_same(_final_state(tmp_path / "full"), _final_state(tmp_path / "ext"))


def test_vae_recipe_torchrun_two_gloo_processes(clip_shards, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "recipes/train_vae.py"),
           *_vae_args(clip_shards, tmp_path / "ddp", "train.max_steps=2", "distributed.strategy=ddp",
                      "distributed.device=cpu", "export.enabled=false", "loss.adv_start_step=1")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert rows[-1]["samples_per_s"] > 0 and "discriminator_loss" in rows[-1]  # the GAN step ran under DDP
    assert latest_checkpoint(tmp_path / "ddp").name == "step_000002"
    assert (latest_checkpoint(tmp_path / "ddp") / "rank1.json").is_file()


def test_vae_recipe_rejects_clips_the_vae_cannot_take(clip_shards, tmp_path):
    from recipes.train_vae import main

    with pytest.raises(ValueError, match="frame count must be 1 \\+ 4"):
        main(_vae_args(clip_shards, tmp_path / "bad", "train.max_steps=1", "data.frames=4"))


def test_fsdp_without_torchrun_stops_the_recipe(clip_shards, tmp_path, monkeypatch):
    from lvd.train.distributed import DistributedError
    from recipes.train_vae import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(DistributedError, match="torchrun"):
        main(_vae_args(clip_shards, tmp_path / "x", "distributed.strategy=fsdp"))


def test_importing_recipes_does_nothing(tmp_path, monkeypatch):
    import importlib

    import recipes.train_latent_diffusion
    import recipes.train_shapes_demo
    import recipes.train_shapes_lora
    import recipes.train_vae

    monkeypatch.chdir(tmp_path)
    for module in (recipes.train_vae, recipes.train_latent_diffusion, recipes.train_shapes_demo,
                   recipes.train_shapes_lora):
        importlib.reload(module)  # module level runs again: no run folder, no parsing of sys.argv
        assert callable(module.main) and "python recipes/" in module.__doc__
    assert "torchrun" in recipes.train_vae.__doc__ and "torchrun" in recipes.train_latent_diffusion.__doc__
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Stage 2: the latent diffusion recipe
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory):
    """Tiny VAE + text encoder folders, clip shards and the latent shards lvd.cache_latents makes of them."""
    from lvd.cache_latents import main as cache_main
    from test_cache_latents import make_clip_shards, make_components

    root = tmp_path_factory.mktemp("latents")
    vae_dir, text_dir = make_components(root)
    clips = make_clip_shards(root / "clips", count=8, shard_size=4)
    assert cache_main(["--shards", str(clips), "--out", str(root / "latents"), "--vae", str(vae_dir),
                       "--text-encoder", str(text_dir), "--quiet"]) == 0
    return root, vae_dir, text_dir


TINY_DIT = [
    "data.batch_size=2", "data.workers=0", "data.shuffle=4", "model.preset=tiny",
    "model.overrides={hidden_size: 32, depth: 2, num_heads: 2}", "train.cpu_threads=1", "train.progress=false",
    "train.log_every=1", "checkpoint.every=1", "checkpoint.keep_last=10", "optim.warmup_steps=2",
    "samples.every=5", "samples.num_frames=5", "samples.height=16", "samples.width=16",
    "samples.num_inference_steps=2", "samples.prompts=[a red circle moving left]", "components.text_max_length=8",
    "samples.shapes_eval=3",
]


def _dit_args(setup, run_dir, *extra):
    root, vae_dir, text_dir = setup
    return ["--config", str(ROOT / "recipes/configs/shapes_dit.yaml"), f"run.dir={run_dir}",
            f"data.shards={root / 'latents'}", f"components.vae={vae_dir}", f"components.text_encoder={text_dir}",
            *TINY_DIT, *extra]


def test_dit_recipe_resume_is_bit_exact_and_exports_a_pipeline(latent_setup, tmp_path, monkeypatch):
    from recipes.train_latent_diffusion import main

    assert main(_dit_args(latent_setup, tmp_path / "full", "train.max_steps=5")) == 0
    with monkeypatch.context() as m:
        _kill_before_step(m, 3)
        with pytest.raises(KeyboardInterrupt):
            main(_dit_args(latent_setup, tmp_path / "cut", "train.max_steps=5"))
    assert main(_dit_args(latent_setup, tmp_path / "cut", "train.max_steps=5")) == 0
    name_a, a = _final_state(tmp_path / "full")
    name_b, b = _final_state(tmp_path / "cut")
    assert name_a == name_b == "step_000005"
    _assert_same(a, b)

    run = tmp_path / "cut"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5] and rows[-1]["tokens_per_s"] > 0
    assert (run / "samples" / "step_000005_0.gif").is_file()
    scored = [r for r in rows if "eval/color" in r]  # samples.shapes_eval: the shapes scores are logged
    assert [r["step"] for r in scored] == [5] and 0 <= scored[0]["eval/direction"] <= 1
    export = run / "export"
    index = json.loads((export / "model_index.json").read_text())
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and (export / part).is_dir(), part
    from lvd.dit import VideoDiT

    exported = VideoDiT.from_pretrained(export / "transformer")
    ema = load_tree(latest_checkpoint(run), "ema")
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ema[k]), k


@pytest.mark.parametrize("workers", [0, 1])
def test_dit_recipe_two_steps_then_four_gives_the_same_files(latent_setup, tmp_path, workers):
    from recipes.train_latent_diffusion import main

    fast = [f"data.workers={workers}", "samples.every=0", "export.enabled=false", "train.max_steps=4"]
    assert main(_dit_args(latent_setup, tmp_path / "full", *fast)) == 0
    assert main(_dit_args(latent_setup, tmp_path / "cut", *fast, "train.max_steps=2")) == 0
    assert main(_dit_args(latent_setup, tmp_path / "cut", *fast)) == 0
    _assert_same_files(tmp_path / "full", tmp_path / "cut")


def test_dit_recipe_rejects_latents_that_do_not_fit(latent_setup, tmp_path):
    from recipes.train_latent_diffusion import main

    with pytest.raises(ValueError, match="not divisible by patch_size"):
        main(_dit_args(latent_setup, tmp_path / "a", "train.max_steps=1",
                       "model.overrides={hidden_size: 32, depth: 1, num_heads: 2, patch_size: [1, 3, 3]}"))
    with pytest.raises(ValueError, match="in_channels=8 but the shards have 4"):
        main(_dit_args(latent_setup, tmp_path / "b", "train.max_steps=1",
                       "model.overrides={hidden_size: 32, depth: 1, num_heads: 2, in_channels: 8}"))
