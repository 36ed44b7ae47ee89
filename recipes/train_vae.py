"""Stage 1: train the causal video VAE on clip shards.

Launch lines::

    # one process (CPU or one GPU)
    python recipes/train_vae.py --config recipes/configs/shapes_vae.yaml
    python recipes/train_vae.py --config recipes/configs/shapes_vae.yaml run.dir=runs/vae2 train.max_steps=500
    # many GPUs / nodes (DDP; distributed.strategy=fsdp shards the model)
    torchrun --standalone --nproc_per_node 8 recipes/train_vae.py --config recipes/configs/ucf101_vae_256.yaml

Starting the same command again resumes from the newest intact checkpoint in ``run.dir`` (a newer one
whose files do not match the SHA-256 hashes in its ``meta.json`` is skipped with a warning);
``checkpoint.resume_from=RUN/checkpoints/step_N`` starts from that folder instead, and stops with an
error if it fails verification. The run folder::

    RUN/config.yaml  checkpoints/step_N/  metrics.jsonl  tensorboard/  samples/step_N.gif  export/

``export/`` (written at the end) is a diffusers ``save_pretrained`` folder of the EMA weights with the
latent mean/std measured on data, i.e. what ``lvd.vae.load_vae(RUN/export)`` and
``python -m lvd.cache_latents --vae RUN/export`` load.

Loss (``lvd.vae.losses.vae_loss``): L1 + KL + optional SSIM/gradient "perceptual" substitute (not
LPIPS: no pretrained VGG weights here) + optional 3D PatchGAN hinge term from ``loss.adv_start_step``,
whose discriminator trains as the trainer's aux model with its own AdamW.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lvd.config import (
    ConfigError,
    arguments_problems,
    folder_problem,
    parse_args,
    raise_problems,
    run_cli,
)
from lvd.data.loader import ClipDataConfig, make_clip_loader
from lvd.inputs import shards_problem
from lvd.train.checkpoint import CheckpointConfig, CheckpointError
from lvd.train.distributed import DistributedConfig, DistributedError, init_distributed, shutdown, unwrap, wrap_model
from lvd.train.loop import (
    Aux,
    Hook,
    OptimConfig,
    RunConfig,
    StepOutput,
    TrainConfig,
    Trainer,
    export_pretrained,
    prepare_model,
    train_config_problems,
)
from lvd.vae import VAE_PRESETS, CausalVideoVAE, calibrate_latent_stats
from lvd.vae.losses import (
    PatchDiscriminator3D,
    VAELossConfig,
    adversarial_active,
    discriminator_loss,
    psnr,
    ssim,
    vae_loss,
)

log = logging.getLogger("lvd.recipes.vae")


@dataclass
class VAEModelConfig:
    """``preset`` from ``lvd.vae.VAE_PRESETS``; ``overrides`` are CausalVideoVAE arguments on top of it."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    init_from: str = ""  # a saved VAE folder to fine-tune instead of a fresh preset


@dataclass
class DiscriminatorConfig:
    """The 3D PatchGAN, built only when ``loss.adv_weight > 0``."""

    base_channels: int = 64
    num_layers: int = 3
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.5, 0.9), warmup_steps=0,
                                                                   schedule="constant"))


@dataclass
class EvalConfig:
    """PSNR/SSIM of the EMA model on held-out clip shards every ``every`` steps (empty shards or every=0: off)."""

    shards: str = ""
    every: int = 500
    num_clips: int = 16
    batch_size: int = 4
    frames: int = 0  # frames of the held-out clips (first frames, centre crop); 0: data.frames


@dataclass
class SamplesConfig:
    """Reconstruction videos (original | reconstruction) into RUN/samples every ``every`` steps (0: off);
    they need eval.shards."""

    every: int = 500
    num: int = 2
    format: str = "gif"  # gif | mp4
    fps: float = 8.0


@dataclass
class ExportConfig:
    """After the last step: measure latent mean/std on ``calibration_batches`` batches, then export."""

    enabled: bool = True
    calibration_batches: int = 8
    dir: str = ""  # default RUN/export


