"""Context parallelism for :class:`lvd.dit.VideoDiT`: one sample's token sequence split across processes.

A long video is more tokens than one GPU holds (1024² × 10 s is ~250k tokens with 1×2×2 patches). The context group
of C = ``ulysses_degree`` × ``ring_degree`` processes holds one sample; each process keeps N / C of its tokens through
every block, and only attention needs the whole sequence:

- **Ulysses** (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv:2309.14509): an all-to-all turns q/k/v from
  sequence-sharded (B, H, N/U, Dh) into head-sharded (B, H/U, N, Dh), attention runs on whole sequences for H/U heads,
  and the inverse all-to-all brings the output back. Two exchanges per block; needs H divisible by U. Works for full
  and factorized attention (each process then holds every frame for its heads).
- **Ring** (Liu et al. 2023, arXiv:2310.01889): each process attends its queries to every process's K/V block and the
  partial results merge exactly by their log-sum-exp, ``o = Σ_b exp(lse_b − lse) o_b``, ``lse = logsumexp_b lse_b``;
  no head constraint. Here the K/V blocks are gathered once per block (an all-gather, as Llama 3's context
  parallelism does) and attended one block at a time; full attention only.

Both compose (Ulysses inside, ring outside: context rank = ring rank · U + Ulysses rank). Text stays replicated:
cross-attention needs no exchange, and ``text_attention="concat"`` keys are split by heads with the rest (Ulysses)
or attended as one more block (ring).

The model declares where its sequence may be split (``VideoDiT._cp_plan``); :func:`parallelize_context` applies that
plan from outside with hooks, so the model's code, its checkpoints and exports never depend on the parallelism.

Gradients: the sequence split's backward keeps each process's slice, the output gather's backward hands each
process the gradient of its own tokens, so a loss computed identically on every process of a context group gives each
process the gradient contributions of its tokens; their sum over the context group (:func:`reduce_context_gradients`)
is the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lvd import kernels

__all__ = ["ContextParallelConfig", "context_mesh", "context_rank", "enable_diffusers_parallelism", "parallelize_context",
           "reduce_context_gradients"]


@dataclass
class ContextParallelConfig:
    """How many processes share one sample's tokens (diffusers' names): ``ulysses_degree`` × ``ring_degree``."""

    ulysses_degree: int = 1
    ring_degree: int = 1

    @property
    def size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def problems(self, world_size: int | None = None, *, num_heads: int | None = None, tokens=(),
                 attention_mode: str = "full") -> list[str]:
        """One line per setting that cannot work: degrees < 1, a context size that does not divide the world, heads
        not divisible by the Ulysses degree, ring with factorized attention, token counts not divisible by the
        context size (``tokens``: the counts the run will see, e.g. one per bucket)."""
        u, r = self.ulysses_degree, self.ring_degree
        problems = [f"distributed.{name}={value!r} must be an integer >= 1"
                    for name, value in (("ulysses_degree", u), ("ring_degree", r))
                    if not isinstance(value, int) or value < 1]
        if problems:
            return problems
        if world_size is not None and world_size % self.size:
            problems.append(f"distributed.ulysses_degree={u} x ring_degree={r} = {self.size} does not divide the "
                            f"world size {world_size}")
        if num_heads is not None and num_heads % u:
            problems.append(f"distributed.ulysses_degree={u} does not divide the model's num_heads={num_heads}")
        if r > 1 and attention_mode != "full":
            problems.append(f"distributed.ring_degree={r} needs attention_mode='full' (got {attention_mode!r}); "
                            "factorized attention splits by heads only: use ulysses_degree")
        bad = sorted({n for n in tokens if n % self.size})
        if bad:
            problems.append(f"token counts {bad} are not divisible by the context size {self.size} "
                            f"(ulysses_degree x ring_degree); choose buckets whose T'·H'·W'/patch divides by it")
        return problems


def context_mesh(cfg: ContextParallelConfig, device_type: str = "cuda") -> DeviceMesh:
    """The (data, ring, ulysses) device mesh over the default process group: data = world / (U · R). Ranks of one
    context group are consecutive, Ulysses innermost (neighbouring GPUs exchange the most)."""
    world = dist.get_world_size()
    problems = cfg.problems(world)
    if problems:
        raise ValueError("; ".join(problems))
    return init_device_mesh(device_type, (world // cfg.size, cfg.ring_degree, cfg.ulysses_degree),
                            mesh_dim_names=("data", "ring", "ulysses"))


def context_rank(mesh: DeviceMesh) -> tuple[int, int]:
    """(this process's index in its context group, the context size): which N / C slice of the tokens it holds."""
    u, r = mesh["ulysses"], mesh["ring"]
    return r.get_local_rank() * u.size() + u.get_local_rank(), r.size() * u.size()


# --------------------------------------------------------------------------------------------------
# Collectives with autograd


class _AllToAll(torch.autograd.Function):
    """Split ``x`` into ``group``'s size along ``scatter_dim``, send chunk j to rank j and concatenate what arrives
    along ``gather_dim`` (in rank order). Its backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), ctx.group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = dist.get_world_size(group)
    sends = [c.contiguous() for c in x.chunk(n, dim=scatter_dim)]
    received = [torch.empty_like(c) for c in sends]
    dist.all_to_all(received, sends, group=group)
    return torch.cat(received, dim=gather_dim)


class _Gather(torch.autograd.Function):
    """All-gather along ``dim`` in rank order. Backward: this rank's slice of the gradient (``reduce=False``: every
    rank computes the same loss from the gathered tensor), or the sum over ranks of each one's gradient for this
    rank's slice (``reduce=True``: the gathered tensor feeds rank-local computations, e.g. K/V of ring attention)."""

    @staticmethod
    def forward(ctx, x, group, dim: int, reduce: bool):
        ctx.group, ctx.dim, ctx.reduce = group, dim, reduce
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.reduce:  # gloo has no reduce_scatter: all-reduce, then keep this rank's slice
            dist.all_reduce(grad, group=ctx.group)
        rank, n = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(n, dim=ctx.dim)[rank], None, None, None


