"""Training with context parallelism through the stage-2 recipe, gloo on CPU: a context-parallel run gives the
losses and weights of the run without it, resumes exactly, its checkpoints load into a run without it and the
reverse, and the settings that cannot work are config errors.

The multi-process runs launch this file under torchrun:
``torchrun --standalone --nproc_per_node N tests/test_context_parallel_training.py [--die-at S | --sigkill-at S
MARKER] RECIPE_ARGS...``.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_recipes import latent_setup  # noqa: F401 (fixture: tiny VAE, text encoder and their latent shards)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
# fp32 sums in another order (the all-to-all moves whole heads, DDP averages over the world): the losses and
# weights agree to ~1e-7; this is the bar
TOL = 1e-5

TINY = [
    "data.batch_size=2", "data.workers=0", "data.shuffle=4", "model.preset=tiny",
    "model.overrides={hidden_size: 32, depth: 2, num_heads: 2}", "train.cpu_threads=1", "train.progress=false",
    "train.log_every=1", "checkpoint.every=1", "checkpoint.keep_last=20", "optim.warmup_steps=2", "samples.every=0",
    "components.vae=", "components.text_encoder=", f"train.max_steps={STEPS}",
]


@pytest.fixture(scope="module")
def latents(latent_setup):
    """Latent shards of 8 tiny clips in 2 shards ((4, 2, 8, 8) latents: 32 tokens of 1x2x2) and their empty prompt."""
    return latent_setup[0] / "latents"


def _args(shards, run_dir, *extra):
    return ["--config", str(ROOT / "recipes/configs/shapes_dit.yaml"), f"run.dir={run_dir}", f"data.shards={shards}",
            *TINY, *extra]


def _one_process(shards, run_dir, *extra):
    from recipes.train_latent_diffusion import main

    assert main(_args(shards, run_dir, *extra)) == 0
    return run_dir


def _torchrun(world, shards, run_dir, *extra, entry=(), restarts=0, ok=True):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    if restarts:  # a store per restart: with the shared one the restarted gloo workers fail to connect
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           "--max-restarts", str(restarts), str(Path(__file__).resolve()), *entry, *_args(shards, run_dir, *extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir


def _losses(run_dir, key="loss"):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def _tree(run_dir, name, step=STEPS):
    from lvd.train.checkpoint import load_tree

    return load_tree(Path(run_dir) / "checkpoints" / f"step_{step:06d}", name)


def _worst(a: dict, b: dict) -> float:
    """The largest |a - b| over every tensor of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_same_run(got, expected, first_step=1, trees=("model", "ema")):
    """Losses and gradient norms within TOL (relative) from ``first_step`` on (AdamW hides a gradient scaled by a
    constant from the loss curve; the norm shows it); the final ``trees`` (model and EMA) within TOL."""
    for key in ("loss", "grad_norm"):
        a, b = _losses(got, key), _losses(expected, key)
        assert sorted(a) == list(range(first_step, STEPS + 1)), sorted(a)
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=TOL), (key, step, a[step], b[step])
    for name in trees:
        assert _worst(_tree(got, name), _tree(expected, name)) < TOL, name


def _assert_same_files(a, b, step=STEPS):
    """Every file of the two runs' step folders byte-identical except config.yaml (it names run.dir)."""
    a, b = (Path(run) / "checkpoints" / f"step_{step:06d}" for run in (a, b))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in sorted(names, key=lambda n: n == "meta.json"):  # the data files first: they name the culprit
        if name == "meta.json":
            ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
            for m in (ma, mb):
                del m["files"]["config.yaml"], m["sha256"]["config.yaml"]
            assert ma == mb
        elif name != "config.yaml":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def single(latents, tmp_path_factory):
    """One process, 10 steps, batch 2, with its export."""
    return _one_process(latents, tmp_path_factory.mktemp("cp_runs") / "single")


@pytest.fixture(scope="module")
def ulysses(latents, tmp_path_factory):
    """Two processes, one sample's tokens split between them by Ulysses (context 2, data 1: global batch 2)."""
    return _torchrun(2, latents, tmp_path_factory.mktemp("cp_runs") / "ulysses", "distributed.strategy=ddp",
                     "distributed.ulysses_degree=2")


