"""Test-wide settings. These run before any test module imports lvd or kernels."""

import logging
import os

# Read when a @triton.jit kernel is decorated, so it must be set before kernels/ is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing is downloaded in tests: tiny models are built and saved to temp folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
logging.getLogger("xformers").setLevel(logging.ERROR)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