def _gather(x: torch.Tensor, mesh: DeviceMesh, dim: int) -> torch.Tensor:
    """The whole context group's tokens along ``dim``, in context-rank order (Ulysses ranks, then ring ranks)."""
    for name in ("ulysses", "ring"):
        if mesh[name].size() > 1:
            x = _Gather.apply(x, mesh[name].get_group(), dim, False)
    return x


# --------------------------------------------------------------------------------------------------
# Attention across the context group


class ContextParallelAttention:
    """Wraps a self-attention core ``core(q, k, v, grid, mode, text)`` (q/k/v (B, H, N/C, Dh), this process's
    tokens) so that it attends over the whole sequence: Ulysses all-to-all around it, and ring blocks inside."""

    def __init__(self, core, mesh: DeviceMesh):
        self.core, self.mesh = core, mesh
        self.ulysses, self.ring = mesh["ulysses"], mesh["ring"]

    def __deepcopy__(self, memo):  # an EMA copy of the model shares the process groups, not copies of them
        return self

    def __call__(self, q, k, v, grid, mode: str, text=None) -> torch.Tensor:
        u = self.ulysses.size()
        if u > 1:  # (B, H, N/C, Dh) -> (B, H/U, N/R, Dh): whole ring chunks for H/U heads
            group = self.ulysses.get_group()
            q, k, v = (_AllToAll.apply(z, group, 1, 2) for z in (q, k, v))
            if text is not None:
                heads = q.shape[1]
                first = self.ulysses.get_local_rank() * heads
                text = (text[0][:, :, first:first + heads], text[1][:, :, first:first + heads], text[2])
        out = self._ring(q, k, v, text) if self.ring.size() > 1 else self.core(q, k, v, grid, mode, text)
        if u > 1:
            out = _AllToAll.apply(out, self.ulysses.get_group(), 2, 1)  # back to (B, H, N/C, Dh)
        return out

    def _ring(self, q, k, v, text) -> torch.Tensor:
        """Full attention of this process's queries to every ring process's K/V block (and the text keys), merged
        by log-sum-exp."""
        group, n = self.ring.get_group(), self.ring.size()
        k_all, v_all = (_Gather.apply(z, group, 2, True) for z in (k, v))  # (B, H', N/R · R, Dh)
        blocks = [(kb, vb, None) for kb, vb in zip(k_all.chunk(n, dim=2), v_all.chunk(n, dim=2))]
        if text is not None:
            blocks.append((text[0].transpose(1, 2), text[1].transpose(1, 2), text[2]))  # (B, H', L, Dh)
        outs, lses = zip(*(kernels.attention(q, kb, vb, mask=mb, return_lse=True) for kb, vb, mb in blocks))
        lse = torch.logsumexp(torch.stack(lses), dim=0)  # (B, H', Nq)
        out = sum(o.float() * torch.exp(l - lse)[..., None] for o, l in zip(outs, lses))
        return out.to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Applying a model's plan


def _modules(model: torch.nn.Module, pattern: str) -> list[torch.nn.Module]:
    """The submodules a plan entry names: a dotted path, where "*" stands for every child of a ModuleList."""
    found = [model]
    for part in pattern.split("."):
        found = [child for m in found for child in (list(m.children()) if part == "*" else [getattr(m, part)])]
    return found


