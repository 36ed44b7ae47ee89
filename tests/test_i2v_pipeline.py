"""Clean first frames at sampling: lvd.pipeline.sampling.sample's clean_latents, LVDPipeline(image=, video=) and extend."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
from test_pipeline import SIZE, tiny_components

from lvd.diffusion import SAMPLERS, DiffusionConfig, make_sampling_scheduler
from lvd.dit import VideoDiT
from lvd.pipeline import LVDPipeline
from lvd.pipeline.sampling import sample
from lvd.text_embeddings import TextEmbeddings

PROMPT = "a red circle moving right"


def _text(b):
    return TextEmbeddings(torch.zeros(b, 2, 4), torch.ones(b, 2, dtype=torch.bool), torch.zeros(b, 4))


@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_clean_latents_pass_through_every_sampler_unchanged(objective, sampler):
    if objective == "flow" and sampler == "ddim":
        pytest.skip("ddim does not fit flow")
    scheduler = make_sampling_scheduler(sampler, DiffusionConfig(objective=objective))
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 4, 2, 4, 4, generator=g)  # one prefix for a batch of 2
    calls = []

    def denoise(x, t, text, clean_frames=0):
        calls.append(clean_frames)
        assert torch.equal(x[:, :, :2], clean.expand(x.shape[0], -1, -1, -1, -1))  # the model sees them exactly
        return torch.randn(x.shape, generator=g)

    noise = torch.randn(2, 4, 5, 4, 4, generator=g) * getattr(scheduler, "init_noise_sigma", 1.0)
    out = sample(denoise, noise, scheduler, cond=_text(2), uncond=_text(2), guidance_scale=3.0,
                 num_inference_steps=4, clean_latents=clean)
    assert calls and set(calls) == {2}
    assert torch.equal(out[:, :, :2], clean.expand(2, -1, -1, -1, -1))
    assert not torch.equal(out[:, :, 2:], noise[:, :, 2:])
    with pytest.raises(ValueError, match="0 < k < T'"):
        sample(denoise, noise, scheduler, cond=_text(2), num_inference_steps=2, clean_latents=noise)


@pytest.fixture(scope="module")
def pipe():
    components = tiny_components()
    old = components["transformer"]
    config = {k: v for k, v in old.config.items() if k != "_use_default_values"}
    transformer = VideoDiT.from_config({**config, "clean_frame_conditioning": True})
    transformer.load_state_dict(old.state_dict(), strict=False)
    torch.nn.init.normal_(transformer.clean_embed, std=0.5)
    components["transformer"] = transformer.eval()
    pipeline = LVDPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _image(seed=0, size=SIZE):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)


def _run(pipe, **kwargs):
    kwargs = {"num_frames": 9, "num_inference_steps": 2, "output_type": "pt", **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).frames


def test_image_to_video_starts_at_the_decoded_image_in_every_input_form(pipe):
    image = _image()
    frames = _run(pipe, image=image, num_videos_per_prompt=2)  # (2, 9, 3, 16, 16) in [0, 1]
    assert frames.shape == (2, 9, 3, SIZE, SIZE)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[:, None].float() / 127.5 - 1  # (3, 1, H, W) in [-1, 1]
    decoded = (pipe.decode_latents(pipe.encode_clean_frames(tensor))[:, :, 0] / 2 + 0.5).clamp(0, 1)  # (1, 3, H, W)
    torch.testing.assert_close(frames[:, 0], decoded.expand(2, -1, -1, -1), atol=1e-4, rtol=0)
    one = frames[:1]
    for same in (PIL.Image.fromarray(image), tensor[:, 0], image.astype(np.float32) / 255):
        torch.testing.assert_close(_run(pipe, image=same), one, atol=1e-5, rtol=0)
    assert not torch.allclose(_run(pipe, image=_image(1))[:, 0], one[:, 0], atol=1e-2)  # another image, another start


def test_video_gives_its_latent_frames_and_the_model_is_told(pipe, monkeypatch):
    clip = np.stack([_image(s) for s in range(5)])  # (5, H, W, 3): 1 + 4 frames → 2 clean latent frames
    seen = []
    forward = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: seen.append(k.get("clean_frames")) or forward(*a, **k))
    frames = _run(pipe, video=clip, guidance_scale=1.0)
    assert frames.shape == (1, 9, 3, SIZE, SIZE) and set(seen) == {2}
    video = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1
    decoded = (pipe.decode_latents(pipe.encode_clean_frames(video)) / 2 + 0.5).clamp(0, 1)[0].transpose(0, 1)
    torch.testing.assert_close(frames[0, :5], decoded, atol=1e-4, rtol=0)


def test_extend_keeps_the_clip_and_continues_it_to_the_total_length(pipe):
    clip = torch.from_numpy(np.stack([_image(s) for s in range(6)])).permute(3, 0, 1, 2)  # (3, 6, H, W) uint8
    out = pipe.extend(clip, PROMPT, num_frames=20, window_frames=9, context_frames=5, num_inference_steps=2,
                      generator=torch.Generator().manual_seed(0))
    frames = out.frames  # "np": (1, 20, H, W, 3) in [0, 1]
    assert frames.shape == (1, 20, SIZE, SIZE, 3) and out.timings["denoising"] > 0
    assert out.timings["windows"] == 4 and out.timings["decoding"] > 0  # 6 → 10 → 14 → 18 → 22, cut at 20
    np.testing.assert_allclose(frames[0, :6], clip.permute(1, 2, 3, 0).numpy() / 255, atol=1e-6)
    with pytest.raises(ValueError, match="more than the video's 6"):
        pipe.extend(clip, PROMPT, num_frames=6)
    with pytest.raises(ValueError, match="extend sets height itself"):
        pipe.extend(clip, PROMPT, num_frames=9, height=16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=_image(size=8)), "the image is 8x8 (width x height) but the video is 16x16"),
    (dict(video=np.stack([_image()] * 4)), "video= has 4 frames; the VAE encodes 1 + 4·j frames"),
    (dict(video=np.stack([_image()] * 9)), "num_frames=9 leaves nothing to generate after the video's 9 frame(s)"),
    (dict(image=_image(), video=np.stack([_image()] * 5)), "give image= or video=, not both"),
    (dict(image="first.png"), "expected a PIL image (or a list of them), a numpy array or a torch tensor"),
    (dict(image=np.stack([_image()] * 5)), "image= is one frame, got 5"),
])
def test_bad_first_frames_are_refused_before_sampling(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        _run(pipe, height=SIZE, width=SIZE, **kwargs)


def test_size_comes_from_the_image_and_a_model_without_the_flag_warns(caplog):
    components = tiny_components()
    plain = LVDPipeline(**components)
    plain.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="lvd.pipeline"):
        frames = _run(plain, image=_image(size=8), num_frames=5)
    assert frames.shape == (1, 5, 3, 8, 8) and "was not trained with clean frames" in caplog.text
    with pytest.raises(ValueError, match="not a multiple of the transformer's temporal patch 2"):
        patched = LVDPipeline(**{**components, "transformer": VideoDiT(
            in_channels=4, patch_size=(2, 2, 2), hidden_size=32, depth=1, num_heads=2, text_dim=32, pooled_dim=32,
            clean_frame_conditioning=True)})
        _run(patched, image=_image(), num_frames=13)