@dataclass
class VAERecipeConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: ClipDataConfig = field(default_factory=lambda: ClipDataConfig(shards="data/shards"))
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def check_config(cfg: VAERecipeConfig) -> None:
    """Raise one ConfigError listing every value that cannot work and every named path that is missing,
    before any model is built or anything is written."""
    problems = train_config_problems(cfg.train, cfg.checkpoint, cfg.optim)
    for key, value in (("eval.every", cfg.eval.every), ("samples.every", cfg.samples.every),
                       ("samples.num", cfg.samples.num)):
        if value < 0:
            problems.append(f"{key}={value}: must be >= 0 (0: off)")
    if cfg.eval.shards:
        for key, value in (("eval.num_clips", cfg.eval.num_clips), ("eval.batch_size", cfg.eval.batch_size)):
            if value < 1:
                problems.append(f"{key}={value}: must be >= 1")
    if cfg.samples.format not in ("gif", "mp4"):
        problems.append(f"samples.format={cfg.samples.format!r}: must be 'gif' or 'mp4'")
    if not cfg.samples.fps > 0:
        problems.append(f"samples.fps={cfg.samples.fps}: must be > 0")
    if not cfg.model.init_from and cfg.model.preset not in VAE_PRESETS:
        problems.append(f"model.preset={cfg.model.preset!r}: unknown; choose one of {', '.join(sorted(VAE_PRESETS))}")
    problems += arguments_problems("model.overrides", cfg.model.overrides, CausalVideoVAE.__init__)
    if cfg.export.enabled and cfg.export.calibration_batches < 1:
        problems.append(f"export.calibration_batches={cfg.export.calibration_batches}: must be >= 1")
    problems += filter(None, [
        shards_problem("data.shards", cfg.data.shards, allow_pipe=cfg.data.allow_pipe),
        shards_problem("eval.shards", cfg.eval.shards, allow_pipe=cfg.data.allow_pipe) if cfg.eval.shards else None,
        _init_from_problem(cfg.model.init_from),
        folder_problem("run.dir", cfg.run.dir),
        folder_problem("export.dir", cfg.export.dir) if cfg.export.enabled and cfg.export.dir else None,
    ])
    raise_problems(problems)


def _init_from_problem(init_from: str) -> str | None:
    if not init_from or (Path(init_from) / "config.json").is_file():
        return None
    if not Path(init_from).exists():
        return f"model.init_from={init_from!r}: no such folder"
    return f"model.init_from={init_from!r}: the folder has no config.json (a CausalVideoVAE save_pretrained folder)"


def build_vae(cfg: VAEModelConfig) -> CausalVideoVAE:
    """The plain model (no device, no wrapping): a preset with overrides, or a saved folder."""
    if cfg.init_from:
        return CausalVideoVAE.from_pretrained(cfg.init_from)
    return CausalVideoVAE.from_preset(cfg.preset, **cfg.overrides)


def check_data_fits(cfg: VAERecipeConfig, vae: CausalVideoVAE) -> None:
    """Every training bucket must be a valid VAE input; raise once, naming each bad bucket."""
    problems = []
    for b in cfg.data.bucket_list():
        try:
            vae.check_input(b.frames, b.height, b.width)
        except ValueError as e:
            problems.append(f"data bucket {b.frames}x{b.height}x{b.width}: {e}")
    if cfg.eval.shards and cfg.eval.frames > 0:
        b = cfg.data.bucket_list()[0]
        try:
            vae.check_input(cfg.eval.frames, b.height, b.width)
        except ValueError as e:
            problems.append(f"eval.frames={cfg.eval.frames}: {e}")
    raise_problems(problems, "data does not fit the VAE")


