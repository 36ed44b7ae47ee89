"""lvd: text-to-video latent diffusion.

Stage 1 (:mod:`lvd.vae`) compresses clips to latents; stage 2 (:mod:`lvd.dit`) denoises them,
conditioned on text (:mod:`lvd.text`); :mod:`lvd.pipeline` generates. ``from lvd import LVDPipeline``
loads the pipeline (and diffusers) on first use, so ``import lvd.kernels`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["LVDPipeline", "__version__"]


def __getattr__(name: str):
    if name == "LVDPipeline":
        from lvd.pipeline import LVDPipeline

        return LVDPipeline
    raise AttributeError(f"module 'lvd' has no attribute {name!r}")
