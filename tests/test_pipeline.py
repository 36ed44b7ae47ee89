"""LVDPipeline on a tiny random pipeline (VideoDiT + CausalVideoVAE + CLIP text model) saved to a temp folder."""

import json
import shutil
import string

import numpy as np
import pytest
import torch
from diffusers import (
    ConfigMixin,
    DDPMScheduler,
    ModelMixin,
    AutoencoderKLWan,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import register_to_config
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lvd.diffusion import null_text_embeddings
from lvd.dit import VideoDiT
from lvd.diffusion import SAMPLERS
from lvd.pipeline import LVDPipeline, LVDPipelineOutput
from lvd.pipeline.sampling import sampler_scheduler, scheduler_objective
from lvd.text import encode_text, recorded_text_encoder
from lvd.vae import CausalVideoVAE

FRAMES, SIZE = 5, 16  # latents (4, 2, 4, 4) → 8 tokens with patch (1, 2, 2)
TEXT_DIM = 32


def tiny_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    """A character-level CLIP tokenizer built offline: every letter/digit is a token, words end in </w>."""
    chars = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(chars)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_components(objective: str = "flow", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    vae = CausalVideoVAE(latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1, spatial_compression=4,
                         temporal_compression=4, norm_num_groups=4, mid_attention=False).eval()
    transformer = VideoDiT(in_channels=4, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2,
                           text_dim=TEXT_DIM, pooled_dim=TEXT_DIM)
    for p in transformer.parameters():  # adaLN-Zero starts at an all-zero prediction: make the output depend on
        if p.ndim == 2 and not p.any():  # the text, timestep and latents
            torch.nn.init.normal_(p, std=0.2)
    transformer.eval()
    if objective == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    else:
        scheduler = DDIMScheduler(prediction_type={"eps": "epsilon", "v": "v_prediction"}[objective],
                                  timestep_spacing="trailing", clip_sample=False)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a thread pool, and on a CPU shared with busy processes every op of a
    2-thread pool waits at its barrier for a descheduled thread (~20 ms an op, measured at load 11)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    LVDPipeline(**tiny_components()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    pipeline = LVDPipeline.from_pretrained(pipe_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run(pipe, prompt="a red circle moving right", seed=0, **kwargs):
    kwargs = {"num_frames": FRAMES, "height": SIZE, "width": SIZE, "num_inference_steps": 3, **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_output_shapes_and_types(pipe):
    out = run(pipe, ["a red circle moving right", "a blue square moving up"], num_videos_per_prompt=2)
    assert isinstance(out, LVDPipelineOutput)
    assert out.frames.shape == (4, FRAMES, SIZE, SIZE, 3) and out.frames.dtype == np.float32
    assert 0.0 <= out.frames.min() and out.frames.max() <= 1.0
    assert set(out.timings) == {"text_encoding", "denoising", "denoising_per_step", "decoding"}
    pt = run(pipe, output_type="pt").frames
    assert pt.shape == (1, FRAMES, 3, SIZE, SIZE)
    pil = run(pipe, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == FRAMES and pil[0][0].size == (SIZE, SIZE)
    latent = run(pipe, output_type="latent").frames
    assert latent.shape == (1, 4, 2, SIZE // 4, SIZE // 4)
    (frames,) = run(pipe, return_dict=False)
    assert frames.shape == (1, FRAMES, SIZE, SIZE, 3)


def test_same_seed_is_bit_identical_and_other_seed_differs(pipe):
    a, b = run(pipe, seed=3, output_type="pt").frames, run(pipe, seed=3, output_type="pt").frames
    assert torch.equal(a, b)
    assert not torch.equal(a, run(pipe, seed=4, output_type="pt").frames)


def test_guidance_scale_one_is_the_plain_conditional_prediction(pipe):
    """w = 1 runs the conditional branch only; it equals a hand-written loop over transformer + scheduler."""
    prompt = "a green triangle moving down"
    got = run(pipe, prompt, seed=1, guidance_scale=1.0, output_type="latent").frames

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    text = encode_text(pipe.text_encoder, pipe.tokenizer, [prompt])
    latents = torch.randn((1, 4, 2, 4, 4), generator=torch.Generator().manual_seed(1))
    for t in scheduler.timesteps:
        pred = pipe.transformer(latents, t.expand(1).float(), text.states, text.mask, text.pooled)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    torch.testing.assert_close(got, latents, rtol=0, atol=1e-6)


def test_guidance_combines_cond_and_uncond_in_one_batch(pipe):
    """With w > 1 the denoiser sees [uncond; cond] together and the result follows u + w (c − u)."""
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[0], out)))
    try:
        run(pipe, num_inference_steps=1, guidance_scale=3.0, output_type="latent")
    finally:
        hook.remove()
    assert len(seen) == 1 and seen[0][0] == 2  # one call per step, batch 2 = uncond + cond


def test_negative_prompt_changes_the_output(pipe):
    plain = run(pipe, guidance_scale=4.0, output_type="latent").frames
    negative = run(pipe, guidance_scale=4.0, negative_prompt="a blue square", output_type="latent").frames
    assert not torch.allclose(plain, negative)


def test_empty_prompt_is_allowed(pipe):
    frames = run(pipe, "", guidance_scale=5.0).frames
    assert frames.shape == (1, FRAMES, SIZE, SIZE, 3) and np.isfinite(frames).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
def test_every_sampler_runs_or_is_refused_for_the_objective(objective, sampler):
    components = tiny_components(objective)
    pipeline = LVDPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    if objective == "flow" and sampler == "ddim":
        with pytest.raises(ValueError, match="flow"):
            pipeline.set_sampler(sampler)
        return
    pipeline.set_sampler(sampler)
    assert scheduler_objective(pipeline.scheduler) == objective
    frames = run(pipeline, num_inference_steps=4, output_type="pt").frames
    assert frames.shape == (1, FRAMES, 3, SIZE, SIZE) and torch.isfinite(frames).all()


def test_dynamic_shift_schedule_gets_mu_from_the_token_count():
    components = tiny_components()
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                               max_image_seq_len=64)
    pipeline = LVDPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    frames = run(pipeline, output_type="pt").frames
    assert torch.isfinite(frames).all()


def test_empty_prompt_uses_the_cfg_dropout_embedding(pipe):
    """"" with no negative prompt: both CFG halves are the empty-prompt embedding training dropped to."""
    embeds = pipe.encode_prompt([""], None, True, num_videos_per_prompt=2)
    null = null_text_embeddings(pipe.text_encoder, pipe.tokenizer, 1)
    assert embeds.prompt_embeds.shape[0] == embeds.negative_prompt_embeds.shape[0] == 2
    for states, mask in ((embeds.prompt_embeds, embeds.prompt_attention_mask),
                         (embeds.negative_prompt_embeds, embeds.negative_prompt_attention_mask)):
        for row in range(2):
            assert torch.equal(states[row], null.states[0]) and torch.equal(mask[row], null.mask[0])


class OracleDenoiser(ModelMixin, ConfigMixin):
    """The exact model for data that is one fixed latent x0: it returns the true velocity / eps / v at every
    (x_t, t), so any sampler that uses the pipeline's conventions (timestep scale, sign, objective) lands on x0."""

    @register_to_config
    def __init__(self, objective: str = "flow", patch_size: tuple = (1, 2, 2), in_channels: int = 4):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.x0 = None
        self.alphas_cumprod = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012).alphas_cumprod

    def forward(self, x_t, timestep, text_states, text_mask=None, text_pooled=None):
        x0 = self.x0.expand_as(x_t)
        if self.config.objective == "flow":  # x_t = (1 − σ) x0 + σ ε, velocity ε − x0 = (x_t − x0) / σ
            sigma = (timestep / 1000).clamp(min=1e-4).view(-1, 1, 1, 1, 1)
            return (x_t - x0) / sigma
        abar = self.alphas_cumprod[timestep.round().long()].view(-1, 1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps if self.config.objective == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0


@pytest.mark.parametrize("objective, sampler", [
    ("flow", "euler"), ("flow", "dpm++"), ("flow", "unipc"),
    ("eps", "euler"), ("eps", "ddim"), ("eps", "dpm++"), ("eps", "unipc"), ("v", "ddim"), ("v", "dpm++"),
])
def test_every_sampler_reaches_the_data_with_an_exact_model(objective, sampler):
    components = tiny_components(objective)
    if objective != "flow":
        components["scheduler"] = DDIMScheduler(prediction_type={"eps": "epsilon", "v": "v_prediction"}[objective],
                                                beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    components["transformer"] = OracleDenoiser(objective=objective)
    x0 = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    components["transformer"].x0 = x0
    pipeline = LVDPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.set_sampler(sampler)
    got = run(pipeline, num_inference_steps=10, guidance_scale=1.0, output_type="latent").frames
    error = (got - x0).abs()
    # DDIM (set_alpha_to_one=False) stops at ᾱ_0 = 1 − β_0 and keeps √β_0 ≈ 0.029 of the noise (mean |err| 0.023)
    assert error.mean() < 0.04 and error.max() < 0.2, (error.mean(), error.max())


def test_sampler_scheduler_classes():
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert isinstance(sampler_scheduler(flow, "euler"), FlowMatchEulerDiscreteScheduler)
    dpm = sampler_scheduler(flow, "dpm++")
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.flow_shift == 3.0
    assert isinstance(sampler_scheduler(flow, "unipc"), UniPCMultistepScheduler)
    eps = DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    euler = sampler_scheduler(eps, "euler")
    assert isinstance(euler, EulerDiscreteScheduler) and euler.config.prediction_type == "v_prediction"
    assert euler.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_scheduler(flow, "heun")


def test_save_and_load_round_trip(pipe_dir, pipe, tmp_path):
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["_class_name"] == "LVDPipeline"
    assert index["transformer"] == ["lvd.dit.model", "VideoDiT"]
    assert index["vae"] == ["lvd.vae.model", "CausalVideoVAE"]
    pipe.save_pretrained(tmp_path / "again")
    again = LVDPipeline.from_pretrained(tmp_path / "again")
    again.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert torch.equal(run(pipe, output_type="pt").frames, run(again, output_type="pt").frames)
    # transformers >= 5.25 turns hub kernels on by default; ours are loaded with them off (nothing fetched)
    assert getattr(again.text_encoder, "use_kernels", False) is False


def test_a_folder_can_refer_to_its_text_encoder_by_name(tmp_path):
    """text_encoder_id: the folder holds no text_encoder/ or tokenizer/; loading resolves the name (here a folder
    inside the model folder; for the demo the packaged all-MiniLM-L6-v2) and gives the same video."""
    components = tiny_components()
    pipeline = LVDPipeline(**components, text_encoder_id="encoder")
    pipeline.set_progress_bar_config(disable=True)
    expected = run(pipeline, output_type="pt").frames
    pipeline.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["model_index.json", "scheduler", "transformer",
                                                                      "vae"]
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["text_encoder_id"] == "encoder" and index["text_encoder"] == [None, None]
    assert pipeline.config.text_encoder == ("transformers", "CLIPTextModel")  # unchanged in memory
    for name in ("text_encoder", "tokenizer"):  # the shared encoder, inside the model folder
        components[name].save_pretrained(tmp_path / "pipe" / "encoder")
    again = LVDPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    assert torch.equal(run(again, output_type="pt").frames, expected)
    assert getattr(again.text_encoder, "use_kernels", False) is False

    # An export can be written without ever loading the encoder.
    bare = {**components, "text_encoder": None, "tokenizer": None}
    LVDPipeline(**bare, text_encoder_id="encoder").save_pretrained(tmp_path / "bare")
    shutil.copytree(tmp_path / "pipe" / "encoder", tmp_path / "bare" / "encoder")
    loaded = LVDPipeline.from_pretrained(tmp_path / "bare")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(loaded, output_type="pt").frames, expected)
    with pytest.raises(ValueError, match="no text_encoder/tokenizer"):
        run(LVDPipeline(**bare))


def test_a_recorded_text_encoder_cannot_reach_outside_the_model_folder(tmp_path):
    """A downloaded folder's text_encoder_id may name a packaged encoder, a folder inside it or a cached hub id;
    an absolute path, '..' or a symlink out is refused naming the file and value. The caller's own path loads."""
    components = tiny_components()
    outside = tmp_path / "elsewhere"
    for name in ("text_encoder", "tokenizer"):
        components[name].save_pretrained(outside)
    bare = {**components, "text_encoder": None, "tokenizer": None}
    for recorded, why in ((str(outside), "outside the model folder"), ("../elsewhere", "outside the model folder"),
                          ("link", "link out of the model folder"), ("not a name!", "not a packaged encoder")):
        folder = tmp_path / f"pipe_{abs(hash(recorded))}"
        LVDPipeline(**bare, text_encoder_id=recorded).save_pretrained(folder)
        (folder / "link").symlink_to(outside, target_is_directory=True)
        with pytest.raises(ValueError, match=f"model_index.json: text_encoder_id=.*{why}"):
            LVDPipeline.from_pretrained(folder)
        chosen = LVDPipeline.from_pretrained(folder, text_encoder_id=str(outside))  # the caller's own choice
        assert chosen.text_encoder is not None and chosen.config.text_encoder_id == str(outside)
    assert recorded_text_encoder("all-MiniLM-L6-v2", tmp_path) == "all-MiniLM-L6-v2"  # packaged
    assert recorded_text_encoder("openai/clip-vit-base-patch32", tmp_path) == "openai/clip-vit-base-patch32"  # hub


def test_a_diffusers_video_vae_works_as_the_vae_component(tmp_path):
    """A diffusers AutoencoderKLWan (wrapped by as_video_vae at use time) generates, saves and reloads."""
    components = tiny_components()
    components["vae"] = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True], attn_scales=[],
                                         latents_mean=[0.1] * 4, latents_std=[2.0] * 4).eval()
    pipeline = LVDPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.size_problems(5, 16, 16) == [] and "multiple of 16" in pipeline.size_problems(5, 8, 8)[0]
    frames = run(pipeline, output_type="pt").frames
    assert frames.shape == (1, FRAMES, 3, 16, 16)
    pipeline.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKLWan"]
    again = LVDPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(frames, run(again, output_type="pt").frames)
    torch.testing.assert_close(run(again, output_type="pt", vae_tiling=True).frames, frames, rtol=0, atol=1e-5)


def test_tiled_decode_matches_full_decode(pipe):
    latents = run(pipe, ["a", "b"], output_type="latent").frames
    full = pipe.decode_latents(latents, vae_tiling=False)
    pipe.vae_tiling_threshold = 0  # auto: every video is "large" → tiled, one video at a time
    try:
        tiled = pipe.decode_latents(latents, vae_tiling=None)
    finally:
        del pipe.vae_tiling_threshold  # back to the class default
    torch.testing.assert_close(tiled, full, rtol=1e-4, atol=1e-4)
    assert pipe.vae.tiling is None  # auto tiling is switched off again


def test_model_cpu_offload_gives_the_same_video():
    """enable_model_cpu_offload hooks every component (VAE decode included, which is not forward). On a CPU the
    "accelerator" is cpu:0, so this checks the plumbing; on a GPU the same hooks move each model in turn."""
    pipeline = LVDPipeline(**tiny_components())
    pipeline.set_progress_bar_config(disable=True)
    expected = run(pipeline, output_type="pt").frames
    pipeline.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(getattr(pipeline, name), "_hf_hook") for name in ("text_encoder", "transformer", "vae"))
    assert torch.equal(run(pipeline, output_type="pt").frames, expected)
    assert torch.equal(run(pipeline, output_type="pt").frames, expected)  # hooks re-armed after the first call


