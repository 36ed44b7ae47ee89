"""The generic trainer on toy models: exact resume, NaN skipping, GAN aux step, logging, LR schedule."""

import json
import logging
import math

import pytest
import torch
from torch import nn

from lvd.train.checkpoint import CheckpointConfig, CheckpointError, latest_checkpoint, load_checkpoint
from lvd.train.distributed import DistEnv, DistributedConfig
from lvd.train.loop import (
    Aux,
    Hook,
    NonFiniteLossError,
    OptimConfig,
    StepOutput,
    TrainConfig,
    Trainer,
    lr_at,
    prepare_model,
)


class ToyLoader:
    """A stateful endless loader: batch i is a pure function of (seed, i); state is the position."""

    def __init__(self, batch=4, seed=0, nan_at=(), die_at=None):
        self.batch, self.seed, self.pos, self.nan_at, self.die_at = batch, seed, 0, set(nan_at), die_at

    def __iter__(self):
        while True:
            if self.pos == self.die_at:
                raise KeyboardInterrupt(f"simulated kill at batch {self.pos}")
            g = torch.Generator().manual_seed(self.seed * 10_000 + self.pos)
            x = torch.randn(self.batch, 6, generator=g)
            if self.pos in self.nan_at:
                x[0, 0] = float("nan")
            self.pos += 1
            yield {"x": x}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, d):
        self.pos = d["pos"]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.1), nn.SiLU(), nn.Linear(16, 6))

    def forward(self, x):
        return self.net(x)


def toy_loss(model, batch, step, gen):
    x = batch["x"]
    noise = torch.randn(x.shape, generator=gen)  # per-step generator and global RNG (dropout) both used
    recon = model(x + 0.1 * noise)
    loss = (recon - x).square().mean()
    return StepOutput(loss, {"l1": (recon - x).abs().mean()}, ctx={"real": x, "fake": recon.detach()})


def disc_loss(disc, ctx, step, gen):
    if step < 1:  # the GAN term starts after a warm-up step
        return None
    real, fake = disc(ctx["real"]), disc(ctx["fake"])
    return StepOutput(torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())


def run(run_dir, max_steps, *, aux=True, accum=2, nan_at=(), max_nan=3, every=1, hooks=(), die_at=None, keep_last=2,
        resume_from=""):
    torch.manual_seed(0)
    env = DistEnv()
    train = TrainConfig(max_steps=max_steps, seed=7, grad_accum=accum, grad_clip=1.0, ema_decay=0.9,
                        max_nan_steps=max_nan, log_every=1, progress=False)
    model, ema = prepare_model(Toy(), env, DistributedConfig(), train)
    disc = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 1))
    aux_part = Aux("disc", disc, OptimConfig(lr=1e-3), disc_loss) if aux else None

    def loss_fn(model, batch, step, gen):
        out = toy_loss(model, batch, step, gen)
        if aux and step >= 1:
            out.loss = out.loss - 0.01 * disc(out.ctx["fake"] * 0 + model(batch["x"])).mean()
        return out

    trainer = Trainer(run_dir=run_dir, model=model, loss_fn=loss_fn, optim=OptimConfig(lr=1e-2, warmup_steps=2),
                      train=train, checkpoint=CheckpointConfig(every=every, keep_last=keep_last, resume_from=str(resume_from)),
                      env=env, ema=ema,
                      aux=aux_part, config={"toy": True}, count_fn=lambda b: (len(b["x"]), 6 * len(b["x"])),
                      hooks=hooks)
    loader = ToyLoader(nan_at=nan_at, die_at=die_at)
    trainer.fit(loader)
    return trainer, loader


def _state(trainer):
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in trainer.ema.model.state_dict().items()})
    out.update({f"disc.{k}": v for k, v in trainer.aux.model.state_dict().items()})
    for i, s in enumerate(trainer.optimizer.state.values()):
        out.update({f"opt{i}.{k}": v for k, v in s.items()})
    return out


