"""Generation: :class:`LVDPipeline` (a diffusers ``DiffusionPipeline``) and what serves it.

- :mod:`lvd.pipeline.pipeline`: :class:`LVDPipeline`, prompt → video (``from_pretrained``, ``__call__``, ``extend``);
- :mod:`lvd.pipeline.sampling`: :func:`sample`, the one denoising loop (every sampler, batched CFG, clean prefix);
- :mod:`lvd.pipeline.clean_frames`: image-to-video and continuation (given first frames → clean latent frames);
- :mod:`lvd.pipeline.checks`: the pipeline's input checks, shared with ``python -m lvd.generate``;
- :mod:`lvd.pipeline.output`: :class:`LVDPipelineOutput` and :class:`PromptEmbeds`, what it returns;
- :mod:`lvd.pipeline.assembly`: a pipeline from trained components, and :func:`export_pipeline` to a folder;
- :mod:`lvd.pipeline.lora`: diffusers' pipeline LoRA API (``load_lora_weights``, ``fuse_lora``, …);
- :mod:`lvd.pipeline.parallel`: generation across processes (context and CFG parallelism, ``enable_parallelism``).
"""

from lvd.pipeline.assembly import export_pipeline
from lvd.pipeline.output import LVDPipelineOutput, PromptEmbeds
from lvd.pipeline.pipeline import LVDPipeline

__all__ = ["LVDPipeline", "LVDPipelineOutput", "PromptEmbeds", "export_pipeline"]
