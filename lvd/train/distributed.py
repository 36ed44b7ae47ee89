"""torchrun / DDP / FSDP2 set-up, applied from outside to plain models, and rank-0 helpers.

Model code knows nothing of this file. A recipe does::

    env = init_distributed(cfg.distributed)          # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    model = wrap_model(model.to(env.device), env, cfg.distributed)   # DDP, FSDP2 or the model itself
    ...
    if env.is_main: print("only once")

Launch lines (multi-node uses torchrun's own ``--nnodes --node_rank --rdzv_endpoint`` flags)::

    python recipes/train_latent_diffusion.py --config C.yaml                         # one process
    torchrun --standalone --nproc_per_node 8 recipes/train_latent_diffusion.py --config C.yaml

``strategy``: ``auto`` is DDP when torchrun started more than one process, else nothing; ``ddp``
replicates the model (PyTorch DistributedDataParallel); ``fsdp`` shards parameters, gradients and
optimizer state with FSDP2 (``torch.distributed.fsdp.fully_shard``, Zhao et al. 2023) — every
module inside an ``nn.ModuleList`` (the transformer blocks) becomes its own shard unit, then the root.

Context parallelism (``ulysses_degree`` × ``ring_degree`` = C > 1, :mod:`lvd.context_parallel`): C consecutive
ranks share one sample's tokens. :func:`init_distributed` builds the (data, ring, ulysses) mesh, and
``lvd.train.loop.prepare_model`` applies the model's ``_cp_plan`` before wrapping. DDP and FSDP2 still run over
the whole world (context ranks hold the same parameters; FSDP2 shards over data × context as torchtitan does):
every rank of a context group computes the same loss from the gathered output and its backward yields its own
tokens' share of the gradient, so the trainer scales the loss by C and the world average becomes the average over
data groups of each group's sum. The loader and the objective's random draws follow the data rank
(:attr:`DistEnv.data_rank`), so the ranks of a context group see the same samples and the same noise.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedConfig",
    "DistEnv",
    "DistributedError",
    "init_distributed",
    "wrap_model",
    "unwrap",
    "no_sync",
    "barrier",
    "all_reduce_mean",
    "any_true",
    "model_state_dict",
    "load_model_state_dict",
    "optimizer_state_dict",
    "load_optimizer_state_dict",
    "shutdown",
]


@dataclass
class DistributedConfig:
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    fsdp_reshard_after_forward: bool = True  # ZeRO-3 (True) or ZeRO-2-like (False) for the block units
    timeout_minutes: int = 30
    # context parallelism (diffusers' names): one sample's tokens split over ulysses_degree x ring_degree ranks
    ulysses_degree: int = 1
    ring_degree: int = 1

    def context(self):
        """The :class:`lvd.context_parallel.ContextParallelConfig` of these degrees."""
        from lvd.context_parallel import ContextParallelConfig

        return ContextParallelConfig(ulysses_degree=self.ulysses_degree, ring_degree=self.ring_degree)

    def context_problems(self, world_size: int, *, num_heads: int | None = None, tokens=(),
                         attention_mode: str = "full") -> list[str]:
        """One line per context-parallel setting that cannot work (nothing when the context size is 1):
        :meth:`ContextParallelConfig.problems`, plus ``strategy=none`` (the context group's gradients need the
        DDP / FSDP2 reduction)."""
        cp = self.context()
        problems = cp.problems(world_size, num_heads=num_heads, tokens=tokens, attention_mode=attention_mode)
        if self.strategy == "none" and cp.enabled:
            problems.append(f"distributed.strategy=none with context parallelism (ulysses_degree x ring_degree = "
                            f"{cp.size}): the context group's gradients are summed by DDP or FSDP2; set "
                            "distributed.strategy to auto, ddp or fsdp")
        return problems


class DistributedError(RuntimeError):
    """A launch that does not fit the config (e.g. FSDP asked for without torchrun)."""


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    strategy: str = "none"
    mesh: Any = None  # the (data, ring, ulysses) DeviceMesh under context parallelism, else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def context_size(self) -> int:
        """Ranks that share one sample's tokens (1 without context parallelism)."""
        return 1 if self.mesh is None else self.mesh["ring"].size() * self.mesh["ulysses"].size()

    @property
    def data_rank(self) -> int:
        """Which data shard this rank trains on: the mesh's "data" index (the rank itself without context
        parallelism). The loader shards and the step generator is seeded by it."""
        return self.rank if self.mesh is None else self.mesh["data"].get_local_rank()

    @property
    def data_world_size(self) -> int:
        """How many different shards the world trains on at once: world / context size."""
        return self.world_size // self.context_size

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _torchrun_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when started by torchrun (or any launcher setting the same vars)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, int(os.environ.get("LOCAL_RANK", rank)), world