def test_callback_on_step_end_sees_every_step_and_can_stop(pipe):
    steps = []

    def callback(pipeline, i, t, kwargs):
        steps.append((i, kwargs["latents"].shape))
        if i == 1:
            pipeline._interrupt = True
        return {}

    run(pipe, num_inference_steps=5, callback_on_step_end=callback, output_type="latent")
    assert [i for i, _ in steps] == [0, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_frames=6), r"num_frames=6 .*nearest: 5 or 9"),
        (dict(height=20), r"height=20 must be a positive multiple of 8"),
        (dict(width=12), r"width=12 must be a positive multiple of 8"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
        (dict(output_type="mp4"), "output_type"),
        (dict(negative_prompt=["x", "y"]), "negative_prompt has 2 entries"),
    ],
)
def test_bad_arguments_are_refused_before_sampling(pipe, kwargs, message):
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            run(pipe, **kwargs)
    finally:
        hook.remove()
    assert not calls


def test_all_problems_are_reported_at_once(pipe):
    with pytest.raises(ValueError) as err:
        run(pipe, num_frames=4, height=10, num_inference_steps=-1)
    assert "num_frames" in str(err.value) and "height" in str(err.value) and "num_inference_steps" in str(err.value)


# -- the contract diffusers users expect --------------------------------------------------------------


