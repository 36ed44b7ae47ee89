"""Context parallelism (:mod:`lvd.context_parallel`): per-rank activation memory and step time of one training step.

A narrow VideoDiT (the ``tiny`` preset: width 128, 4 blocks, 4 heads × 32, full attention, cross-attention to 77 text
tokens of which 20 are real, 16 latent channels, patch 1×2×2, batch 1, fp32) takes one training step (forward, MSE
on the gathered output, backward, :func:`~lvd.context_parallel.reduce_context_gradients`) at growing token counts,
on 1, 2 and 4 processes sharing one sample's tokens. Layouts: ``c1`` (one process, no parallelism), ``u2``, ``u4``
(Ulysses), ``r4`` (ring), ``u2r2`` (Ulysses 2 × ring 2). Each layout runs in freshly spawned processes (gloo on the
CPU, one torch thread each; NCCL, one GPU each, with ``--device cuda``), which take a warm-up step at 64 tokens and
then one measured step per token count, smallest first. Per rank it records:

- ``saved_mib``: activation memory as autograd holds it: the bytes of the distinct storages saved for backward
  during the forward (``torch.autograd.graph.saved_tensors_hooks``), parameters and the step's inputs (latents,
  target, text) excluded. A storage counts whole even when only a view of it is saved (a split slice of a
  full-sequence tensor keeps all of it alive). Every saved tensor lives until backward starts, so the sum is their
  peak. ``by_region`` splits it by where it was first saved: ``blocks``, the model's other top-level modules
  (``patch_embed``, ``text_proj``, ``proj_out``, …), ``outside`` (unpatchify, loss), and ``ring_scores``: the
  (N/R)×(N/R) score blocks that ring attention's PyTorch path saves on the CPU (the Triton kernel on a GPU saves
  none of them; ``saved_without_scores_mib`` is the rest).
- ``rss_rise_mib`` (CPU): the process's peak resident memory over the step minus its resident memory just before
  (the peak reset through ``/proc/self/clear_refs``; glibc's mmap threshold fixed at 64 KiB and ``malloc_trim``
  first, so freed buffers go back to the system): saved activations plus transient workspaces (attention, the
  activation gradients of backward, exchange buffers). Parameter gradients exist from the warm-up step and are not
  in it. On a GPU: the rise of ``torch.cuda.max_memory_allocated``.
- ``step_s``: wall time of the step (after a barrier); a row reports the slowest rank, and ``load_average`` the
  1-minute load after it (other processes' load slows every figure on a shared CPU).

Rows give the ratio of each layout's per-rank memory to ``c1``'s at the same tokens against the goal 1.15 / C.
Step times on a shared 2-core CPU are not scaling figures: 2 and 4 processes share the 2 cores that ``c1`` runs one
thread on. On the CPU ring attention runs :func:`lvd.kernels.attention`'s PyTorch path for its log-sum-exp, which
materialises each (N/C)² score block, so ring layouts run only up to ``--ring-max-tokens``.

    python -m benchmarks.bench_context_parallel                            # 4k, 8k, 16k: ~3 min on 2 idle cores
    python -m benchmarks.bench_context_parallel --tokens 4k,8k,16k,32k     # the stored result: ~8 min idle
    python -m benchmarks.bench_context_parallel --tokens 32k --layouts c1,u2,u4 --merge
    python -m benchmarks.bench_context_parallel --tokens 4k --layouts c1,u2 --out /tmp/cp.json
    python -m benchmarks.bench_context_parallel --device cuda --layouts c1,u2,u4,r4,u2r2 --tokens 16k,32k --dtype bf16

Writes benchmarks/results/context_parallel.json (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks import report

LAYOUTS = {"c1": (1, 1), "u2": (2, 1), "u4": (4, 1), "r4": (1, 4), "u2r2": (2, 2)}  # name: (ulysses, ring)
TOKENS = {"4k": (16, 32, 32), "8k": (32, 32, 32), "16k": (16, 64, 64), "32k": (32, 64, 64)}  # latent (T, H, W)
WARMUP_LATENTS = (4, 8, 8)  # 64 tokens
CHANNELS, TEXT_LEN, TEXT_REAL, TEXT_DIM = 16, 77, 20, 768
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20


def tokens_of(latents) -> int:
    t, h, w = latents
    return t * (h // 2) * (w // 2)


# --------------------------------------------------------------------------------------------------
# Measuring one rank


class SavedActivations:
    """``saved_tensors_hooks`` that record the distinct storages autograd saves for backward, by region: the bytes
    of each storage (once, however many views of it are saved), except those in ``exclude`` (data pointers of the
    parameters and inputs). ``region`` is set by the module hooks of :func:`track_regions`; tensors whose last two
    dims are ``scores`` (a ring block's (N/R, N/R) attention scores, which only the PyTorch attention path
    materialises) go to the region "ring_scores"."""

    def __init__(self, exclude: set[int], scores: tuple[int, int]):
        self.exclude, self.scores, self.region = exclude, scores, "outside"
        self.storages: dict[int, tuple[str, int]] = {}  # data_ptr -> (region, bytes)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude and ptr not in self.storages:
            region = "ring_scores" if t.dim() >= 3 and tuple(t.shape[-2:]) == self.scores else self.region
            self.storages[ptr] = (region, storage.nbytes())
        return t

    def by_region(self) -> dict[str, float]:
        regions: dict[str, float] = {}
        for region, nbytes in self.storages.values():
            regions[region] = regions.get(region, 0.0) + nbytes / MIB
        return dict(sorted(regions.items()))


def track_regions(model: torch.nn.Module, saved: SavedActivations) -> list:
    """Forward pre/post hooks on the model's top-level modules that set ``saved.region`` to their name ("blocks"
    for every block) while they run; "outside" otherwise. Returns the handles."""
    handles = []
    for name, child in model.named_children():
        region = "blocks" if name == "blocks" else name
        modules = list(child.children()) if name == "blocks" else [child]
        for module in modules:
            enter = lambda m, a, region=region: setattr(saved, "region", region)  # noqa: E731
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(lambda m, a, o: setattr(saved, "region", "outside")))
    return handles


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class MemoryRise:
    """The rise of this process's peak memory over a block of work: resident memory (VmHWM − VmRSS, the peak reset
    first) on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.before = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.rise = torch.cuda.max_memory_allocated() - self.before
        else:
            self.rise = _rss_kib("VmHWM") * 1024 - self.before


