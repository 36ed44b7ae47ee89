"""lvd: text-to-video latent diffusion.

Stage 1 (:mod:`lvd.vae`) compresses clips to latents; stage 2 (:mod:`lvd.dit`) denoises them,
conditioned on text (:mod:`lvd.text`). See README.md for the data flow.
"""

__version__ = "0.1.0"
