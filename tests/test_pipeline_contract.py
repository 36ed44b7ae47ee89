"""LVDPipeline keeps diffusers' pipeline contract (what diffusers' own common pipeline tests check of a pipeline):
``from_pretrained``'s dtype dicts and variants reach every component, the text encoder included; nothing generation
needs is declared optional; ``encode_prompt`` returns what ``__call__`` takes, by the same names."""

import ast
import inspect
import logging
import textwrap

import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from test_pipeline import FRAMES, SIZE, pipe, pipe_dir, run, tiny_components  # noqa: F401 (pipe, pipe_dir: fixtures)

from lvd.pipeline import LVDPipeline, PromptEmbeds
from lvd.pipeline.checks import EMBEDDING_ARGS
from lvd.pipeline.pipeline import COMPONENTS

MODULES = ("transformer", "vae", "text_encoder")


def modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in MODULES}


# -- dtypes and variants ------------------------------------------------------------------------------------------


def test_a_dtype_dict_reaches_every_component_the_text_encoder_included(pipe_dir, tmp_path):
    dtypes = {"text_encoder": torch.float16, "transformer": torch.float32, "default": torch.bfloat16}
    loaded = LVDPipeline.from_pretrained(pipe_dir, dtype=dtypes)
    assert {name: m.dtype for name, m in modules(loaded).items()} == {
        "transformer": torch.float32, "vae": torch.bfloat16, "text_encoder": torch.float16}
    loaded = LVDPipeline.from_pretrained(pipe_dir, dtype={"default": torch.float16})
    assert all(m.dtype == torch.float16 for m in modules(loaded).values())
    loaded = LVDPipeline.from_pretrained(pipe_dir, dtype=torch.bfloat16)
    assert all(m.dtype == torch.bfloat16 for m in modules(loaded).values())

    # a folder that names its text encoder (text_encoder_id) gives it the same dtype
    components = tiny_components()
    LVDPipeline(**{**components, "text_encoder": None, "tokenizer": None},
                text_encoder_id="encoder").save_pretrained(tmp_path)
    for name in ("text_encoder", "tokenizer"):
        components[name].save_pretrained(tmp_path / "encoder")
    loaded = LVDPipeline.from_pretrained(tmp_path, dtype=dtypes)
    assert loaded.text_encoder.dtype == torch.float16 and loaded.vae.dtype == torch.bfloat16


def test_a_variant_loads_every_component_from_its_variant_files(tmp_path):
    """One folder, two sets of weights: the "fp16" variant (seed 0) and the plain files (seed 1)."""
    variant, plain = LVDPipeline(**tiny_components(seed=0)), LVDPipeline(**tiny_components(seed=1))
    variant.save_pretrained(tmp_path, variant="fp16")
    plain.save_pretrained(tmp_path)
    assert (tmp_path / "text_encoder" / "model.fp16.safetensors").is_file()
    for kwargs, expected in (({"variant": "fp16"}, variant), ({}, plain)):
        loaded = LVDPipeline.from_pretrained(tmp_path, **kwargs)
        for name, module in modules(loaded).items():
            want = getattr(expected, name).state_dict()
            assert all(torch.equal(value, want[key]) for key, value in module.state_dict().items()), (kwargs, name)


def test_from_pretrained_reports_every_component_it_loads(pipe_dir):
    """diffusers reports each component it loads ("Loaded vae as ..."); the text encoder, which LVDPipeline loads
    itself, is reported in the same place."""
    log, records = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils"), []
    handler, level = logging.Handler(), log.level
    handler.emit = records.append
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        LVDPipeline.from_pretrained(pipe_dir)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    report = "\n".join(record.getMessage() for record in records)
    assert all(f"Loaded {name} as" in report for name in COMPONENTS), report


# -- optional components ------------------------------------------------------------------------------------------


def test_nothing_generation_needs_is_declared_optional(pipe):
    """diffusers' meaning of optional: the pipeline runs without it. Each component is needed to generate from a
    prompt, so none is declared optional, and every one is a registered component."""
    for name in LVDPipeline._optional_components:  # each declared optional component: runs without it
        parts = {**pipe.components, name: None}
        run(LVDPipeline(**parts), output_type="latent")
    assert set(pipe.components) == set(COMPONENTS)
    for name in COMPONENTS:  # and each component is one it cannot generate without
        without = LVDPipeline(**{**pipe.components, name: None})
        with pytest.raises(ValueError, match="no "):
            run(without)


def test_a_folder_without_a_component_loads_only_when_it_is_passed_as_none(pipe, tmp_path):
    LVDPipeline(**{**pipe.components, "vae": None}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="expected"):
        LVDPipeline.from_pretrained(tmp_path)
    loaded = LVDPipeline.from_pretrained(tmp_path, vae=None)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None
    noise = torch.randn(1, 4, 2, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(loaded, latents=noise, output_type="latent").frames,
                       run(pipe, output_type="latent").frames)


# -- encode_prompt --------------------------------------------------------------------------------------------------


def test_encode_prompt_returns_the_call_arguments_by_their_names(pipe):
    call_args = inspect.signature(LVDPipeline.__call__).parameters
    assert PromptEmbeds._fields == (*EMBEDDING_ARGS["prompt"], *EMBEDDING_ARGS["negative_prompt"])
    assert all(name in call_args for name in PromptEmbeds._fields)
    # diffusers' common tests read these names from encode_prompt's return statement: they must be __call__'s
    tree = ast.parse(textwrap.dedent(inspect.getsource(LVDPipeline.encode_prompt)))
    (returned,) = [node.value for node in ast.walk(tree) if isinstance(node, ast.Return)]
    assert tuple(element.id for element in returned.elts) == PromptEmbeds._fields

    embeds = pipe.encode_prompt("a red circle", "a blue square")
    assert isinstance(embeds, PromptEmbeds) and dict(embeds).keys() == set(PromptEmbeds._fields)
    assert embeds["prompt_embeds"] is embeds.prompt_embeds is embeds[0]
    states, mask, pooled, *negatives = embeds
    assert states.shape[:2] == mask.shape and mask.dtype == torch.bool and pooled.shape[0] == 1
    assert all(n is not None for n in negatives)
    unguided = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
    assert unguided.negative_prompt_embeds is unguided.negative_pooled_prompt_embeds is None


@pytest.mark.parametrize("negative", [None, "a blue square"])
def test_encode_prompt_round_trip_gives_the_same_video_as_the_prompt(pipe, negative):
    expected = run(pipe, "a red circle moving right", negative_prompt=negative, num_videos_per_prompt=2,
                   output_type="pt").frames
    embeds = pipe.encode_prompt("a red circle moving right", negative)
    got = run(pipe, None, num_videos_per_prompt=2, output_type="pt", **embeds).frames
    assert got.shape == (2, FRAMES, 3, SIZE, SIZE) and torch.equal(got, expected)


def test_embeddings_from_a_text_only_pipeline_drive_one_without_a_text_encoder(pipe):
    """As diffusers runs encode_prompt in isolation: encode with only the text encoder, generate without it."""
    none = dict.fromkeys(COMPONENTS)
    text_only = LVDPipeline(**{**none, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer})
    no_text = LVDPipeline(**{**pipe.components, "text_encoder": None, "tokenizer": None})
    no_text.set_progress_bar_config(disable=True)
    embeds = text_only.encode_prompt("a red circle moving right", "a blue square")
    got = run(no_text, None, output_type="pt", **embeds).frames
    assert torch.equal(got, run(pipe, negative_prompt="a blue square", output_type="pt").frames)