def positive(embeds) -> dict:
    """The prompt's half of encode_prompt's output (the negatives left to the pipeline)."""
    return {name: embeds[name] for name in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")}


def test_encode_prompt_takes_a_plain_string_as_one_row(pipe):
    embeds = pipe.encode_prompt("a red circle")
    assert embeds.prompt_embeds.shape[0] == embeds.prompt_attention_mask.shape[0] == 1
    assert embeds.pooled_prompt_embeds.shape[0] == 1
    listed = pipe.encode_prompt(["a red circle"])
    assert torch.equal(embeds.prompt_embeds, listed.prompt_embeds)
    assert embeds.negative_prompt_embeds.shape == embeds.prompt_embeds.shape
    assert pipe.encode_prompt("a red circle", do_classifier_free_guidance=False).negative_prompt_embeds is None


def test_prompt_embeds_give_the_same_video_as_the_prompt(pipe):
    for negative in (None, "a blue square"):
        expected = run(pipe, negative_prompt=negative, num_videos_per_prompt=2, output_type="latent").frames
        embeds = pipe.encode_prompt("a red circle moving right", negative)
        got = run(pipe, None, num_videos_per_prompt=2, output_type="latent", **embeds).frames
        assert torch.equal(got, expected)
        # prompt embeddings with the negative (or empty) prompt encoded by the pipeline
        got = run(pipe, None, negative_prompt=negative, num_videos_per_prompt=2, output_type="latent",
                  **positive(embeds)).frames
        assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="a red circle"), "give prompt or prompt_embeds, not both"),
    (dict(prompt_attention_mask=None), "prompt_embeds needs prompt_attention_mask"),
    (dict(pooled_prompt_embeds=None), "prompt_embeds needs pooled_prompt_embeds"),
    (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 32, 32),
          negative_prompt_attention_mask=torch.ones(1, 32, dtype=torch.bool),
          negative_pooled_prompt_embeds=torch.zeros(1, 32)), "give negative_prompt or negative_prompt_embeds"),
    (dict(negative_prompt_attention_mask=torch.ones(1, 32)), "negative_prompt_attention_mask given without"),
    (dict(prompt_attention_mask=torch.ones(1, 5)), r"expected \(B, L, D\), \(B, L\)"),
])
def test_bad_prompt_embeddings_are_refused_before_sampling(pipe, kwargs, message):
    embeds = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
    arguments = {"prompt": None, **positive(embeds), **kwargs}
    with pytest.raises(ValueError, match=message):
        run(pipe, **arguments)
    with pytest.raises(ValueError, match="give prompt"):
        run(pipe, None)