class HeldOut:
    """The first ``num_clips`` held-out clips (loaded once), their PSNR/SSIM and reconstruction videos."""

    def __init__(self, cfg: VAERecipeConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self._clips: torch.Tensor | None = None

    def clips(self) -> torch.Tensor:
        if self._clips is None:
            e = self.cfg.eval
            data = replace(self.cfg.data, shards=e.shards, batch_size=e.batch_size, shuffle=0, random_crop=False,
                           workers=0, resampled=False, epochs=1, drop_last=False, buckets=list(self.cfg.data.buckets[:1]))
            if e.frames > 0:
                b = data.bucket_list()[0]
                data = replace(data, buckets=[replace(b, frames=e.frames)])
            videos, n = [], 0
            for batch in make_clip_loader(data, seed=0):
                videos.append(batch["video"])
                n += len(batch["video"])
                if n >= e.num_clips:
                    break
            if not videos:
                raise ConfigError(f"eval.shards={e.shards!r} gave no clips")
            self._clips = torch.cat(videos)[: e.num_clips]
        return self._clips

    @torch.no_grad()
    def reconstruct(self, vae: torch.nn.Module, videos: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(videos), self.cfg.eval.batch_size):
            x = videos[i:i + self.cfg.eval.batch_size].to(self.device)
            out.append(vae(x, sample=False)[0].float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def evaluate(self, vae: torch.nn.Module) -> dict[str, float]:
        videos = self.clips()
        recon = self.reconstruct(vae, videos)
        return {"eval/psnr": float(psnr(recon, videos)), "eval/ssim": float(ssim(recon, videos))}


def write_samples(run_dir: Path, step: int, videos: torch.Tensor, recon: torch.Tensor, cfg: SamplesConfig) -> Path:
    """original | reconstruction side by side, clips stacked vertically: (3, T, n·H, 2·W)."""
    from lvd.video_io import write_video

    pairs = torch.cat([videos, recon], dim=-1)  # (n, 3, T, H, 2W)
    grid = torch.cat(list(pairs), dim=-2)  # (3, T, n·H, 2W)
    path = run_dir / "samples" / f"step_{step:06d}.{cfg.format}"
    write_video(path, grid.clamp(-1, 1), fps=cfg.fps)
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # 1. Config, processes, seed
    cfg = parse_args(VAERecipeConfig, argv)
    check_config(cfg)
    env = init_distributed(cfg.distributed)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    run_dir = Path(cfg.run.dir)

    # 2. Models: the VAE (EMA'd, exported) and, for the GAN term, a discriminator
    vae = build_vae(cfg.model)
    check_data_fits(cfg, vae)
    if cfg.model.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    model, ema = prepare_model(vae, env, cfg.distributed, cfg.train)
    disc = aux = None
    if cfg.loss.adv_weight > 0:
        disc = PatchDiscriminator3D(base_channels=cfg.discriminator.base_channels,
                                    num_layers=cfg.discriminator.num_layers).to(env.device)
        disc_wrapped = wrap_model(disc, env, cfg.distributed, strategy="ddp" if env.world_size > 1 else "none")

        def disc_step(d, ctx, step, gen):
            if not adversarial_active(cfg.loss, step):
                return None
            loss, metrics = discriminator_loss(d, *ctx)
            return StepOutput(loss, metrics)

        aux = Aux("discriminator", disc_wrapped, cfg.discriminator.optim, disc_step)
    last_layer = unwrap(model).decoder.conv_out.conv.weight

    # 3. The loss of one micro-batch
    def loss_fn(model, batch, step, gen):
        x = batch["video"].to(env.device, non_blocking=True)  # (B, 3, T, H, W) in [-1, 1]
        recon, posterior = model(x, sample=True, generator=gen)
        loss, metrics = vae_loss(x, recon.float(), posterior, cfg.loss, step=step, discriminator=disc,
                                 last_layer=last_layer if disc is not None else None)
        metrics.pop("loss", None)
        return StepOutput(loss, metrics, ctx=(x, recon.detach()))

    def count(batch):
        b, _, t, h, w = batch["video"].shape
        lt, lh, lw = unwrap(model).latent_shape(t, h, w)[1:]
        return b, b * lt * lh * lw  # tokens = latent positions

    # 4. Hooks: held-out PSNR/SSIM and reconstruction videos (EMA weights when there are any)
    held = HeldOut(cfg, env.device) if cfg.eval.shards else None
    eval_model = ema.model if ema is not None else model
    hooks = []
    if held is not None:
        if cfg.eval.every > 0:
            hooks.append(Hook(cfg.eval.every, lambda tr, step: held.evaluate(eval_model)))
        if env.is_main and cfg.samples.num > 0 and cfg.samples.every > 0:
            def sample_hook(tr, step):
                videos = held.clips()[: cfg.samples.num]
                write_samples(run_dir, step, videos, held.reconstruct(eval_model, videos), cfg.samples)
            hooks.append(Hook(cfg.samples.every, sample_hook))

    # 5. Train (or resume)
    loader = make_clip_loader(cfg.data, seed=cfg.train.seed, rank=env.rank, world_size=env.world_size)
    trainer = Trainer(run_dir=run_dir, model=model, loss_fn=loss_fn, optim=cfg.optim, train=cfg.train,
                      checkpoint=cfg.checkpoint, env=env, ema=ema, aux=aux, config=cfg, count_fn=count, hooks=hooks)
    trainer.fit(loader)

    # 6. Latent calibration on training clips, then the diffusers-layout export of the EMA weights
    if cfg.export.enabled:
        final = unwrap(eval_model)
        calib = make_clip_loader(replace(cfg.data, workers=0), seed=cfg.train.seed + 1, rank=env.rank,
                                 world_size=env.world_size)
        final.eval()
        mean, std = calibrate_latent_stats(final, calib, max_batches=cfg.export.calibration_batches)
        out = export_pretrained(final, cfg.export.dir or run_dir / "export", env)
        if env.is_main:
            log.info("latent mean %s std %s; exported to %s", [round(float(v), 3) for v in mean],
                     [round(float(v), 3) for v in std], out)
            if held is not None:
                trainer.write_metrics({"step": trainer.step, **{f"final/{k.split('/')[-1]}": v
                                                               for k, v in held.evaluate(final).items()}})
    shutdown()
    return 0


if __name__ == "__main__":
    run_cli(main, prog="train_vae.py", user_errors=(DistributedError, CheckpointError))