def test_ulysses_two_processes_train_as_one(single, ulysses):
    _assert_same_run(ulysses, single)
    from lvd.dit import VideoDiT

    # the export of the context-parallel run: the EMA, a plain model (no hooks travel into the files)
    folders = [run / "export" / "transformer" for run in (single, ulysses)]
    assert sorted(p.name for p in folders[0].iterdir()) == sorted(p.name for p in folders[1].iterdir())
    assert (folders[0] / "config.json").read_bytes() == (folders[1] / "config.json").read_bytes()
    exported = [VideoDiT.from_pretrained(folder) for folder in folders]
    assert _worst(exported[0].state_dict(), exported[1].state_dict()) < TOL
    assert _worst(exported[1].state_dict(), _tree(ulysses, "ema")) == 0
    rows = [json.loads(line) for line in (ulysses / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens_per_s"] > 0


def test_context_parallel_run_resumes_exactly(latents, ulysses, tmp_path):
    cut = tmp_path / "cut"
    cp = ("distributed.strategy=ddp", "distributed.ulysses_degree=2", "export.enabled=false")
    _torchrun(2, latents, cut, *cp, entry=("--die-at", "3"), ok=False)  # killed after the step-3 checkpoint
    assert sorted(_losses(cut)) == [1, 2, 3]
    _torchrun(2, latents, cut, *cp)
    _assert_same_files(ulysses, cut)


def test_checkpoints_move_between_context_parallel_and_one_process(latents, single, ulysses, tmp_path):
    half = STEPS // 2
    # written with context parallelism, resumed in one process (the same global batch: 2)
    resumed = _one_process(latents, tmp_path / "from_cp", "export.enabled=false",
                           f"checkpoint.resume_from={ulysses / 'checkpoints' / f'step_{half:06d}'}")
    _assert_same_run(resumed, single, first_step=half + 1)
    # written by one process, resumed with context parallelism (rank 1 takes rank 0's loader position and RNG)
    resumed = _torchrun(2, latents, tmp_path / "to_cp", "distributed.strategy=ddp", "distributed.ulysses_degree=2",
                        "export.enabled=false", f"checkpoint.resume_from={single / 'checkpoints' / f'step_{half:06d}'}")
    _assert_same_run(resumed, ulysses, first_step=half + 1)


@pytest.mark.parametrize("degrees", [
    ("distributed.ring_degree=2",),
    pytest.param(("distributed.ring_degree=2", "distributed.strategy=fsdp"), marks=pytest.mark.slow),
], ids=["ring_ddp", "ring_fsdp"])
def test_ring_two_processes_train_as_one(latents, single, tmp_path, degrees):
    """Without EMA, so the export is the context-parallel model itself: its files hold no trace of the hooks."""
    run = _torchrun(2, latents, tmp_path / "ring", "distributed.strategy=ddp", "train.ema_decay=0", *degrees)
    _assert_same_run(run, single, trees=("model",))
    from lvd.dit import VideoDiT

    folder = run / "export" / "transformer"
    assert (folder / "config.json").read_bytes() == (single / "export" / "transformer" / "config.json").read_bytes()
    assert _worst(VideoDiT.from_pretrained(folder).state_dict(), _tree(run, "model")) == 0


@pytest.mark.slow
def test_context_2_by_data_2_trains_as_data_parallel_alone(latents, tmp_path):
    """World 4 = context 2 x data 2 (FSDP2 over all four ranks) against DDP over 2 processes: the same global batch
    of 2 x 2 samples, the same shards per data rank, the same noise."""
    common = ("export.enabled=false", "checkpoint.every=5")
    data_parallel = _torchrun(2, latents, tmp_path / "ddp", "distributed.strategy=ddp", *common)
    both = _torchrun(4, latents, tmp_path / "cp_dp", "distributed.strategy=fsdp", "distributed.ulysses_degree=2",
                     *common)
    _assert_same_run(both, data_parallel)


@pytest.mark.slow
def test_a_rank_killed_mid_run_comes_back_under_torchrun_max_restarts(latents, ulysses, tmp_path):
    """Rank 1 SIGKILLs itself once before step 5; torchrun restarts both ranks, which resume from the step-4
    checkpoint and finish with the uninterrupted run's files."""
    run = tmp_path / "killed"
    _torchrun(2, latents, run, "distributed.strategy=ddp", "distributed.ulysses_degree=2", "export.enabled=false",
              entry=("--sigkill-at", "4", str(tmp_path / "killed_once")), restarts=1)
    assert (tmp_path / "killed_once").is_file()
    _assert_same_files(ulysses, run)


@pytest.mark.parametrize("world, extra, expected", [
    (1, ["distributed.ulysses_degree=2"], "= 2 does not divide the world size 1"),
    (4, ["distributed.ulysses_degree=4"], "distributed.ulysses_degree=4 does not divide the model's num_heads=2"),
    (2, ["distributed.ring_degree=2", "model.overrides={hidden_size: 32, depth: 2, num_heads: 2, "
         "attention_mode: factorized}"], "distributed.ring_degree=2 needs attention_mode='full'"),
    (4, ["distributed.ulysses_degree=2", "distributed.ring_degree=2",
         "data.buckets=[{frames: 3, height: 6, width: 6, batch_size: 2}]"], "token counts [27] are not divisible"),
    (2, ["distributed.ulysses_degree=2", "distributed.strategy=none"], "distributed.strategy=none with context"),
    (2, ["distributed.ulysses_degree=0"], "distributed.ulysses_degree=0 must be an integer >= 1"),
    # the first batch's latents (2, 8, 8) in 2x8x8 patches: one token, which no context group of 2 can split
    (2, ["distributed.ulysses_degree=2", "model.overrides={hidden_size: 32, depth: 2, num_heads: 2, "
         "patch_size: [2, 8, 8]}"], "token counts [1] are not divisible by the context size 2"),
    # listed with the recipe's other config problems, before the data is read
    (4, ["distributed.ulysses_degree=4", "samples.fps=0"], ("samples.fps=0", "does not divide the model's num_heads")),
], ids=["world", "heads", "ring_factorized", "bucket_tokens", "strategy_none", "degree", "first_batch_tokens",
        "with_other_problems"])
def test_context_parallel_settings_that_cannot_work_stop_the_recipe(latents, tmp_path, monkeypatch, capsys,
                                                                    world, extra, expected):
    """One line each, exit status 2, before any model is built or the process group starts (torchrun's
    WORLD_SIZE is all the check reads)."""
    from lvd.config import run_cli
    from recipes.train_latent_diffusion import main

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, _args(latents, tmp_path / "run", "distributed.strategy=auto", *extra),
                prog="train_latent_diffusion.py")
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "train_latent_diffusion.py: error: invalid config:"
    expected = (expected,) if isinstance(expected, str) else expected
    assert len(lines) == 1 + len(expected), lines
    for line, text in zip(lines[1:], expected):
        assert text in line, lines
    assert not (tmp_path / "run").exists()


def _torchrun_entry(argv):
    """Under torchrun: the recipe, optionally dying once: ``--die-at S`` raises KeyboardInterrupt on every rank
    before step S + 1 (after the step-S checkpoint); ``--sigkill-at S MARKER`` makes rank 1 SIGKILL itself before
    step S + 1 unless MARKER exists (it writes MARKER first, so the restarted job runs through)."""
    from lvd.train import loop
    from recipes.train_latent_diffusion import main

    real = loop.Trainer.train_step
    if argv[0] == "--die-at":
        step, argv = int(argv[1]), argv[2:]

        def dying(self, batches):
            if self.step == step:
                raise KeyboardInterrupt(f"simulated kill before step {step + 1}")
            return real(self, batches)

        loop.Trainer.train_step = dying
    elif argv[0] == "--sigkill-at":
        step, marker, argv = int(argv[1]), Path(argv[2]), argv[3:]

        def killed(self, batches):
            if self.step == step and self.env.rank == 1 and not marker.exists():
                marker.write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, batches)

        loop.Trainer.train_step = killed
    return main(argv)


if __name__ == "__main__":
    code = _torchrun_entry(sys.argv[1:])
    # gloo on CPU sometimes aborts in C++ static destructors after every result is written (see test_distributed)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
