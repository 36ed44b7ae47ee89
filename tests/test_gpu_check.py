"""benchmarks/gpu_check.py's recipe part, at its dry-run size on the CPU: the stage-2 recipe trains 4 steps, the same
command trains on to 8, and the check reads from the trainer's own log that the second run resumed at step 4."""

from argparse import Namespace

from benchmarks.gpu_check import part_recipe, resumed_step


def test_recipe_part_reads_the_resumed_step_from_the_trainers_log(tmp_path):
    work = tmp_path / "run folder"  # a space in the path, as a user's run folder may have
    result = part_recipe(Namespace(dry_run=True), work=work)
    first, second = result["runs"]
    assert first["rc"] == second["rc"] == 0, first["log_tail"] + second["log_tail"]
    assert first["resumed_at"] is None and second["resumed_at"] == 4
    assert result["ok"] and result["resumed"]
    assert [step for step, _ in result["losses"]] == [4, 8]


def test_resumed_step_is_the_last_resume_lines_step():
    line = "2026-01-01 00:00:00,000 lvd.train: resumed from /runs/a b/checkpoints/step_000100 (step 100)"
    assert resumed_step(f"train:  50%|█████ | 100/200 [00:00<?, ?it/s]{line}\nmore\n") == 100
    assert resumed_step("lvd.train.checkpoint: resumed from step 100: newer checkpoints set aside") is None
    assert resumed_step("train: 100%|██████████| 8/8\n") is None
