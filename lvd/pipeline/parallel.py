"""Generation across processes for :class:`lvd.pipeline.LVDPipeline`: :meth:`ParallelMixin.enable_parallelism`.

Two parallelisms compose, each over its own dimension of one device mesh ("data", "cfg", "ring", "ulysses"):

- **context parallelism** (``ulysses_degree`` × ``ring_degree`` = C processes, :mod:`lvd.context_parallel`): the
  transformer's tokens are split across the context group and its output is gathered, so every process of the group
  gets the whole prediction (the transformer's ``enable_parallelism``, diffusers' call);
- **CFG parallelism** (``cfg_parallel``, 2 processes): classifier-free guidance's batch ``[uncond; cond]`` of 2B rows
  (:func:`lvd.pipeline.sampling.sample`) is split in two, each process runs its half through the transformer, and
  the halves are all-gathered (:func:`split_batch_denoiser`).

The rest of the pipeline (text encoding, the noise, the scheduler steps, VAE decoding) runs whole on every process,
so every process that is seeded alike returns the same video; the caller writes it once (rank 0). The mesh's "data"
dimension (world / (C · 2 or C) groups) is left to the caller: each group generates on its own, e.g. other prompts.

    torch.distributed.init_process_group("nccl")                 # under torchrun: RANK, WORLD_SIZE, LOCAL_RANK
    pipe = LVDPipeline.from_pretrained(folder).to(f"cuda:{local_rank}")
    pipe.enable_parallelism(ulysses_degree=2, cfg_parallel=True)   # world 4 = 2 (cfg) × 2 (context)
    frames = pipe(prompt, generator=torch.Generator().manual_seed(0)).frames   # the same on every process
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lvd.pipeline.sampling import DenoiseFn, transformer_denoiser
from lvd.text_embeddings import TextEmbeddings

__all__ = ["ParallelMixin", "split_batch_denoiser"]


def split_batch_denoiser(denoise_fn: DenoiseFn, group) -> DenoiseFn:
    """``denoise_fn`` with its batch split across the process ``group`` of n: process i runs rows
    [i·N/n, (i+1)·N/n) and the rows are all-gathered in order, so every process returns the whole prediction. With
    CFG's [uncond; cond] and n = 2, one process runs the unconditional branch and the other the conditional one. A
    batch that does not divide by n (one video without guidance) runs whole on every process."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)

    def denoise(x: torch.Tensor, timestep: torch.Tensor, text: TextEmbeddings, **kwargs) -> torch.Tensor:
        rows = x.shape[0]
        if rows % n:
            return denoise_fn(x, timestep, text, **kwargs)
        part = slice(rank * rows // n, (rank + 1) * rows // n)
        mine = TextEmbeddings(text.states[part], text.mask[part], text.pooled[part])
        out = denoise_fn(x[part], timestep[part], mine, **kwargs).contiguous()
        parts = [torch.empty_like(out) for _ in range(n)]
        dist.all_gather(parts, out, group=group)
        return torch.cat(parts)

    return denoise


class ParallelMixin:
    """``enable_parallelism`` for LVDPipeline; see the module docstring."""

    def enable_parallelism(self, ulysses_degree: int = 1, ring_degree: int = 1, cfg_parallel: bool = False) -> None:
        """Generate across the processes of the default process group (``init_process_group`` first, with the
        pipeline on this process's device): the transformer's tokens across ``ulysses_degree`` × ``ring_degree``
        processes, and with ``cfg_parallel`` guidance's two branches across two such groups. Their product must
        divide the world size (the remaining factor is the mesh's "data" dimension, left to the caller). Every process
        must call it, and then call the pipeline with the same arguments and equally seeded generators. ValueError
        naming every setting that cannot work; RuntimeError without a process group or when called twice."""
        if self.__dict__.get("_parallel_mesh") is not None:
            raise RuntimeError("LVDPipeline.enable_parallelism has already been applied to this pipeline")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("LVDPipeline.enable_parallelism needs torch.distributed initialized first (under "
                               "torchrun: torch.distributed.init_process_group())")
        from torch.distributed.device_mesh import init_device_mesh

        from lvd.context_parallel import ContextParallelConfig

        cfg = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree)
        config = self.transformer.config
        problems = cfg.problems(num_heads=config.num_heads, attention_mode=config.attention_mode)
        cfg_size = 2 if cfg_parallel else 1
        world, size = dist.get_world_size(), cfg.size * cfg_size
        if not problems and world % size:
            problems.append(f"ulysses_degree={ulysses_degree} x ring_degree={ring_degree}"
                            f"{' x 2 (cfg_parallel)' if cfg_parallel else ''} = {size} processes does not divide the "
                            f"world size {world}")
        if problems:
            raise ValueError("LVDPipeline.enable_parallelism: " + "; ".join(problems))
        mesh = init_device_mesh(self.transformer.device.type, (world // size, cfg_size, ring_degree, ulysses_degree),
                                mesh_dim_names=("data", "cfg", "ring", "ulysses"))
        if cfg.enabled:
            from diffusers import ContextParallelConfig as DiffusersContextParallelConfig

            self.transformer.enable_parallelism(config=DiffusersContextParallelConfig(
                ulysses_degree=ulysses_degree, ring_degree=ring_degree, mesh=mesh))
        self.__dict__["_parallel_mesh"] = mesh
        self.__dict__["_cfg_group"] = mesh["cfg"].get_group() if cfg_parallel else None

    @property
    def parallel_mesh(self):
        """The ("data", "cfg", "ring", "ulysses") device mesh of :meth:`enable_parallelism`, or None."""
        return self.__dict__.get("_parallel_mesh")

    def _denoiser(self) -> DenoiseFn:
        """The transformer as the sampling loop's ``denoise_fn``, its batch split across the CFG group if any."""
        denoise = transformer_denoiser(self.transformer)
        group = self.__dict__.get("_cfg_group")
        return denoise if group is None else split_batch_denoiser(denoise, group)