def test_components_can_be_none(pipe, tmp_path):
    """LVDPipeline(vae=None, ...) builds; text encoder + tokenizer alone encode prompts (also saved, and reloaded
    with the missing components passed as None, as diffusers loads a folder without a required component);
    transformer + scheduler alone generate latents from given embeddings and noise, as the whole pipeline does."""
    parts = {name: getattr(pipe, name) for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")}
    assert LVDPipeline(**{**parts, "vae": None}).video_vae is None
    absent = dict(transformer=None, vae=None, scheduler=None)
    LVDPipeline(**absent, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="expected"):  # generation needs them: none is optional
        LVDPipeline.from_pretrained(tmp_path)
    text_only = LVDPipeline.from_pretrained(tmp_path, **absent)
    assert text_only.transformer is None and text_only.vae is None and text_only.scheduler is None
    embeds = text_only.encode_prompt("a red circle moving right")
    with pytest.raises(ValueError, match="no transformer"):
        text_only("a red circle moving right")

    denoiser_only = LVDPipeline(transformer=parts["transformer"], vae=None, text_encoder=None, tokenizer=None,
                                scheduler=parts["scheduler"])
    denoiser_only.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    got = denoiser_only(latents=noise, num_inference_steps=3, output_type="latent", **embeds).frames
    assert torch.equal(got, run(pipe, output_type="latent").frames)
    with pytest.raises(ValueError) as err:
        denoiser_only(num_inference_steps=3, **positive(embeds))  # no VAE, no text encoder for the uncond
    for message in ("output_type='latent'", "pass latents=", "negative_prompt_embeds"):
        assert message in str(err.value)


def test_a_callback_that_changes_the_guidance_scale_changes_the_following_steps(pipe):
    """As in diffusers' CFG-cutoff callbacks: from step 1 on, w = 1 (one conditional batch per step)."""
    batches = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))

    def by_return(pipeline, i, t, kwargs):
        return {"guidance_scale": 1.0} if i == 0 else {}

    def by_attribute(pipeline, i, t, kwargs):
        if i == 0:
            pipeline._guidance_scale = 1.0
        return {}

    try:
        constant = run(pipe, guidance_scale=4.0, output_type="latent").frames
        batches.clear()
        returned = run(pipe, guidance_scale=4.0, output_type="latent", callback_on_step_end=by_return).frames
        assert batches == [2, 1, 1] and pipe.guidance_scale == 1.0
        attribute = run(pipe, guidance_scale=4.0, output_type="latent", callback_on_step_end=by_attribute).frames
    finally:
        hook.remove()
    assert torch.equal(returned, attribute) and not torch.allclose(returned, constant)


