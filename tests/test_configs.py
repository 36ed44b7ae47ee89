"""Every shipped YAML in recipes/configs parses into its recipe's schema and its model builds on the meta device."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lvd.text_embeddings import TextEmbeddings
from lvd.config import ConfigError, load_config
from recipes.train_latent_diffusion import DiTRecipeConfig, build_dit
from recipes.train_vae import VAERecipeConfig, build_vae

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
SHARED_KEYS = ("run.dir", "data.shards", "train.max_steps", "train.seed", "checkpoint.every")


def _schema(path: Path):
    return DiTRecipeConfig if "_dit" in path.stem or "lora" in path.stem else VAERecipeConfig


def test_the_expected_configs_ship():
    names = {p.name for p in CONFIGS}
    for name in ("shapes_vae.yaml", "ucf101_vae_256.yaml", "kinetics_vae_512.yaml", "shapes_dit.yaml",
                 "ucf101_dit_256.yaml", "kinetics_dit_512.yaml", "kinetics_dit_1024.yaml", "shapes_lora.yaml"):
        assert name in names


def test_the_lora_config_adapts_the_bundled_demo():
    """shapes_lora.yaml starts from the demo folder (run from the repository root) and adapts it."""
    from lvd.dit.lora import add_lora

    cfg = load_config(DiTRecipeConfig, ROOT / "recipes/configs/shapes_lora.yaml")
    assert cfg.lora.enabled and not cfg.lora.problems()
    model = build_dit(replace(cfg.model, init_from=str(ROOT / cfg.model.init_from)), None)
    trainable = add_lora(model, cfg.lora)
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable and adapter * 4 < 1_000_000  # fp32 adapter file well under 1 MB


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "shapes_lora"], ids=lambda p: p.stem)
def test_config_parses_and_model_builds_on_meta(path):
    cfg = load_config(_schema(path), path)
    for key in SHARED_KEYS:  # both recipes are driven by the same keys
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) not in (None, ""), key
    with torch.device("meta"):
        if isinstance(cfg, VAERecipeConfig):
            model = build_vae(cfg.model)
            for b in cfg.data.bucket_list():
                model.check_input(b.frames, b.height, b.width)
        else:
            o = cfg.model.overrides
            text = TextEmbeddings(torch.empty(1, 1, o["text_dim"]), torch.ones(1, 1, dtype=torch.bool),
                                  torch.empty(1, o["pooled_dim"]))
            first = {"latents": torch.empty(1, o["in_channels"], 1, 1, 1), "text": text}
            model = build_dit(cfg.model, first)
            pt, ph, pw = model.config.patch_size
            for b in cfg.data.buckets:  # every latent bucket patchifies
                assert b.frames % pt == 0 and b.height % ph == 0 and b.width % pw == 0, b
    assert sum(p.numel() for p in model.parameters()) > 0
    assert next(model.parameters()).device.type == "meta"
    if "512" in path.stem or "1024" in path.stem or "256" in path.stem:  # GPU-sized: bf16 and checkpointing/batching set
        assert cfg.train.mixed_precision == "bf16"


def test_gpu_dit_configs_use_fsdp_and_checkpointing_at_scale():
    for name in ("kinetics_dit_512", "kinetics_dit_1024"):
        cfg = load_config(DiTRecipeConfig, next(p for p in CONFIGS if p.stem == name))
        assert cfg.distributed.strategy == "fsdp" and cfg.model.gradient_checkpointing and cfg.data.buckets


def test_a_misspelt_key_names_itself(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match="train.max_step.*max_steps"):
        load_config(VAERecipeConfig, bad)
