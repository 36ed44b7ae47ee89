"""Clean first frames in training: VideoDiT's clean-token embedding, the objective's masking, the recipe section."""

import pytest
import torch
import test_recipes
from test_recipes import _dit_args

from lvd.text_embeddings import TextEmbeddings
from lvd.diffusion import CleanFramesConfig, DiffusionConfig, DiffusionObjective
from lvd.dit import VideoDiT
from lvd.train.checkpoint import latest_checkpoint, load_tree

latent_setup = test_recipes.latent_setup  # the recipe tests' module-scoped fixture: tiny latent shards
TINY = dict(in_channels=4, hidden_size=32, depth=2, num_heads=2, text_dim=8, pooled_dim=8)


def _text(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextEmbeddings(torch.randn(b, 3, 8, generator=g), torch.ones(b, 3, dtype=torch.bool),
                          torch.randn(b, 8, generator=g))


def _randomise(model):
    """adaLN-Zero outputs zeros at init: give every weight a value so outputs depend on the inputs."""
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _call(model, x, text, **kwargs):
    return model(x, torch.tensor([500.0, 200.0]), text.states, text.mask, text.pooled, **kwargs)


def test_conditioning_off_keeps_the_old_model_and_outputs_bit_for_bit(tmp_path):
    """The flag off (the default) adds no parameter, so older checkpoints load unchanged; with it on, clean_frames=0
    (an int, or a tensor of zeros) gives exactly the plain forward of the same weights."""
    old = _randomise(VideoDiT(**TINY))
    assert "clean_embed" not in old.state_dict() and not old.config.clean_frame_conditioning
    x, text = torch.randn(2, 4, 3, 4, 4), _text()
    with torch.no_grad():
        before = _call(old, x, text)
        old.save_pretrained(tmp_path / "old")
        loaded = VideoDiT.from_pretrained(tmp_path / "old")
        assert loaded.clean_embed is None
        assert torch.equal(_call(loaded.eval(), x, text), before)
        new = VideoDiT(**TINY, clean_frame_conditioning=True).eval()
        missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
        assert missing == ["clean_embed"] and not unexpected and not new.clean_embed.any()  # zero-initialised
        torch.nn.init.normal_(new.clean_embed)
        assert torch.equal(_call(new, x, text), before)
        assert torch.equal(_call(new, x, text, clean_frames=0), before)
        assert torch.equal(_call(new, x, text, clean_frames=torch.zeros(2, dtype=torch.long)), before)


def test_clean_frames_mark_only_their_tokens_and_need_the_flag():
    model = _randomise(VideoDiT(**TINY, clean_frame_conditioning=True))
    x, text = torch.randn(2, 4, 3, 4, 4), _text()
    with torch.no_grad():
        plain = _call(model, x, text)
        one = _call(model, x, text, clean_frames=1)
        per_sample = _call(model, x, text, clean_frames=torch.tensor([1, 0]))
    assert not torch.equal(one, plain)
    assert torch.equal(per_sample[1], plain[1]) and torch.allclose(per_sample[0], one[0], atol=1e-6)
    with pytest.raises(ValueError, match="without clean_frame_conditioning"):
        _call(VideoDiT(**TINY), x, text, clean_frames=1)
    with pytest.raises(ValueError, match="divisible by the temporal patch 2"):
        VideoDiT(**TINY, patch_size=(2, 2, 2), clean_frame_conditioning=True)(
            torch.randn(1, 4, 4, 4, 4), torch.tensor([1.0]), text.states[:1], clean_frames=1)


class Constant(torch.nn.Module):
    """A denoiser that returns a learnable constant plus ``offset`` on the frames marked as clean, and records
    what it was called with."""

    def __init__(self, offset=0.0):
        super().__init__()
        self.bias, self.offset, self.calls = torch.nn.Parameter(torch.zeros(())), offset, []

    def forward(self, x, t, text_states, text_mask=None, text_pooled=None, clean_frames=0):
        self.calls.append({"x": x.detach().clone(), "clean_frames": clean_frames})
        k = torch.as_tensor(clean_frames).reshape(-1).expand(x.shape[0])
        clean = (torch.arange(x.shape[2])[None] < k[:, None])[:, None, :, None, None]
        return torch.zeros_like(x) + self.bias + self.offset * clean


@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
def test_clean_frames_get_no_noise_and_no_loss(objective):
    cfg = DiffusionConfig(objective=objective, cfg_dropout=0.0)
    objective_fn = DiffusionObjective(cfg, clean_frames=CleanFramesConfig(prob=1.0, frames=[1, 2]))
    x0, text = torch.randn(4, 4, 3, 2, 2), _text(4)
    losses = []
    for offset in (0.0, 1e3):  # whatever the model says on clean frames, the loss is the same
        model = Constant(offset)
        loss, metrics = objective_fn(model, x0, text, generator=torch.Generator().manual_seed(3))
        losses.append(loss)
        k = model.calls[0]["clean_frames"]
        assert set(k.tolist()) <= {1, 2} and metrics["clean_frames"] == k.float().mean()
        for b in range(4):
            seen = model.calls[0]["x"][b]
            assert torch.equal(seen[:, : k[b]], x0[b, :, : k[b]])  # clean: x_t = x0
            assert not torch.equal(seen[:, k[b]:], x0[b, :, k[b]:])  # noisy
    assert torch.equal(losses[0], losses[1])
    loss.backward()
    assert model.bias.grad is not None


def test_conditioning_prob_zero_trains_exactly_as_before():
    cfg = DiffusionConfig(cfg_dropout=0.0)
    x0, text = torch.randn(2, 4, 3, 2, 2), _text()
    a, _ = DiffusionObjective(cfg)(Constant(), x0, text, generator=torch.Generator().manual_seed(1))
    model = Constant()
    b, metrics = DiffusionObjective(cfg, clean_frames=CleanFramesConfig(prob=0.0))(
        model, x0, text, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and model.calls[0]["clean_frames"] == 0 and "clean_frames" not in metrics


def test_conditioning_config_values_are_checked():
    with pytest.raises(ValueError, match=r"clean_frames.prob=1.5 must be in \[0, 1\]"):
        CleanFramesConfig(prob=1.5)
    with pytest.raises(ValueError, match="clean_frames.frames=\\[0\\]"):
        CleanFramesConfig(prob=0.5, frames=[0])
    with pytest.raises(ValueError, match="multiples of the denoiser's temporal patch 2"):
        DiffusionObjective(DiffusionConfig(), patch_size=(2, 2, 2), clean_frames=CleanFramesConfig(prob=0.5))
    with pytest.raises(ValueError, match="leave no frame to denoise"):
        DiffusionObjective(DiffusionConfig(cfg_dropout=0.0), clean_frames=CleanFramesConfig(prob=0.5, frames=[3]))(
            Constant(), torch.randn(1, 4, 3, 2, 2), _text(1))


def test_recipe_trains_two_steps_with_clean_frames_and_exports_the_flag(latent_setup, tmp_path):
    import json

    from recipes.train_latent_diffusion import main

    run = tmp_path / "run"
    assert main(_dit_args(latent_setup, run, "train.max_steps=2", "samples.every=0", "clean_frames.prob=0.5",
                          "clean_frames.frames=[1]")) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    exported = VideoDiT.from_pretrained(run / "export" / "transformer")
    assert exported.config.clean_frame_conditioning and exported.clean_embed.shape == (32,)
    assert "clean_frames" in rows[0] and "clean_embed" in load_tree(latest_checkpoint(run), "model")


def test_recipe_config_section_is_checked_and_a_trained_model_gets_the_embedding():
    from lvd.config import ConfigError, parse_args
    from lvd.dit.pretrained import with_clean_frames
    from recipes.train_latent_diffusion import DiTRecipeConfig

    with pytest.raises(ConfigError, match=r"clean_frames.prob=2.0 must be in \[0, 1\]"):
        parse_args(DiTRecipeConfig, ["clean_frames.prob=2"])
    assert parse_args(DiTRecipeConfig, ["clean_frames={prob: 0.3, frames: [1, 2]}"]).clean_frames.frames == [1, 2]
    trained = _randomise(VideoDiT(**TINY, attention_mode="factorized"))
    model = with_clean_frames(trained)
    assert model.config.clean_frame_conditioning and model.config.attention_mode == "factorized"
    assert not model.clean_embed.any()
    x, text = torch.randn(2, 4, 3, 4, 4), _text()
    with torch.no_grad():
        assert torch.equal(_call(model.eval(), x, text, clean_frames=1), _call(trained, x, text))
