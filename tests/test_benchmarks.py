"""The benchmarks package: every benchmark is a module run from the repository root as ``python -m benchmarks.X``,
recipes and benchmarks import only the library (no path edits, no recipe imported by another script), and a
result starts with the shared header."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = ("__init__", "report", "timing")  # the package and the pieces its benchmarks share
BENCHMARKS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in SHARED)
SCRIPTS = sorted([*(REPO / "recipes").glob("*.py"), *(REPO / "benchmarks").glob("*.py")])


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_is_a_module_of_the_package_with_a_main(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)
    assert f"python -m benchmarks.{name}" in module.__doc__, "its usage lines name the module"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_and_benchmarks_import_the_library_only(path):
    source = path.read_text(encoding="utf-8")
    assert "sys.path" not in source
    assert not re.search(r"^\s*(from|import) recipes\b", source, re.MULTILINE), "imports a recipe"
    if path.parent.name == "recipes":
        assert not re.search(r"^\s*(from|import) benchmarks\b", source, re.MULTILINE), "imports a benchmark"


def test_a_benchmark_runs_from_the_repository_root_and_writes_the_header(tmp_path):
    out = tmp_path / "result.json"
    args = ["--grid", "1x2x2", "--heads", "1", "--head-dim", "8", "--repeats", "1", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user runs it
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_rms_norm_rope", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"benchmark", "date", "command", "machine", "threads", "torch", "python", "load_average"} <= set(result)
    assert result["benchmark"] == "bench_rms_norm_rope" and result["threads"] == 1
    assert result["command"] == "python -m benchmarks.bench_rms_norm_rope " + " ".join(args)
    assert result["machine"]["cores"] == os.cpu_count() and len(result["load_average"]) == 3
    assert [r["impl"] for r in result["rows"]] == ["fused", "fused", "reference", "reference"]
    assert f"wrote {out}" in proc.stdout
