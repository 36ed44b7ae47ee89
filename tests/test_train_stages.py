"""lvd.train.stages: the end-to-end recipes' stages are skipped when done, timed when run, and a stage's command
leaves its output in its log and stops the recipe, naming the log, when it fails."""

import sys

import pytest

from lvd.train.stages import run_command, run_stage


def test_a_stage_runs_and_is_timed_unless_it_is_done(capsys):
    timings, calls = {}, []
    assert run_stage(timings, "data", False, lambda: calls.append("data"))
    assert not run_stage(timings, "vae", True, lambda: calls.append("vae"))
    assert calls == ["data"] and set(timings) == {"data"} and timings["data"] >= 0
    out = capsys.readouterr().out
    assert "[data] " in out and " start" in out and "[vae] done already, skipped" in out


def test_a_command_logs_its_output_and_threads_and_a_failure_names_the_log(tmp_path, capsys):
    log = tmp_path / "stage.log"
    code = "import os, sys; print('threads', os.environ['OMP_NUM_THREADS']); sys.exit(int(sys.argv[1]))"
    run_command([sys.executable, "-c", code, "0"], log, threads=3, cwd=tmp_path)
    assert "threads 3" in log.read_text() and "$ " in capsys.readouterr().out  # the command is printed
    with pytest.raises(SystemExit, match=f"exit code 5; see {log}"):
        run_command([sys.executable, "-c", code, "5"], log, threads=1)
    assert log.read_text().count("$ ") == 2  # appended: each command line, then its output