def init_distributed(cfg: DistributedConfig) -> DistEnv:
    """Pick the device, join the process group when under torchrun, resolve ``strategy`` and, with context
    parallelism, build the (data, ring, ulysses) mesh (:func:`lvd.context_parallel.context_mesh`).

    Raises :class:`DistributedError` when ``strategy`` is ddp/fsdp or the context size is > 1 but no launcher set
    RANK/WORLD_SIZE, and when the context-parallel settings do not fit the world (:meth:`DistributedConfig.
    context_problems`; recipes check these before building anything).
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DistributedError("distributed.device=cuda but torch sees no CUDA device")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    launched = _torchrun_env()
    context = cfg.context()
    if launched is None:
        if context.enabled:
            raise DistributedError(
                f"distributed.ulysses_degree x ring_degree = {context.size} needs torchrun with a world size it "
                f"divides: `torchrun --standalone --nproc_per_node {context.size} <recipe> ...`"
            )
        if cfg.strategy in ("ddp", "fsdp"):
            raise DistributedError(
                f"distributed.strategy={cfg.strategy} needs torchrun (RANK and WORLD_SIZE are not set). "
                f"Launch with `torchrun --standalone --nproc_per_node N <recipe> ...`, or set distributed.strategy=none"
            )
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistEnv(device=device, strategy="none")

    rank, local_rank, world = launched
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(minutes=cfg.timeout_minutes), **kwargs)
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    mesh = None
    if context.enabled:
        problems = cfg.context_problems(world)
        if problems:
            raise DistributedError("; ".join(problems))
        from lvd.context_parallel import context_mesh

        mesh = context_mesh(context, device.type)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device, strategy=strategy, mesh=mesh)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, cfg: DistributedConfig | None = None, *, strategy: str | None = None) -> nn.Module:
    """Apply the resolved strategy to a plain model already on ``env.device``; returns what to call.

    ``strategy`` overrides ``env.strategy`` (a small discriminator is replicated even when the main
    model is sharded). ``none`` returns the model unchanged; FSDP2 shards in place and returns it.
    """
    strategy = strategy or env.strategy
    if strategy == "none" or not env.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        reshard = True if cfg is None else cfg.fsdp_reshard_after_forward
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        return model
    raise DistributedError(f"unknown distributed strategy '{strategy}' (expected none, ddp or fsdp)")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / ``torch.compile`` wrappers (FSDP2 shards in place: itself)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def no_sync(model: nn.Module, skip_sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for gradient-accumulation micro-steps that are not the last."""
    if not skip_sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ---------------------------------------------------------------------------------------------
# Collectives that degrade to no-ops in one process
# ---------------------------------------------------------------------------------------------


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); the tensor itself in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank (so all ranks skip a NaN step together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ---------------------------------------------------------------------------------------------
# Full (unsharded) state dicts for checkpoints, the same code for plain, DDP and FSDP2 models
# ---------------------------------------------------------------------------------------------


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def _sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict on CPU with plain parameter names (on rank 0; under FSDP2 other ranks get {})."""
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, partial: bool = False) -> None:
    """Load a full state dict (every rank passes the same one) into a plain, DDP or FSDP2 model.

    ``partial``: ``state`` holds only some of the model's tensors (say, a LoRA run's trainable ones); the rest are
    kept. Unexpected keys are an error either way."""
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_options(full_state_dict=True, strict=not partial))
        return
    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    missing = [] if partial else missing
    if missing or unexpected:
        raise KeyError(f"state dict does not fit {type(unwrap(model)).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name (so it survives re-wrapping and re-sharding)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = _sharded(model)
    return get_optimizer_state_dict(unwrap(model) if not full else model, optimizer,
                                    options=_options(full_state_dict=full, cpu_offload=full))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    full = _sharded(model)
    set_optimizer_state_dict(unwrap(model) if not full else model, optimizer, state,
                             options=_options(full_state_dict=full))
