"""Fine-tuning in the stage-2 recipe: model.init_from (full fine-tuning) and LoRA adapters (lora.rank > 0)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import _assert_same_files, _dit_args, latent_setup  # noqa: F401 (the fixture)

from lvd.dit.lora import LORA_WEIGHTS
from lvd.pipeline import LVDPipeline

FAST = ["samples.every=0", "train.ema_decay=0.9"]


@pytest.fixture(scope="module")
def base_run(latent_setup, tmp_path_factory):  # noqa: F811
    """A trained (2-step) tiny model exported as a pipeline folder: what the fine-tuning runs start from."""
    from recipes.train_latent_diffusion import main

    run = tmp_path_factory.mktemp("base") / "run"
    assert main(_dit_args(latent_setup, run, *FAST, "train.max_steps=2")) == 0
    return run / "export"


def _weights(folder):
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def test_full_finetuning_starts_from_the_trained_weights(latent_setup, base_run, tmp_path):  # noqa: F811
    """With lr 0 a fine-tuning run changes nothing: its export equals the model it started from."""
    from recipes.train_latent_diffusion import main

    run = tmp_path / "ft"
    assert main(_dit_args(latent_setup, run, *FAST, f"model.init_from={base_run}", "optim.lr=0",
                          "train.max_steps=1")) == 0
    ours, theirs = _weights(run / "export"), _weights(base_run)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # a transformer/ folder works too, and a preset that disagrees with it is ignored (its config wins)
    assert main(_dit_args(latent_setup, tmp_path / "ft2", *FAST, f"model.init_from={base_run / 'transformer'}",
                          "optim.lr=0", "train.max_steps=1", "model.overrides={}")) == 0


def test_init_from_a_model_without_clean_frames_adds_a_zero_embedding(latent_setup, base_run, tmp_path):  # noqa: F811
    """Asking for clean_frame_conditioning (by clean_frames.prob or by the override) on a model saved without it
    adds the clean-token embedding, zero, and keeps every trained weight."""
    from recipes.train_latent_diffusion import main

    for name, extra in {"prob": "clean_frames.prob=0.5", "flag": "model.overrides.clean_frame_conditioning=true"}.items():
        run = tmp_path / name
        assert main(_dit_args(latent_setup, run, *FAST, f"model.init_from={base_run}", "optim.lr=0",
                              "train.max_steps=1", "clean_frames.frames=[1]", extra)) == 0
        ours, theirs = _weights(run / "export"), _weights(base_run)
        assert set(ours) - set(theirs) == {"clean_embed"} and not ours["clean_embed"].any(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
        assert json.loads((run / "export/transformer/config.json").read_text())["clean_frame_conditioning"], name


def test_init_from_problems_are_one_line_errors(latent_setup, base_run, tmp_path, capsys):  # noqa: F811
    from recipes.train_latent_diffusion import main
    from lvd.config import run_cli

    def run(*extra):
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, prog="train_latent_diffusion.py", argv=_dit_args(latent_setup, tmp_path / "bad", *FAST,
                                                                             "train.max_steps=1", *extra))
        return exit_.value.code, capsys.readouterr().err

    code, err = run(f"model.init_from={tmp_path / 'nowhere'}")
    assert code == 2 and "model.init_from=" in err and "Traceback" not in err
    code, err = run(f"model.init_from={base_run}", "model.overrides={hidden_size: 64, num_heads: 2}")
    assert code == 2 and "does not fit model.overrides" in err and "(32,)" in err and "Traceback" not in err
    code, err = run("lora.rank=4")
    assert code == 2 and "set model.init_from" in err
    assert not (tmp_path / "bad").exists()


def test_lora_trains_only_the_adapter_and_exports_it_alone(latent_setup, base_run, tmp_path):  # noqa: F811
    from recipes.train_latent_diffusion import main

    run = tmp_path / "lora"
    assert main(_dit_args(latent_setup, run, *FAST, f"model.init_from={base_run}", "lora.rank=4",
                          "optim.lr=1e-2", "train.max_steps=3")) == 0
    step = run / "checkpoints" / "step_000003"
    model = load_file(step / "model.safetensors")
    assert model and all(".lora_A." in k or ".lora_B." in k for k in model)  # no base weight in the checkpoint
    optimizer_keys = json.dumps(json.loads((step / "optimizer.json").read_text()))
    assert ".lora_" in optimizer_keys and "attn.qkv.base_layer" not in optimizer_keys
    exported = run / "export" / "lora" / LORA_WEIGHTS
    assert exported.is_file() and exported.stat().st_size < 200_000
    assert (run / "export" / "lora" / "adapter_config.json").is_file()

    # the adapter changes the base model's output; with weight 0 it is the base model exactly
    pipe = LVDPipeline.from_pretrained(base_run)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_frames=5, height=16, width=16, num_inference_steps=2, output_type="latent")
    base = pipe("a red circle moving left", generator=torch.Generator().manual_seed(0), **call).frames
    pipe.load_lora_weights(exported.parent, adapter_name="mine")
    adapted = pipe("a red circle moving left", generator=torch.Generator().manual_seed(0), **call).frames
    assert not torch.equal(adapted, base)
    pipe.set_adapters(["mine"], [0.0])
    assert torch.equal(pipe("a red circle moving left", generator=torch.Generator().manual_seed(0), **call).frames,
                       base)


def test_lora_two_steps_then_four_gives_the_same_files(latent_setup, base_run, tmp_path):  # noqa: F811
    from recipes.train_latent_diffusion import main

    lora = [f"model.init_from={base_run}", "lora.rank=2", "lora.dropout=0.1", "export.enabled=false",
            "train.max_steps=4"]
    assert main(_dit_args(latent_setup, tmp_path / "full", *FAST, *lora)) == 0
    assert main(_dit_args(latent_setup, tmp_path / "cut", *FAST, *lora, "train.max_steps=2")) == 0
    assert main(_dit_args(latent_setup, tmp_path / "cut", *FAST, *lora)) == 0
    _assert_same_files(tmp_path / "full", tmp_path / "cut")


def _tiny_wan(latent_setup, folder):  # noqa: F811
    """A tiny random WanTransformer3DModel sized for the test latents, saved as a transformer folder."""
    from diffusers import WanTransformer3DModel

    from lvd.config import parse_args
    from recipes.train_latent_diffusion import DiTRecipeConfig, peek_latents

    first = peek_latents(parse_args(DiTRecipeConfig, _dit_args(latent_setup, folder / "unused")).data, seed=0)
    channels, width = first["latents"].shape[1], first["text"].states.shape[-1]
    torch.manual_seed(0)
    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                in_channels=channels, out_channels=channels, text_dim=width, freq_dim=16, ffn_dim=32,
                                num_layers=1, rope_max_seq_len=32)
    wan.save_pretrained(folder / "transformer")
    return folder / "transformer"


def test_a_wan_transformer_trains_in_the_recipe_fully_and_with_lora(latent_setup, tmp_path):  # noqa: F811
    """model.diffusers_class=WanTransformer3DModel: full fine-tuning exports a folder diffusers loads, with changed
    weights; LoRA trains only the adapter and exports it in diffusers' layout, which Wan itself loads."""
    from diffusers import WanTransformer3DModel

    from recipes.train_latent_diffusion import main

    wan_dir = _tiny_wan(latent_setup, tmp_path / "wan")
    wan = ["model.diffusers_class=WanTransformer3DModel", f"model.init_from={wan_dir}", "model.overrides={}",
           "samples.every=0", "train.max_steps=2", "optim.lr=1e-3"]
    assert main(_dit_args(latent_setup, tmp_path / "full", *wan)) == 0
    trained = WanTransformer3DModel.from_pretrained(tmp_path / "full/export/transformer")
    before = WanTransformer3DModel.from_pretrained(wan_dir).state_dict()
    assert trained.state_dict().keys() == before.keys()
    assert any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items())

    assert main(_dit_args(latent_setup, tmp_path / "lora", *wan, "lora.rank=2")) == 0
    file = tmp_path / "lora/export/lora" / LORA_WEIGHTS
    adapter = load_file(file)
    assert adapter and all(k.startswith("transformer.blocks.0.") and ".lora_" in k for k in adapter)
    step = sorted((tmp_path / "lora/checkpoints").iterdir())[-1]
    saved = load_file(step / "model.safetensors")
    assert saved and all(".lora_" in k for k in saved)  # the frozen base is not in the checkpoint
    base = WanTransformer3DModel.from_pretrained(wan_dir)
    base.load_lora_adapter(str(file), prefix="transformer", adapter_name="ours")
    assert "ours" in base.peft_config


def test_diffusers_class_problems_are_one_line_errors(latent_setup, tmp_path, capsys):  # noqa: F811
    from lvd.config import run_cli
    from recipes.train_latent_diffusion import main

    for extra, named in [(["model.diffusers_class=FluxTransformer2DModel"], "not supported"),
                         (["model.diffusers_class=WanTransformer3DModel"], "set model.init_from"),
                         (["model.diffusers_class=WanTransformer3DModel", f"model.init_from={tmp_path}",
                           "clean_frames.prob=0.5"], "clean_frames.prob=0.5")]:
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, prog="train_latent_diffusion.py",
                    argv=_dit_args(latent_setup, tmp_path / "bad", *FAST, *extra))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and named in err and "Traceback" not in err, err