def build(args, device):
    from lvd.dit import VideoDiT

    torch.manual_seed(0)
    model = VideoDiT.from_preset("tiny", in_channels=CHANNELS, text_dim=TEXT_DIM, pooled_dim=TEXT_DIM,
                                 hidden_size=args.hidden, depth=args.depth, num_heads=args.heads)
    with torch.no_grad():  # adaLN-Zero makes every block the identity at initialisation; let them compute
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.to(device)
    return model if args.dtype == "fp32" else model.to(DTYPES[args.dtype])


def inputs(latents, device, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, CHANNELS, *latents, generator=g)
    target = torch.randn(1, CHANNELS, *latents, generator=g)
    text, pooled = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(1, TEXT_DIM, generator=g)
    mask = torch.zeros(1, TEXT_LEN, dtype=torch.bool)
    mask[:, :TEXT_REAL] = True
    return dict(latents=x.to(device, dtype), timestep=torch.tensor([500.0], device=device),
                text_states=text.to(device, dtype), text_mask=mask.to(device),
                text_pooled=pooled.to(device, dtype)), target.to(device, dtype)


def step(model, mesh, batch, target, saved=None):
    """One training step without the optimizer: forward, MSE on the whole output, backward, gradient sum over the
    context group."""
    from lvd.context_parallel import reduce_context_gradients

    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if saved else contextlib.nullcontext()
    with hooks:
        loss = F.mse_loss(model(**batch).float(), target.float())
    loss.backward()
    if mesh is not None:
        reduce_context_gradients(model, mesh)


def measure(model, mesh, latents, device, dtype) -> dict:
    """Saved activations, memory rise and wall time of one step at ``latents`` on this rank; the 1-minute load
    average after it (other processes' load slows every figure on a shared CPU)."""
    import torch.distributed as dist

    batch, target = inputs(latents, device, dtype)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {t.untyped_storage().data_ptr() for t in [*batch.values(), target]}
    ring_tokens = tokens_of(latents) // (mesh["ring"].size() if mesh is not None else 1)
    saved = SavedActivations(exclude, scores=(ring_tokens, ring_tokens))
    handles = track_regions(model, saved)
    if dist.is_initialized():
        dist.barrier()
    with MemoryRise(device) as memory:
        start = time.perf_counter()
        step(model, mesh, batch, target, saved)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=False)  # keep the gradient buffers: the next step allocates none
    regions = saved.by_region()
    return dict(saved_mib=round(sum(regions.values()), 3), by_region={k: round(v, 3) for k, v in regions.items()},
                rss_rise_mib=round(memory.rise / MIB, 3), step_s=round(seconds, 3),
                load_average=round(os.getloadavg()[0], 2))