def test_options_that_would_do_nothing_are_refused(pipe):
    with pytest.raises(NotImplementedError, match="attention slicing"):
        pipe.enable_attention_slicing()
    with pytest.raises(NotImplementedError, match="lvd.kernels.dispatch"):
        pipe.enable_xformers_memory_efficient_attention()
    pipe.disable_attention_slicing()  # never on: nothing to do
    pipe.disable_xformers_memory_efficient_attention()


def test_video_vae_is_built_once_per_vae():
    def wan():
        return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True], attn_scales=[]).eval()

    pipeline = LVDPipeline(**{**tiny_components(), "vae": wan()})
    first = pipeline.video_vae
    assert pipeline.video_vae is first and first.model is pipeline.vae
    pipeline.vae = wan()
    assert pipeline.video_vae is not first and pipeline.video_vae.model is pipeline.vae
    pipeline.register_modules(vae=None)
    assert pipeline.video_vae is None


def test_from_components_and_export_pipeline_round_trip(tmp_path):
    """Folders, names and the training objective in; export_pipeline's folder loads and gives the same video."""
    from lvd.diffusion import DiffusionConfig
    from lvd.pipeline import export_pipeline

    components = tiny_components()
    components["transformer"].save_pretrained(tmp_path / "transformer")
    components["vae"].save_pretrained(tmp_path / "vae")
    components["text_encoder"].save_pretrained(tmp_path / "encoder")
    components["tokenizer"].save_pretrained(tmp_path / "encoder")
    built = LVDPipeline.from_components(transformer=tmp_path / "transformer", vae=str(tmp_path / "vae"),
                                        text_encoder=str(tmp_path / "encoder"), text_max_length=28,
                                        diffusion=DiffusionConfig(objective="flow"))
    built.set_progress_bar_config(disable=True)
    assert built.tokenizer.model_max_length == 28 and type(built.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    expected = run(built, output_type="pt").frames
    (tmp_path / "notes.txt").write_text("trained for 5 steps")
    out = export_pipeline(built, tmp_path / "export", extra_files={"metrics/notes.txt": tmp_path / "notes.txt"})
    assert (out / "metrics" / "notes.txt").read_text() == "trained for 5 steps" and not (tmp_path / "export.tmp").exists()
    again = LVDPipeline.from_pretrained(out)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(run(again, output_type="pt").frames, expected)

    # a scheduler folder and a text encoder referred to by name: the folder holds no text weights
    by_name = LVDPipeline.from_components(transformer=components["transformer"], vae=components["vae"],
                                          scheduler=out / "scheduler", text_encoder_id=str(tmp_path / "encoder"))
    export_pipeline(by_name, tmp_path / "by_name")
    assert not (tmp_path / "by_name" / "text_encoder").exists()
    with pytest.raises(ValueError, match="scheduler= or diffusion=.*tokenizer= too"):
        LVDPipeline.from_components(transformer=components["transformer"], scheduler=components["scheduler"],
                                    diffusion=DiffusionConfig(), text_encoder=components["text_encoder"])
