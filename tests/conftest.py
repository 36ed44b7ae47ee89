"""Test-wide settings. These run before any test module imports lvd."""

import logging
import os

# Read when a @triton.jit kernel is decorated, so it must be set before lvd.kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing is downloaded in tests: tiny models are built and saved to temp folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
logging.getLogger("xformers").setLevel(logging.ERROR)

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: test models are tiny, and tests that spawn torchrun workers would oversubscribe the
# 2 cores (43 pipeline tests took 45-70 s with 2 threads on a busy machine, 14 s with 1).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_threads():
    """lvd.generate's --threads sets torch's global thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny pipeline folder (random weights, CLIP text encoder) for the CLI tests; built once per session."""
    from test_pipeline import tiny_components

    from lvd.pipeline import LVDPipeline

    folder = tmp_path_factory.mktemp("tiny_model")
    LVDPipeline(**tiny_components()).save_pretrained(folder)
    return folder