def worker(rank: int, world: int, port: int, layout: str, cases: list, args, folder: str) -> None:
    """One rank of ``layout``: warm-up step, then one measured step per latent shape in ``cases``; writes its rows
    to ``folder/rank<r>.json``."""
    import torch.distributed as dist

    from lvd.context_parallel import ContextParallelConfig, context_mesh, parallelize_context

    torch.set_num_threads(1)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build(args, device)
    mesh = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        u, r = LAYOUTS[layout]
        mesh = context_mesh(ContextParallelConfig(ulysses_degree=u, ring_degree=r), device_type=device.type)
        parallelize_context(model, mesh)
    dtype = DTYPES[args.dtype]
    step(model, mesh, *inputs(WARMUP_LATENTS, device, dtype))  # lazy initialisations, gradient buffers
    model.zero_grad(set_to_none=False)
    rows = [dict(rank=rank, latents=list(latents), **measure(model, mesh, latents, device, dtype))
            for latents in cases]
    Path(folder, f"rank{rank}.json").write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(layout: str, cases: list, args) -> list[dict]:
    """Spawn the layout's ranks and return one row per token count, every rank's numbers in ``per_rank``."""
    u, r = LAYOUTS[layout]
    world = u * r
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(world, _free_port(), layout, cases, args, folder), nprocs=world)
        per_rank = [json.loads(Path(folder, f"rank{i}.json").read_text()) for i in range(world)]
    rows = []
    for i, latents in enumerate(cases):
        ranks = [ranks_rows[i] for ranks_rows in per_rank]
        rows.append(dict(
            layout=layout, ulysses=u, ring=r, context=world, tokens=tokens_of(latents), latents=list(latents),
            saved_mib=max(x["saved_mib"] for x in ranks), rss_rise_mib=max(x["rss_rise_mib"] for x in ranks),
            step_s=max(x["step_s"] for x in ranks), load_average=ranks[0]["load_average"],
            saved_without_scores_mib=max(x["saved_mib"] - x["by_region"].get("ring_scores", 0.0) for x in ranks),
            per_rank=ranks,
        ))
    return rows


# --------------------------------------------------------------------------------------------------
# Report


def add_ratios(rows: list[dict]) -> None:
    """Each row's per-rank memory over ``c1``'s at the same tokens, against the goal 1.15 / context."""
    single = {r["tokens"]: r for r in rows if r["layout"] == "c1"}
    for r in rows:
        r["goal_ratio"] = round(1.15 / r["context"], 4)
        base = single.get(r["tokens"])
        if base is None:
            continue
        r["saved_ratio"] = round(r["saved_mib"] / base["saved_mib"], 4)
        r["saved_without_scores_ratio"] = round(r["saved_without_scores_mib"] / base["saved_mib"], 4)
        r["rss_ratio"] = round(r["rss_rise_mib"] / base["rss_rise_mib"], 4)
        r["meets_goal"] = r["saved_ratio"] <= r["goal_ratio"] and r["rss_ratio"] <= r["goal_ratio"]


