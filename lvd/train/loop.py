"""One trainer for both stages: steps, bf16 autocast, grad accumulation, clipping, EMA, NaN guard,
logging, checkpoints and exact resume.

A stage hands the trainer a *loss function* and, for a GAN, an :class:`Aux` model with its own
optimizer::

    def loss_fn(model, batch, step, generator) -> StepOutput(loss, metrics, ctx)

``ctx`` is whatever the aux loss needs from the main step (e.g. the detached reconstruction), so
the discriminator is trained on exactly what the generator produced, with no second forward::

    aux = Aux("disc", disc, OptimConfig(lr=1e-4), lambda disc, ctx, step, gen: disc_loss(...))

One optimizer step (``train.grad_accum`` micro-batches)::

    for each micro-batch:                      # gradient sync only on the last micro-batch
        out = loss_fn(model, batch, step, gen)     # aux params frozen: the generator loss may use it
        (out.loss / accum).backward()
        (aux.loss_fn(aux.model, out.ctx, ...) / accum).backward()
    clip grads (the norm is logged), skip the step when loss or norm is NaN/inf on any rank,
    AdamW step with warm-up + cosine LR, EMA update, log, hooks, checkpoint.

The run folder: ``config.yaml`` (resolved), ``checkpoints/step_N/``, ``metrics.jsonl``,
``tensorboard/``, ``samples/``. Starting the same command again resumes from the newest intact
checkpoint (one whose files match the SHA-256 hashes in its ``meta.json``; a newer broken one is
skipped with a warning), or from ``checkpoint.resume_from``: model, EMA, optimizers, step, RNG (plus a
per-step generator seeded from (seed, step, data rank)) and the loader position are restored, so a killed
and resumed run ends bit-for-bit where an uninterrupted one does (see tests/test_train_loop.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from lvd.atomic import atomic_folder, atomic_write
from lvd.config import ConfigError, raise_problems
from lvd.train.checkpoint import (
    CheckpointConfig,
    latest_checkpoint,
    load_checkpoint,
    resume_from_problem,
    rng_state,
    save_checkpoint,
    select_checkpoint,
    set_aside_after,
    set_rng_state,
)
from lvd.train.distributed import (
    DistEnv,
    DistributedConfig,
    DistributedError,
    all_reduce_mean,
    any_true,
    barrier,
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    no_sync,
    optimizer_state_dict,
    unwrap,
    wrap_model,
    _sharded,
)

__all__ = [
    "RunConfig",
    "OptimConfig",
    "TrainConfig",
    "StepOutput",
    "Aux",
    "Hook",
    "NonFiniteLossError",
    "Trainer",
    "EMA",
    "lr_at",
    "train_config_problems",
    "prepare_model",
    "gathered_model",
    "export_pretrained",
    "step_generator",
]

log = logging.getLogger("lvd.train")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """``dir``: the run folder; the same command with the same dir resumes from its newest checkpoint."""

    dir: str = "runs/default"


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seed: int = 0
    grad_accum: int = 1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    ema_decay: float = 0.999  # 0 disables EMA
    ema_warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)), so short runs are not all init
    mixed_precision: Literal["no", "bf16"] = "bf16"  # bf16 autocast on CUDA only; CPU always runs fp32
    compile: bool = False  # torch.compile the training model
    max_nan_steps: int = 20  # stop after this many non-finite steps in a row
    log_every: int = 10
    progress: bool = True  # tqdm bar on rank 0
    # CPU threads per process (0: torch's default). On an oversubscribed CPU, 1 is several times faster:
    # the tiny VAE at 2x17x64x64 took 5.7 s/step with 1 thread and 25 s with 2 (load average 9 on 2 cores).
    cpu_threads: int = 0


def train_config_problems(train: TrainConfig, checkpoint: CheckpointConfig, optim: OptimConfig | None = None) -> list[str]:
    """Values the trainer cannot run with, one line each naming the key and the value.

    A recipe checks these before it builds a model; :class:`Trainer` checks them again for direct callers.
    """
    problems = []
    for key, value in (("train.max_steps", train.max_steps), ("train.grad_accum", train.grad_accum),
                       ("train.log_every", train.log_every), ("train.max_nan_steps", train.max_nan_steps),
                       ("checkpoint.every", checkpoint.every)):
        if value < 1:
            problems.append(f"{key}={value}: must be >= 1")
    if train.cpu_threads < 0:
        problems.append(f"train.cpu_threads={train.cpu_threads}: must be >= 0 (0: torch's default)")
    if checkpoint.keep_last < 0:
        problems.append(f"checkpoint.keep_last={checkpoint.keep_last}: must be >= 0 (0: keep every checkpoint)")
    if not 0 <= train.ema_decay < 1:  # also catches nan
        problems.append(f"train.ema_decay={train.ema_decay}: must be in [0, 1) (0: no EMA)")
    if not train.grad_clip >= 0:
        problems.append(f"train.grad_clip={train.grad_clip}: must be >= 0 (0: no clipping)")
    if optim is not None and not (math.isfinite(optim.lr) and optim.lr >= 0):
        problems.append(f"optim.lr={optim.lr}: must be a finite number >= 0")
    if checkpoint.resume_from:
        problems += filter(None, [resume_from_problem(checkpoint.resume_from)])
    return problems


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for the optimizer step with 0-based index ``step``.

    warm-up: lr · (step+1)/W for step < W; cosine: lr · (r + (1-r) · ½(1 + cos(π · p))), p = progress after W.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    p = min(1.0, (step - cfg.warmup_steps) / span)
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=False: the same kernel path for plain and DTensor params keeps resume bit-exact on CPU.
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator for the noise of one step, a pure function of (seed, step, rank): resume-proof. The trainer
    passes the data rank, so the ranks of one context group draw the same noise."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    return g


# ---------------------------------------------------------------------------------------------
# Pieces a stage hands the trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to minimise
    metrics: dict[str, Any] = field(default_factory=dict)  # floats or scalar tensors, averaged per log window
    ctx: Any = None  # handed to the aux loss (e.g. {"video": x, "recon": recon.detach()})


@dataclass
class Aux:
    """A second model with its own optimizer, trained on the main step's ``ctx`` (a GAN discriminator).

    ``loss_fn(model, ctx, step, generator)`` returns a StepOutput, or None when inactive at this step.
    """

    name: str
    model: nn.Module
    optim: OptimConfig
    loss_fn: Callable[[nn.Module, Any, int, torch.Generator], StepOutput | None]


@dataclass
class Hook:
    """``fn(trainer, step) -> dict | None`` every ``every`` steps (and at the last step), on every rank;
    ``every <= 0`` turns the hook off."""

    every: int
    fn: Callable[["Trainer", int], dict | None]


class NonFiniteLossError(RuntimeError):
    pass


def _accumulate(sums: dict, metrics: dict, accum: int) -> None:
    """Add micro-batch metrics (tensors stay on their device: no sync until the log step)."""
    for k, v in metrics.items():
        v = v.detach().float() if torch.is_tensor(v) else float(v)
        sums[k] = sums.get(k, 0.0) + v / accum


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    θ_ema ← d·θ_ema + (1-d)·θ, with d = min(decay, (1+t)/(10+t)) when warm-up is on.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        src = unwrap(model)
        for e, p in zip(self.model.parameters(), src.parameters()):
            if p.requires_grad:  # frozen tensors (a LoRA run's base) stay equal to the model's
                e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), src.buffers()):
            e.copy_(b)


def prepare_model(model: nn.Module, env: DistEnv, dist_cfg: DistributedConfig, train: TrainConfig) -> tuple[nn.Module, EMA | None]:
    """Device move, EMA copy, context parallelism, torch.compile and DDP/FSDP2 wrapping, applied from outside the
    model.

    Under context parallelism (``env.mesh``) the model's ``_cp_plan`` is applied after the EMA copy is taken, so
    the EMA model stays a plain one-process model (rank 0 samples with it alone; an EMA deep-copied afterwards
    would carry the split hooks and share the context groups). Also applies ``train.cpu_threads`` (a
    process-wide setting) when it is set.
    """
    if train.cpu_threads > 0:
        torch.set_num_threads(train.cpu_threads)
    model = model.to(env.device)
    ema = EMA(model, train.ema_decay, train.ema_warmup) if train.ema_decay > 0 else None
    if env.mesh is not None:
        from lvd.context_parallel import parallelize_context

        if getattr(type(model), "_cp_plan", None) is None:
            raise DistributedError(f"distributed.ulysses_degree x ring_degree = {env.context_size}: "
                                   f"{type(model).__name__} declares no _cp_plan, so it cannot run context-parallel")
        parallelize_context(model, env.mesh)
    if train.compile:
        model.compile()  # in place: state-dict keys keep their names
    wrapped = wrap_model(model, env, dist_cfg)
    if ema is not None and env.strategy == "fsdp":
        wrap_model(ema.model, env, dist_cfg)  # shard the EMA like the model so the update is local
    return wrapped, ema


def gathered_model(model: nn.Module, env: DistEnv) -> nn.Module | None:
    """The whole model for an export, on rank 0; None on the other ranks. Every rank must call this.

    Under FSDP2 the full weights are gathered (to CPU) and loaded into a fresh copy built from the model's
    config, so what is saved never holds sharded tensors; otherwise it is the model itself, out of its DDP
    or compile wrapper. Every export (:func:`export_pretrained`, a recipe's pipeline folder) starts here.
    """
    state = model_state_dict(model) if _sharded(model) else None  # a collective: every rank takes part
    if not env.is_main:
        return None
    plain = unwrap(model)
    if state is not None:
        plain = type(plain).from_config(plain.config)
        plain.load_state_dict(state)
    return plain


def export_pretrained(model: nn.Module, out_dir: str | Path, env: DistEnv) -> Path | None:
    """Write a diffusers ``save_pretrained`` folder (safetensors + config.json) of :func:`gathered_model` from
    rank 0, atomically (:func:`lvd.atomic.atomic_folder`). Every rank must call this; returns ``out_dir`` on
    rank 0, None elsewhere, once the folder is written."""
    plain = gathered_model(model, env)
    if plain is not None:
        with atomic_folder(out_dir) as tmp:
            plain.save_pretrained(tmp, safe_serialization=True)
    barrier()
    return Path(out_dir) if env.is_main else None


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Owns the optimizers, EMA, counters and run folder; :meth:`fit` runs or resumes a run."""

    def __init__(
        self,
        *,
        run_dir: str | Path,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any, int, torch.Generator], StepOutput],
        optim: OptimConfig,
        train: TrainConfig,
        checkpoint: CheckpointConfig,
        env: DistEnv,
        ema: EMA | None = None,
        aux: Aux | None = None,
        config: Any = None,
        count_fn: Callable[[Any], tuple[int, int]] | None = None,
        hooks: Iterable[Hook] = (),
        save_frozen: bool = True,
    ):
        raise_problems(train_config_problems(train, checkpoint, optim))
        self.run_dir = Path(run_dir)
        self.model, self.loss_fn, self.ema, self.aux = model, loss_fn, ema, aux
        self.optim_cfg, self.train_cfg, self.ckpt_cfg, self.env = optim, train, checkpoint, env
        self.config = config
        self.count_fn = count_fn or (lambda batch: (0, 0))
        self.hooks = [h for h in hooks if h.every > 0]
        # save_frozen=False: checkpoints hold the trainable tensors only (a LoRA run's adapters; the frozen base is
        # rebuilt from where it came from, e.g. model.init_from), for the model and its EMA alike
        self.saved_names = None if save_frozen else {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer(model, optim)
        self.aux_optimizer = make_optimizer(aux.model, aux.optim) if aux is not None else None
        self.step = 0  # optimizer steps done (skipped ones included)
        self.nan_in_a_row = 0
        self.nan_total = 0
        self._writer = None
        use_bf16 = train.mixed_precision == "bf16" and env.device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    # -- state -----------------------------------------------------------------------------------

    def _model_tree(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model_state_dict(model)
        return state if self.saved_names is None else {k: v for k, v in state.items() if k in self.saved_names}

    def _trees(self) -> dict[str, Any]:
        trees = {"model": self._model_tree(self.model), "optimizer": optimizer_state_dict(self.model, self.optimizer)}
        if self.ema is not None:
            trees["ema"] = self._model_tree(self.ema.model)
        if self.aux is not None:
            trees[self.aux.name] = model_state_dict(self.aux.model)
            trees[f"{self.aux.name}_optimizer"] = optimizer_state_dict(self.aux.model, self.aux_optimizer)
        trees["trainer"] = {"step": self.step, "nan_in_a_row": self.nan_in_a_row, "nan_total": self.nan_total}
        return trees

    def save(self, loader: Any = None) -> Path:
        rank_tree = {"rng": rng_state()}
        if loader is not None and hasattr(loader, "state_dict"):
            rank_tree["data"] = loader.state_dict()
        need_trees = self.env.is_main or _sharded(self.model)
        path = save_checkpoint(
            self.run_dir, self.step, self._trees() if need_trees else {}, rank_tree=rank_tree,
            config=self.config, keep_last=self.ckpt_cfg.keep_last, rank=self.env.rank,
            world_size=self.env.world_size, barrier=barrier,
        )
        return path

    def resume(self, loader: Any = None, step_dir: str | Path | None = None) -> bool:
        """Load ``step_dir``, else ``checkpoint.resume_from``, else the run's newest intact checkpoint.

        False when the run has no checkpoint yet. A named folder that fails verification, or a run
        whose every checkpoint fails, raises :class:`~lvd.train.checkpoint.CheckpointError`.
        """
        explicit = step_dir or self.ckpt_cfg.resume_from or None
        chosen = select_checkpoint(self.run_dir, explicit, rank=self.env.rank)
        if chosen is None:
            return False
        step_dir, meta = chosen
        names = ["model", "optimizer", "trainer"] + (["ema"] if self.ema is not None else [])
        if self.aux is not None:
            names += [self.aux.name, f"{self.aux.name}_optimizer"]
        trees, rank_tree, _ = load_checkpoint(step_dir, names, rank=self._saved_rank(meta), meta=meta)
        partial = self.saved_names is not None
        load_model_state_dict(self.model, trees["model"], partial=partial)
        load_optimizer_state_dict(self.model, self.optimizer, trees["optimizer"])
        if self.ema is not None:
            load_model_state_dict(self.ema.model, trees["ema"], partial=partial)
        if self.aux is not None:
            load_model_state_dict(self.aux.model, trees[self.aux.name])
            load_optimizer_state_dict(self.aux.model, self.aux_optimizer, trees[f"{self.aux.name}_optimizer"])
        t = trees["trainer"]
        self.step, self.nan_in_a_row, self.nan_total = int(t["step"]), int(t["nan_in_a_row"]), int(t["nan_total"])
        if rank_tree is not None:
            set_rng_state(rank_tree["rng"])
            if "data" in rank_tree and loader is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(rank_tree["data"])
        if self.env.is_main:
            if explicit:
                set_aside_after(self.run_dir, self.step)
            self._drop_metrics_after(self.step)
            log.info("resumed from %s (step %d)", step_dir, self.step)
        return True

    def _saved_rank(self, meta: dict) -> int:
        """Whose rank state (RNG, loader position) this rank resumes with: the first rank of its data shard in the
        saved run. Context groups are consecutive ranks, so with the same number of data shards D a run saved at
        world W' has context size W' / D and data rank d's state is rank d · W' / D's; the model is the same model,
        so a checkpoint written with context parallelism resumes without it and the reverse. Any other world
        (a different D) keeps this rank's own index, and the loader refuses a state of another layout."""
        saved_world, shards = int(meta.get("world_size", 1)), self.env.data_world_size
        if saved_world % shards:
            return self.env.rank
        return self.env.data_rank * (saved_world // shards)

    def _drop_metrics_after(self, step: int) -> None:
        """A run killed between a log line and its checkpoint logged steps it will redo: drop them."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= step]
        if len(kept) != len(lines):
            with atomic_write(path, "w", encoding="utf-8") as f:
                f.write("".join(l + "\n" for l in kept))

    # -- one optimizer step ----------------------------------------------------------------------

    def _set_lr(self) -> float:
        lr = lr_at(self.step, self.optim_cfg, self.train_cfg.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.aux is not None:
            aux_lr = lr_at(self.step, self.aux.optim, self.train_cfg.max_steps)
            for g in self.aux_optimizer.param_groups:
                g["lr"] = aux_lr
        return lr

    def _clip(self, model: nn.Module) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return norm

    def train_step(self, batches: Iterable) -> dict[str, float]:
        """Forward/backward over ``grad_accum`` micro-batches, then one (or a skipped) update.

        Under context parallelism the loss is scaled by the context size C before backward (the logged loss is not):
        each rank of a context group holds only its tokens' share of the gradient, and DDP / FSDP2 average over all
        W = D · C ranks, so C · mean over W = mean over the D data shards of each shard's whole gradient."""
        cfg, accum = self.train_cfg, self.train_cfg.grad_accum
        lr = self._set_lr()
        gen = step_generator(cfg.seed, self.step, self.env.data_rank, self.env.device)
        aux_raw = unwrap(self.aux.model) if self.aux is not None else None
        sums: dict[str, torch.Tensor] = {}
        samples = tokens = 0
        local_bad = False
        aux_active = False
        for i, batch in enumerate(batches):
            last = i == accum - 1
            if aux_raw is not None:
                aux_raw.requires_grad_(False)  # the generator loss may call the discriminator
            with no_sync(self.model, skip_sync=not last):
                with self.autocast():
                    out = self.loss_fn(self.model, batch, self.step, gen)
                (out.loss * (self.env.context_size / accum)).backward()
            local_bad |= not bool(torch.isfinite(out.loss.detach()))
            _accumulate(sums, {"loss": out.loss, **out.metrics}, accum)
            if aux_raw is not None:
                aux_raw.requires_grad_(True)
                with no_sync(self.aux.model, skip_sync=not last):
                    with self.autocast():
                        aux_out = self.aux.loss_fn(self.aux.model, out.ctx, self.step, gen)
                    if aux_out is not None:
                        aux_active = True
                        (aux_out.loss / accum).backward()
                        local_bad |= not bool(torch.isfinite(aux_out.loss.detach()))
                        _accumulate(sums, {f"{self.aux.name}_loss": aux_out.loss, **aux_out.metrics}, accum)
            s, t = self.count_fn(batch)
            samples, tokens = samples + s, tokens + t
        if i != accum - 1:
            raise RuntimeError(f"train_step got {i + 1} micro-batches, expected train.grad_accum={accum}")

        norm = self._clip(self.model)
        aux_norm = self._clip(self.aux.model) if aux_active else torch.zeros(())
        bad = any_true(local_bad or not bool(torch.isfinite(norm)) or not bool(torch.isfinite(aux_norm)), self.env.device)
        if bad:
            self.nan_in_a_row += 1
            self.nan_total += 1
        else:
            self.nan_in_a_row = 0
            self.optimizer.step()
            if aux_active:
                self.aux_optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.aux_optimizer is not None:
            self.aux_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out_metrics = {k: v for k, v in sums.items()}
        out_metrics.update(lr=lr, grad_norm=norm.detach().float().cpu(), skipped=float(bad))
        if aux_active:
            out_metrics[f"{self.aux.name}_grad_norm"] = aux_norm.detach().float().cpu()
        out_metrics["_samples"], out_metrics["_tokens"] = samples, tokens
        if self.nan_in_a_row >= cfg.max_nan_steps:
            raise NonFiniteLossError(
                f"{self.nan_in_a_row} optimizer steps in a row had a NaN/inf loss or gradient (step {self.step}, "
                f"{self.nan_total} in total); stopping. Lower optim.lr, raise train.grad_clip, or check the data. "
                f"The last good checkpoint is {latest_checkpoint(self.run_dir)}"
            )
        return out_metrics

    # -- logging ---------------------------------------------------------------------------------

    def _log(self, window: list[dict], seconds: float, extra: dict | None = None) -> dict:
        """Average a window of step metrics over steps and ranks; rank 0 writes jsonl + tensorboard."""
        keys = sorted({k for m in window for k in m if not k.startswith("_")})
        vals = torch.tensor([sum(float(m.get(k, 0.0)) for m in window) / len(window) for k in keys], dtype=torch.float64)
        vals = all_reduce_mean(vals.to(self.env.device)).cpu()
        row = {"step": self.step, **{k: float(v) for k, v in zip(keys, vals)}}
        row["skipped"] = row.get("skipped", 0.0) * len(window)  # steps skipped in this window
        steps_s = len(window) / max(seconds, 1e-9)
        shards = self.env.data_world_size  # the ranks of a context group train on the same samples
        row["steps_per_s"] = steps_s
        row["samples_per_s"] = sum(m["_samples"] for m in window) * shards / max(seconds, 1e-9)
        row["tokens_per_s"] = sum(m["_tokens"] for m in window) * shards / max(seconds, 1e-9)
        row.update(extra or {})
        self.write_metrics(row)
        return row

    def write_metrics(self, row: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._writer.add_scalar(k, v, row["step"])
        self._writer.flush()

    # -- the run ---------------------------------------------------------------------------------

    def fit(self, loader: Iterable) -> int:
        """Run (or resume) until ``train.max_steps``; returns the final step."""
        cfg = self.train_cfg
        self.resume(loader)  # first: a checkpoint that fails verification stops the run before it writes anything
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "samples").mkdir(exist_ok=True)
        if self.config is not None and self.env.is_main:
            from lvd.config import save_config

            save_config(self.config, self.run_dir / "config.yaml")
        barrier()
        bar = None
        if cfg.progress and self.env.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, dynamic_ncols=True, desc="train")
        it = iter(loader)

        def micro_batches():
            nonlocal it
            for _ in range(cfg.grad_accum):
                try:
                    batch = next(it)
                except StopIteration:  # end of a finite epoch: start the next one
                    it = iter(loader)
                    batch = next(it, None)
                    if batch is None:
                        raise ConfigError("the data loader yielded no batch: check data.shards and the batch size") from None
                yield batch

        window: list[dict] = []
        t0 = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                self.model.train()
                window.append(self.train_step(micro_batches()))
                done = self.step >= cfg.max_steps
                extra = {}
                for hook in self.hooks:
                    if self.step % hook.every == 0 or done:
                        extra.update(hook.fn(self, self.step) or {})
                        self.model.train()
                if self.step % cfg.log_every == 0 or done:
                    if self.env.device.type == "cuda":
                        torch.cuda.synchronize()
                    row = self._log(window, time.perf_counter() - t0, extra)
                    window, t0 = [], time.perf_counter()
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4g}", samples_s=f"{row['samples_per_s']:.3g}",
                                        tokens_s=f"{row['tokens_per_s']:.3g}", refresh=False)
                elif extra:
                    self.write_metrics({"step": self.step, **extra})
                if bar is not None:
                    bar.update(1)
                if self.step % self.ckpt_cfg.every == 0 or done:
                    self.save(loader)
        finally:
            if bar is not None:
                bar.close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        return self.step
