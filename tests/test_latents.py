"""lvd.data.latents: one latent sample and the empty-prompt embedding, written and read back; old shards load."""

import pytest
import torch
from data_helpers import json_bytes, write_tar
from safetensors.torch import save, save_file

from lvd.text_embeddings import TextEmbeddings
from lvd.data import latents as latent_format
from lvd.data.loader import LatentDataConfig, make_latent_loader


def _row(L=5, D=6, Dp=4, seed=0) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(L, dtype=torch.bool)
    mask[3:] = False
    return TextEmbeddings(torch.randn(L, D, generator=g), mask, torch.randn(Dp, generator=g))


def test_sample_round_trip_is_exact():
    latents, text = torch.randn(4, 2, 3, 5), _row()
    data = latent_format.encode_sample(latents, text)
    assert latent_format.latent_shape(data) == (4, 2, 3, 5)  # from the header alone
    back, row = latent_format.decode_sample(data)
    assert torch.equal(back, latents) and back.dtype == torch.float32
    assert torch.equal(row.states, text.states) and torch.equal(row.pooled, text.pooled)
    assert row.mask.dtype == torch.bool and torch.equal(row.mask, text.mask)
    with pytest.raises(ValueError, match="one sample"):
        latent_format.encode_sample(latents[None], text)


def test_header_problems_are_named():
    text = _row()
    with pytest.raises(ValueError, match="lacks"):
        latent_format.latent_shape(latent_format.encode_tensors({latent_format.LATENTS: torch.zeros(1, 1, 1, 1)}))
    with pytest.raises(ValueError, match="must be \\(C, T, H, W\\)"):
        latent_format.latent_shape(latent_format.encode_tensors({
            latent_format.LATENTS: torch.zeros(1, 1, 1), latent_format.TEXT_STATES: text.states,
            latent_format.TEXT_MASK: text.mask.to(torch.uint8), latent_format.TEXT_POOLED: text.pooled}))
    with pytest.raises(ValueError, match="unreadable"):
        latent_format.latent_shape(b"\x01")


def test_uncond_round_trip(tmp_path):
    empty = TextEmbeddings(*(x[None] for x in (_row().states, _row().mask, _row().pooled)))  # batch 1
    path = latent_format.write_uncond(tmp_path, empty)
    assert path == latent_format.uncond_path(tmp_path) and path.name == latent_format.UNCOND_FILE
    assert not list(tmp_path.glob("*.tmp"))
    back = latent_format.read_uncond(path)
    assert back.mask.dtype == torch.bool and torch.equal(back.mask, empty.mask)
    assert torch.equal(back.states, empty.states) and torch.equal(back.pooled, empty.pooled)


def test_shards_written_before_the_format_had_an_owner_still_load(tmp_path):
    """The on-disk names are spelled out here on purpose: they are the format older shards were written in."""
    members = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        tensors = {"latents": torch.randn(4, 2, 3, 3, generator=g), "text_states": torch.randn(5, 6, generator=g),
                   "text_mask": torch.ones(5, dtype=torch.uint8), "text_pooled": torch.randn(4, generator=g)}
        members += [(f"k{i}.latents.safetensors", save(tensors)), (f"k{i}.txt", f"caption {i}".encode()),
                    (f"k{i}.json", json_bytes({"latent_shape": [4, 2, 3, 3]}))]
    write_tar(tmp_path / "shard-000000.tar", members)
    save_file({"text_states": torch.zeros(1, 5, 6), "text_mask": torch.zeros(1, 5, dtype=torch.uint8),
               "text_pooled": torch.zeros(1, 4)}, str(tmp_path / "uncond.safetensors"))
    cfg = LatentDataConfig(shards=str(tmp_path), batch_size=4, shuffle=0, workers=0, epochs=1)
    (batch,) = list(make_latent_loader(cfg, seed=0))
    assert batch["latents"].shape == (4, 4, 2, 3, 3) and batch["text"].states.shape == (4, 5, 6)
    assert batch["text"].mask.all() and batch["caption"] == [f"caption {i}" for i in range(4)]
    empty = latent_format.read_uncond(latent_format.uncond_path(tmp_path))
    assert empty.states.shape == (1, 5, 6) and not empty.mask.any()