def parallelize_context(model: torch.nn.Module, mesh: DeviceMesh) -> list:
    """Apply ``model._cp_plan`` over ``mesh``'s ring and Ulysses dimensions: split the named inputs, wrap the
    attention cores, gather the named outputs. Returns the hook handles (``handle.remove()`` undoes the hooks)."""
    plan = getattr(type(model), "_cp_plan", None)
    if plan is None:
        raise ValueError(f"{type(model).__name__} declares no _cp_plan: it cannot run context-parallel")
    index, size = context_rank(mesh)
    handles = []

    def splitter(where: str, args_dims: dict[int, int]):
        def hook(module, args):
            args = list(args)
            for i, dim in args_dims.items():
                n = args[i].shape[dim]
                if n % size:
                    raise ValueError(f"context parallelism: {where} has {n} tokens, not divisible by the context "
                                     f"size {size}")
                args[i] = args[i].narrow(dim, index * (n // size), n // size)
            return tuple(args)
        return hook

    for where, args_dims in plan["split_inputs"].items():
        for module in _modules(model, where):
            handles.append(module.register_forward_pre_hook(splitter(where, args_dims)))
    for attention in _modules(model, plan["attention"]):
        attention.core = ContextParallelAttention(attention.core, mesh)
    for where, dim in plan["gather_output"].items():
        for module in _modules(model, where):
            handles.append(module.register_forward_hook(lambda m, args, out, dim=dim: _gather(out, mesh, dim)))
    return handles


def reduce_context_gradients(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """Sum every parameter's gradient over the context group: each process holds its tokens' contributions."""
    for name in ("ulysses", "ring"):
        if mesh[name].size() > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=mesh[name].get_group())


# --------------------------------------------------------------------------------------------------
# diffusers' call: ModelMixin.enable_parallelism(config=diffusers.ContextParallelConfig(...))


def enable_diffusers_parallelism(model: torch.nn.Module, config, cp_plan=None) -> list:
    """What ``VideoDiT.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=2))`` runs: the
    diffusers config's ``ulysses_degree``, ``ring_degree`` and optional ``mesh`` (with "ring" and "ulysses"
    dimensions of those sizes) applied by :func:`parallelize_context` through the model's own ``_cp_plan``.

    diffusers' own machinery splits inputs by its plan format and does the exchange inside its attention dispatcher;
    VideoDiT's attention runs ``lvd.kernels.attention`` behind a replaceable core, so the exchange is ours. The config
    is recorded as ``model._parallel_config`` (a :class:`diffusers.ParallelConfig`), as diffusers records it, and a
    second call is refused. Returns the hook handles."""
    from diffusers import ContextParallelConfig as DiffusersContextParallelConfig, ParallelConfig, TensorParallelConfig

    name = type(model).__name__
    if cp_plan is not None:
        raise ValueError(f"{name}.enable_parallelism applies the model's own _cp_plan; cp_plan= is not supported")
    if isinstance(config, TensorParallelConfig) or getattr(config, "tensor_parallel_config", None) is not None:
        raise NotImplementedError(f"{name} supports context parallelism only (a diffusers ContextParallelConfig), "
                                  "not tensor parallelism")
    if isinstance(config, DiffusersContextParallelConfig):
        config = ParallelConfig(context_parallel_config=config)
    if not isinstance(config, ParallelConfig) or config.context_parallel_config is None:
        raise TypeError(f"{name}.enable_parallelism takes a diffusers ContextParallelConfig, got "
                        f"{type(config).__name__}")
    if getattr(model, "_parallel_config", None) is not None:
        raise RuntimeError(f"parallelism is already applied to this {name}; enable_parallelism cannot run twice")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed must be initialized (torchrun and init_process_group) before "
                           "enable_parallelism")
    given = config.context_parallel_config
    cfg = ContextParallelConfig(ulysses_degree=given.ulysses_degree, ring_degree=given.ring_degree)
    mesh = given.mesh
    problems = cfg.problems(dist.get_world_size() if mesh is None else None, num_heads=model.config.num_heads,
                            attention_mode=model.config.attention_mode)
    if mesh is not None:
        names = mesh.mesh_dim_names or ()
        sizes = {n: mesh[n].size() for n in ("ring", "ulysses") if n in names}
        if sizes != {"ring": cfg.ring_degree, "ulysses": cfg.ulysses_degree}:
            problems.append(f"the mesh's ring and ulysses dimensions {sizes} must have the sizes ring_degree="
                            f"{cfg.ring_degree} and ulysses_degree={cfg.ulysses_degree}")
    if problems:
        raise ValueError(f"{name}.enable_parallelism: " + "; ".join(problems))
    if mesh is None:
        mesh = context_mesh(cfg, next(model.parameters()).device.type)
    handles = parallelize_context(model, mesh)
    model._parallel_config = config
    return handles
