"""Resume checkpoints: round trips without pickle, atomic saves, clear errors on bad folders."""

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from lvd.train import checkpoint as ckpt
from lvd.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_tree,
    resume_from_problem,
    rng_state,
    save_checkpoint,
    save_tree,
    select_checkpoint,
    set_rng_state,
    verify_checkpoint,
)


def _model_and_opt():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    for _ in range(3):
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_optimizer_state_round_trip_is_exact(tmp_path):
    model, opt, sched = _model_and_opt()
    save_tree(tmp_path, "optimizer", opt.state_dict())
    save_tree(tmp_path, "scheduler", sched.state_dict())
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))

    model2, opt2, sched2 = _model_and_opt()
    opt2.load_state_dict(load_tree(tmp_path, "optimizer"))
    sched2.load_state_dict(load_tree(tmp_path, "scheduler"))
    model2.load_state_dict(model.state_dict())
    # One more identical step on both: the parameters stay bit-equal.
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert sched2.state_dict() == sched.state_dict()


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_tree(tmp_path, "rng", rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_tree(tmp_path, "rng"))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_keep_last_and_latest(tmp_path):
    model, opt, _ = _model_and_opt()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"model": model.state_dict()}, keep_last=2, config={"a": 1})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert latest_checkpoint(tmp_path).name == "step_000040"
    assert latest_checkpoint(tmp_path / "nothing") is None
    trees, _, meta = load_checkpoint(latest_checkpoint(tmp_path), ["model"])
    assert meta["step"] == 40 and (latest_checkpoint(tmp_path) / "config.yaml").is_file()
    for k, v in model.state_dict().items():
        assert torch.equal(trees["model"][k], v)


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    model, _, _ = _model_and_opt()
    save_checkpoint(tmp_path, 1, {"model": model.state_dict()})

    calls = {"n": 0}
    real = ckpt.save_tree

    def dying_save_tree(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill mid-save")
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_tree", dying_save_tree)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"model": model.state_dict(), "ema": model.state_dict()})
    monkeypatch.setattr(ckpt, "save_tree", real)

    assert (tmp_path / "checkpoints" / "step_000002.tmp").is_dir()  # the partial save is left behind...
    assert latest_checkpoint(tmp_path).name == "step_000001"  # ...and never mistaken for a checkpoint
    load_checkpoint(latest_checkpoint(tmp_path), ["model"])
    save_checkpoint(tmp_path, 3, {"model": model.state_dict()})  # the next save removes the stale .tmp
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_kill_9_during_saves_never_damages_the_last_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch, sys
        sys.path.insert(0, {os.getcwd()!r})
        from lvd.train.checkpoint import save_checkpoint
        sd = {{f"w{{i}}": torch.randn(256, 256) for i in range(24)}}   # ~6 MB a save
        step = 0
        while True:
            step += 1
            save_checkpoint({str(tmp_path)!r}, step, {{"model": sd, "ema": sd}}, keep_last=2)
            print(step, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # wait for a few complete saves, then kill at an arbitrary moment
            proc.stdout.readline()
        time.sleep(0.037)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    last = latest_checkpoint(tmp_path)
    assert last is not None
    trees, _, meta = load_checkpoint(last, ["model", "ema"])
    assert len(trees["model"]) == 24 and meta["step"] >= 3


def test_missing_and_corrupt_checkpoints_name_the_file(tmp_path):
    model, opt, _ = _model_and_opt()
    step_dir = save_checkpoint(tmp_path, 5, {"model": model.state_dict(), "optimizer": opt.state_dict()})

    with pytest.raises(CheckpointError, match="step_000099"):
        load_checkpoint(tmp_path / "checkpoints" / "step_000099", ["model"])
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        load_checkpoint(step_dir, ["ema"])

    # Truncate the model file: the size check names it.
    f = step_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(step_dir, ["model"])
    # Garbage of the right size is caught by safetensors and still named.
    meta = json.loads((step_dir / "meta.json").read_text())
    f.write_bytes(b"\x00" * meta["files"]["model.safetensors"])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(step_dir, ["model"])
    (step_dir / "optimizer.json").unlink()
    with pytest.raises(CheckpointError, match="optimizer.json"):
        load_checkpoint(step_dir, ["optimizer"])
    (step_dir / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(step_dir, ["model"])


def test_refuses_objects_that_would_need_pickle(tmp_path):
    with pytest.raises(CheckpointError, match="pickle"):
        save_tree(tmp_path, "bad", {"fn": object()})


# ----------------------------------------------------------------------------------------------
# Verification: SHA-256 of every file in meta.json
# ----------------------------------------------------------------------------------------------


def overwrite_middle(path, n=4096):
    """Overwrite ``n`` bytes in the middle of a file with different bytes: same size, same header."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    n = min(n, len(data) // 4)
    data[mid:mid + n] = bytes((b + 1) % 256 for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _big_state():
    return {"w": torch.randn(64, 64), "b": torch.randn(64)}  # ~16 KiB: room for a 4 KiB hole in the tensor data


def test_meta_records_the_sha256_of_every_file(tmp_path):
    step_dir = save_checkpoint(tmp_path, 1, {"model": _big_state(), "trainer": {"step": 1}},
                               rank_tree={"rng": rng_state()}, config={"a": 1})
    meta = json.loads((step_dir / "meta.json").read_text())
    files = sorted(p.name for p in step_dir.iterdir() if p.name != "meta.json")
    assert sorted(meta["sha256"]) == sorted(meta["files"]) == files
    for name in files:
        assert meta["sha256"][name] == hashlib.sha256((step_dir / name).read_bytes()).hexdigest(), name
    assert verify_checkpoint(step_dir)["verified"] is True


def test_same_size_corruption_is_caught_and_named(tmp_path):
    state = _big_state()
    step_dir = save_checkpoint(tmp_path, 1, {"model": state})
    overwrite_middle(step_dir / "model.safetensors")
    assert load_tree(step_dir, "model").keys() == state.keys()  # safetensors itself reads it without complaint
    with pytest.raises(CheckpointError, match="model.safetensors.*SHA-256"):
        verify_checkpoint(step_dir)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(step_dir, ["model"])


@pytest.mark.parametrize("damage", ["hash", "missing", "meta"])
def test_select_skips_a_broken_newest_checkpoint_with_one_warning(tmp_path, caplog, damage):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": _big_state(), "optimizer": {"lr": 0.1}}, keep_last=10)
    newest = tmp_path / "checkpoints" / "step_000003"
    broken = {"hash": "model.safetensors", "missing": "optimizer.json", "meta": "meta.json"}[damage]
    if damage == "hash":
        overwrite_middle(newest / broken)
    elif damage == "missing":
        (newest / broken).unlink()
    else:
        (newest / broken).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="lvd.train.checkpoint"):
        step_dir, meta = select_checkpoint(tmp_path)
    assert step_dir.name == "step_000002" and meta["step"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert str(newest) in warnings[0] and broken in warnings[0]


def test_select_when_every_checkpoint_is_broken_is_an_error(tmp_path):
    for step in (1, 2):
        overwrite_middle(save_checkpoint(tmp_path, step, {"model": _big_state()}) / "model.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*all 2 failed verification") as err:
        select_checkpoint(tmp_path)
    assert "\n" not in str(err.value)
    assert select_checkpoint(tmp_path / "fresh") is None  # no checkpoint at all: a fresh start


def test_resume_from_names_the_folder_and_never_falls_back(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"model": _big_state()})
    older = tmp_path / "checkpoints" / "step_000001"
    assert select_checkpoint(tmp_path, older)[0] == older  # an older one than the newest, by choice
    overwrite_middle(older / "model.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint.resume_from=.*step_000001.*model.safetensors") as err:
        select_checkpoint(tmp_path, older)
    assert "\n" not in str(err.value)
    assert "no such folder" in resume_from_problem(tmp_path / "nope")
    assert "no meta.json" in resume_from_problem(tmp_path)
    assert resume_from_problem(older) is None


def test_checkpoint_without_hashes_loads_unverified(tmp_path, caplog):
    state = _big_state()
    step_dir = save_checkpoint(tmp_path, 1, {"model": state})
    meta = json.loads((step_dir / "meta.json").read_text())
    del meta["sha256"]  # what a save before hashes were recorded wrote
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="lvd.train.checkpoint"):
        trees, _, meta = load_checkpoint(select_checkpoint(tmp_path)[0], ["model"])
    assert meta["verified"] is False and torch.equal(trees["model"]["w"], state["w"])
    notes = [r for r in caplog.records if "unverified" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    (step_dir / "model.safetensors").write_bytes(b"")  # sizes are still checked
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_checkpoint(step_dir)