def print_table(rows: list[dict]) -> None:
    head = (f"{'tokens':>6s} {'layout':>6s} {'C':>2s} {'saved MiB':>10s} {'ratio':>6s} {'-scores':>7s} {'RSS MiB':>8s} "
            f"{'ratio':>6s} {'goal':>5s} {'step s':>7s} {'load':>5s}  saved by region (MiB, largest rank)")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = lambda k, w=6: f"{r[k]:{w}.3f}" if k in r else f"{'-':>{w}s}"  # noqa: E731
        largest = max(r["per_rank"], key=lambda x: x["saved_mib"])["by_region"]
        regions = ", ".join(f"{k} {v:.1f}" for k, v in largest.items() if v >= 0.05)
        print(f"{r['tokens']:6d} {r['layout']:>6s} {r['context']:2d} {r['saved_mib']:10.1f} {ratio('saved_ratio')} "
              f"{ratio('saved_without_scores_ratio', 7)} {r['rss_rise_mib']:8.1f} {ratio('rss_ratio')} "
              f"{r['goal_ratio']:5.3f} {r['step_s']:7.2f} {r['load_average']:5.1f}  {regions}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="4k,8k,16k", help=f"comma list from {tuple(TOKENS)}")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list from {tuple(LAYOUTS)}")
    parser.add_argument("--ring-max-tokens", type=int, default=4096,
                        help="largest token count for layouts with ring > 1 on the CPU (their score blocks are "
                             "materialised: ~850 MiB per rank at 4k with the default model, 4x that per doubling)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo; cuda: NCCL, GPU r for rank r")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--out", default=str(report.RESULTS / "context_parallel.json"))
    parser.add_argument("--merge", action="store_true", help="keep the rows of --out for (layout, tokens) not run now")
    args = parser.parse_args(argv)
    tokens = args.tokens.split(",")
    layouts = args.layouts.split(",")
    unknown = [t for t in tokens if t not in TOKENS] + [x for x in layouts if x not in LAYOUTS]
    if unknown:
        parser.error(f"unknown choices {unknown}; tokens {tuple(TOKENS)}, layouts {tuple(LAYOUTS)}")
    bad_heads = [x for x in layouts if args.heads % LAYOUTS[x][0]]
    if bad_heads:
        parser.error(f"--heads {args.heads} is not divisible by the Ulysses degree of {bad_heads}")
    if args.device == "cuda":
        needed, found = max(LAYOUTS[x][0] * LAYOUTS[x][1] for x in layouts), torch.cuda.device_count()
        if found < needed:
            parser.error(f"--device cuda: layouts {layouts} need {needed} GPU(s) (one per rank, NCCL), this machine has "
                         f"{found}; choose --layouts that fit (c1 needs one)")
    else:
        # every buffer above 64 KiB is its own mapping, returned to the system when freed: resident memory follows
        # the live tensors (glibc reads this when the spawned ranks start)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    torch.set_num_threads(1)
    head = report.header("bench_context_parallel", argv)

    rows, skipped = [], []
    for layout in layouts:
        ring = LAYOUTS[layout][1] > 1
        cases = [TOKENS[t] for t in tokens if not (ring and args.device == "cpu"
                                                     and tokens_of(TOKENS[t]) > args.ring_max_tokens)]
        skipped += [dict(layout=layout, tokens=tokens_of(TOKENS[t]), reason=f"ring on the CPU above "
                         f"--ring-max-tokens {args.ring_max_tokens}") for t in tokens if TOKENS[t] not in cases]
        if cases:
            print(f"running {layout} at {[tokens_of(c) for c in cases]} tokens …", flush=True)
            rows += run_layout(layout, cases, args)
    if args.merge and Path(args.out).is_file():
        fresh = {(r["layout"], r["tokens"]) for r in rows}
        stored = json.loads(Path(args.out).read_text())
        rows += [r for r in stored["rows"] if (r["layout"], r["tokens"]) not in fresh]
        skipped += [s for s in stored.get("skipped", []) if (s["layout"], s["tokens"]) not in fresh]
    rows.sort(key=lambda r: (r["tokens"], list(LAYOUTS).index(r["layout"])))
    add_ratios(rows)
    print_table(rows)
    result = dict(
        **head,
        note=("saved_mib: distinct storages saved for backward (saved_tensors_hooks), parameters and inputs excluded, "
              "whole storages; rss_rise_mib: peak resident memory over the step minus resident memory before it "
              "(CUDA: max_memory_allocated rise); step_s: slowest rank. Ranks are processes on this machine's "
              f"{os.cpu_count()} cores with 1 torch thread each: at context 2 and 4 they share the cores, so step "
              "times are not a scaling figure. Ring layouts on the CPU attend through lvd.kernels.attention's "
              "PyTorch log-sum-exp path, which materialises and saves each (N/R)x(N/R) score block (by_region "
              "ring_scores); saved_without_scores_mib is what ring holds besides them."),
        config=dict(preset="tiny", hidden=args.hidden, depth=args.depth, heads=args.heads, channels=CHANNELS,
                    patch=[1, 2, 2], text=[TEXT_LEN, TEXT_DIM], text_real=TEXT_REAL, attention_mode="full",
                    text_attention="cross", batch=1, dtype=args.dtype, device=args.device,
                    backend="nccl" if args.device == "cuda" else "gloo",
                    goal="per-rank memory <= 1.15 / context of c1's"),
        rows=rows, skipped=skipped,
    )
    report.write(result, args.out)


if __name__ == "__main__":
    main()
