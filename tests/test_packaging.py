"""Packaging: lvd owns only the `lvd` import name, so it lives beside Hugging Face's `kernels` package.

transformers >= 5.25 requires HF's `kernels` (`from kernels import CUDAProperties` when a model loads).
A top-level package of ours by that name shadowed it from the repo root and would have merged into
the same `site-packages/kernels/` folder when installed. These tests fail if that comes back.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter started in ``cwd`` (PYTHONPATH not set: imports resolve as a user's would)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _is_installed_package(origin: str) -> bool:
    """``origin`` is a module file under site-packages (an installed distribution), not a folder of this checkout."""
    path = Path(origin).resolve()
    return "site-packages" in path.parts and (REPO / "kernels") not in path.parents


def test_packages_import_without_gpu():
    import lvd
    from lvd import kernels

    assert callable(kernels.attention) and callable(kernels.group_norm)
    assert lvd.__version__


def test_no_top_level_kernels_package_of_ours():
    assert not (REPO / "kernels").exists(), "a top-level kernels/ folder shadows Hugging Face's `kernels`"
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # HF's package (transformers >= 5.25 requires it): it must not be a folder of ours
        assert _is_installed_package(spec.origin), spec.origin


def test_lvd_kernels_imports_neither_diffusers_nor_transformers_nor_other_lvd_modules():
    code = (
        "import sys\n"
        "import lvd.kernels\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers'))\n"
        "ours = sorted(m for m in sys.modules if m.startswith('lvd.') and not m.startswith('lvd.kernels'))\n"
        "print(heavy, ours)\n"
    )
    result = _run(code, REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels is not installed")
@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_huggingface_kernels_transformers_diffusers_and_lvd_load_together(tmp_path, where):
    """With HF's `kernels` installed, a tiny CLIP text model and an lvd pipeline load from the repo root and from
    another folder, and `kernels` is HF's package there."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from test_pipeline import tiny_components
    finally:
        sys.path.pop(0)
    from lvd.pipeline import LVDPipeline

    folder = tmp_path / "pipe"
    LVDPipeline(**tiny_components()).save_pretrained(folder)
    code = (
        "import kernels, transformers, diffusers, lvd.kernels, json\n"
        "from kernels import CUDAProperties\n"  # what transformers 5.25 imports when it loads a model
        "from lvd.pipeline import LVDPipeline\n"
        f"pipe = LVDPipeline.from_pretrained({str(folder)!r})\n"
        f"clip = transformers.CLIPTextModel.from_pretrained({str(folder / 'text_encoder')!r})\n"
        "print(json.dumps({'kernels': kernels.__file__, 'text': type(pipe.text_encoder).__name__,"
        " 'clip': type(clip).__name__}))\n"
    )
    result = _run(code, REPO if where == "repo_root" else tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["clip"] == "CLIPTextModel" and seen["text"] == "CLIPTextModel"
    assert _is_installed_package(seen["kernels"]), seen["kernels"]


def test_wheel_holds_only_the_lvd_package(tmp_path):
    """A non-editable install puts nothing of ours under site-packages/kernels/ (nor any other top-level name)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)],
        capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and re.search(r"No module named '(setuptools|wheel)'", result.stderr):
        pytest.skip(f"cannot build a wheel here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("lvd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"lvd", *{n.split("/")[0] for n in names if ".dist-info/" in n}}
    assert "lvd/kernels/attention.py" in names
    # data files a non-editable install needs: the attention table `auto` reads and the bundled demo model
    assert "lvd/kernels/attention_table.json" in names
    assert "lvd/assets/shapes-demo/model_index.json" in names
    assert not any(n.startswith("kernels/") for n in names)