def test_resume_is_bit_exact(tmp_path):
    full, full_loader = run(tmp_path / "full", 5)
    # Interrupted run: killed while fetching step 4's data, then the same command continues.
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", 5, die_at=6)
    assert latest_checkpoint(tmp_path / "cut").name == "step_000003"
    resumed, resumed_loader = run(tmp_path / "cut", 5)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.step == full.step == 5 and resumed_loader.pos == full_loader.pos == 10
    rows_full = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rows_cut = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows_full] == [r["loss"] for r in rows_cut]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    from test_checkpoint import overwrite_middle

    full, _ = run(tmp_path / "full", 5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", 5, die_at=6)  # leaves step_2 and step_3
    overwrite_middle(tmp_path / "cut" / "checkpoints" / "step_000003" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        resumed, _ = run(tmp_path / "cut", 5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "step_000003" in warnings[0] and "model.safetensors" in warnings[0]
    _assert_same_state(_state(full), _state(resumed))  # steps 3..5 redone from step 2 land where the full run did


def test_every_checkpoint_corrupt_stops_before_writing(tmp_path):
    """A fresh start would silently drop the run's progress (and prune its new saves first): an error instead."""
    from test_checkpoint import overwrite_middle

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 5, die_at=6)
    folders = sorted((tmp_path / "checkpoints").iterdir())
    for folder in folders:
        overwrite_middle(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*resume_from") as err:
        run(tmp_path, 5)
    assert "\n" not in str(err.value)
    assert sorted((tmp_path / "checkpoints").iterdir()) == folders


def test_resume_from_an_older_checkpoint(tmp_path, caplog):
    full, _ = run(tmp_path, 4, keep_last=10)
    expected = {k: v.clone() for k, v in _state(full).items()}
    ckpts = tmp_path / "checkpoints"
    with caplog.at_level(logging.INFO):
        resumed, _ = run(tmp_path, 4, keep_last=10, resume_from=ckpts / "step_000002")
    assert any("resumed from" in r.getMessage() and "step_000002" in r.getMessage() for r in caplog.records)
    _assert_same_state(expected, _state(resumed))
    # The old steps 3 and 4 are set aside, not mixed into the new history.
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step_000001", "step_000002", "step_000003", "step_000003.superseded1", "step_000004", "step_000004.superseded1"]


def test_resume_from_a_corrupt_checkpoint_is_an_error_not_a_fallback(tmp_path):
    from test_checkpoint import overwrite_middle

    run(tmp_path, 2, keep_last=10)
    older = tmp_path / "checkpoints" / "step_000001"
    overwrite_middle(older / "model.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint.resume_from=.*step_000001.*model.safetensors") as err:
        run(tmp_path, 4, keep_last=10, resume_from=older)
    assert "\n" not in str(err.value)
    assert latest_checkpoint(tmp_path).name == "step_000002"


def test_run_folder_layout(tmp_path):
    run(tmp_path, 3, hooks=[Hook(2, lambda tr, step: {"eval/x": float(step)})])
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "samples").is_dir()
    assert any((tmp_path / "tensorboard").iterdir())
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "l1", "lr", "grad_norm", "disc_loss", "steps_per_s", "samples_per_s", "tokens_per_s"):
        assert key in rows[-1], key
    assert rows[1]["eval/x"] == 2.0 and rows[2]["eval/x"] == 3.0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] and latest_checkpoint(tmp_path).name == "step_000003"
    trees, rank, _ = load_checkpoint(latest_checkpoint(tmp_path), ["model", "ema", "optimizer", "disc", "disc_optimizer", "trainer"])
    assert trees["trainer"]["step"] == 3 and rank["data"] == {"pos": 6}


def test_nan_loss_is_skipped_and_counted(tmp_path):
    # batches 2 and 3 (= step 1, both micro-batches) hold a NaN: step 1 is skipped, training goes on.
    trainer, _ = run(tmp_path, 4, aux=False, nan_at=(2, 3))
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0.0, 1.0, 0.0, 0.0]
    assert trainer.nan_total == 1 and trainer.nan_in_a_row == 0
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()


def test_stops_after_n_nan_steps_in_a_row(tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        run(tmp_path, 10, aux=False, nan_at=range(2, 100), max_nan=3)


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lr_at(9, cfg, 14), 0.55)  # half-way through the cosine
    assert math.isclose(lr_at(14, cfg, 14), 0.1)


class PairLoader:
    """Endless batches of a fixed global batch (8, 6) split into ``parts`` micro-batches, in order."""

    def __init__(self, parts):
        self.parts, self.pos = parts, 0

    def __iter__(self):
        while True:
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(self.pos // self.parts))
            n = 8 // self.parts
            k = self.pos % self.parts
            self.pos += 1
            yield {"x": x[k * n:(k + 1) * n]}


def test_grad_accumulation_equals_the_large_batch(tmp_path):
    def plain_loss(model, batch, step, gen):
        return StepOutput((model(batch["x"]) - batch["x"]).square().mean())

    finals = []
    for parts in (1, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 6))
        train = TrainConfig(max_steps=3, grad_accum=parts, ema_decay=0.0, progress=False, log_every=1)
        tr = Trainer(run_dir=tmp_path / str(parts), model=model, loss_fn=plain_loss, optim=OptimConfig(lr=1e-2),
                     train=train, checkpoint=CheckpointConfig(every=10), env=DistEnv())
        tr.fit(PairLoader(parts))
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_only_on_cuda(tmp_path):
    tr = Trainer(run_dir=tmp_path, model=Toy(), loss_fn=toy_loss, optim=OptimConfig(), train=TrainConfig(mixed_precision="bf16"),
                 checkpoint=CheckpointConfig(), env=DistEnv())
    with tr.autocast():
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.float32  # on a CPU training stays fp32 (bf16 matmuls run at ~0.3 GFLOP/s here)
