"""DDP and FSDP2 under torchrun with 2 gloo processes on CPU, against one process with the same global batch.

The test launches this file itself: ``torchrun --standalone --nproc_per_node 2 tests/test_distributed.py MODE DIR``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from lvd.train.checkpoint import CheckpointConfig
from lvd.train.distributed import DistributedConfig, DistributedError, init_distributed, shutdown
from lvd.train.loop import OptimConfig, StepOutput, TrainConfig, Trainer, export_pretrained, prepare_model

GLOBAL_BATCH = 8
ROOT = Path(__file__).resolve().parents[1]


class ShardedLoader:
    """Global batch i is a pure function of i; each rank takes its contiguous slice of it."""

    def __init__(self, rank, world):
        self.rank, self.world, self.pos = rank, world, 0

    def __iter__(self):
        while True:
            x = torch.randn(GLOBAL_BATCH, 6, generator=torch.Generator().manual_seed(self.pos))
            self.pos += 1
            n = GLOBAL_BATCH // self.world
            yield {"x": x[self.rank * n:(self.rank + 1) * n]}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, d):
        self.pos = d["pos"]


class Blocks(ModelMixin, ConfigMixin):
    """Three residual blocks; a diffusers model, so an export can rebuild it from its config."""

    @register_to_config
    def __init__(self, width: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(3)])  # FSDP2 shards each block

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return x


def loss_fn(model, batch, step, gen):
    x = batch["x"]
    return StepOutput((model(x) - x.flip(-1)).square().mean())


def train(run_dir, strategy, steps):
    torch.manual_seed(0)
    dist_cfg = DistributedConfig(strategy=strategy, device="cpu")
    env = init_distributed(dist_cfg)
    train_cfg = TrainConfig(max_steps=steps, grad_accum=1, ema_decay=0.9, log_every=1, progress=False)
    model, ema = prepare_model(Blocks(), env, dist_cfg, train_cfg)
    trainer = Trainer(run_dir=run_dir, model=model, loss_fn=loss_fn, optim=OptimConfig(lr=1e-2), train=train_cfg,
                      checkpoint=CheckpointConfig(every=steps), env=env, ema=ema)
    trainer.fit(ShardedLoader(env.rank, env.world_size))
    export_pretrained(ema.model, Path(run_dir) / "export", env)  # every rank: under FSDP2 the weights are gathered
    from lvd.train.distributed import model_state_dict

    state = model_state_dict(trainer.model)
    ema_state = model_state_dict(ema.model)
    if env.is_main:
        out = {"params": {k: v.tolist() for k, v in state.items()}, "ema": {k: v.tolist() for k, v in ema_state.items()}}
        (Path(run_dir) / "final.json").write_text(json.dumps(out))
    shutdown()


def _torchrun(mode, run_dir, steps=3):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), mode, str(run_dir), str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_processes_match_one_process(tmp_path):
    train(tmp_path / "one", "none", 3)
    _torchrun("ddp", tmp_path / "two")
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    one = json.loads((tmp_path / "one" / "final.json").read_text())
    two = json.loads((tmp_path / "two" / "final.json").read_text())
    for k in one["params"]:
        assert torch.allclose(torch.tensor(one["params"][k]), torch.tensor(two["params"][k]), atol=1e-6), k
        assert torch.allclose(torch.tensor(one["ema"][k]), torch.tensor(two["ema"][k]), atol=1e-6), k


def test_fsdp2_two_processes_complete_two_steps(tmp_path):
    _torchrun("fsdp", tmp_path / "fsdp", steps=2)
    assert len(_losses(tmp_path / "fsdp")) == 2
    one = json.loads((tmp_path / "fsdp" / "final.json").read_text())
    assert len(one["params"]["blocks.0.weight"]) == 6  # gathered to full size on rank 0
    exported = Blocks.from_pretrained(tmp_path / "fsdp" / "export").state_dict()  # the EMA, whole
    assert exported.keys() == one["ema"].keys()
    for k, v in exported.items():
        assert torch.equal(v, torch.tensor(one["ema"][k])), k


@pytest.mark.slow
def test_fsdp2_two_processes_train_and_resume(tmp_path):
    _torchrun("fsdp", tmp_path / "fsdp", steps=2)
    assert len(_losses(tmp_path / "fsdp")) == 2
    # The checkpoint holds full (unsharded) tensors, so resuming with more steps works too.
    _torchrun("fsdp", tmp_path / "fsdp", steps=3)
    assert len(_losses(tmp_path / "fsdp")) == 3
    one = json.loads((tmp_path / "fsdp" / "final.json").read_text())
    assert one["params"]["blocks.0.weight"] and len(one["params"]["blocks.0.weight"]) == 6


def test_fsdp_without_torchrun_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(DistributedError, match="needs torchrun"):
        init_distributed(DistributedConfig(strategy="fsdp"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(sys.argv[2], sys.argv[1], int(sys.argv[3]))
    # torch 2.13 CPU + gloo + FSDP2: about 1 exit in 4 aborts in C++ static destructors ("terminate called
    # without an active exception") after destroy_process_group has returned and every result is written.
    # Skipping interpreter teardown made 16/16 runs exit cleanly; the test checks the written results.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
