"""python -m lvd.cache_latents: clip shards -> latent shards that the latent loader reads back, resumable."""

import json
import os

import pytest
import torch
import transformers

from lvd.cache_latents import main
from lvd.data import latents as latent_format
from lvd.data.loader import LatentDataConfig, make_latent_loader
from lvd.data.shards import read_tar_samples
from lvd.text import TextEncoder
from lvd.vae import CausalVideoVAE
from lvd.video_io import decode_video_bytes

WORDS = "a red green blue yellow cyan magenta white circle square triangle moving left right up down".split()


def make_components(root):
    """A tiny random VAE folder and a tiny random BERT text-encoder folder (nothing downloaded)."""
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_preset("tiny", block_out_channels=(8, 8, 16), norm_num_groups=4, spatial_compression=2,
                                     latent_channels=4)
    vae.save_pretrained(root / "vae")
    (root / "text").mkdir()
    (root / "text" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = transformers.BertTokenizer(vocab_file=str(root / "text" / "vocab.txt"), model_max_length=8)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, intermediate_size=32,
                                                          num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16))
    bert.save_pretrained(root / "text")
    tok.save_pretrained(root / "text")
    return root / "vae", root / "text"


def make_clip_shards(out, count=6, shard_size=3):
    from lvd.data.shards import main as shards_main

    args = ["synthetic", "--out", str(out), "--count", str(count), "--frames", "5", "--size", "16",
            "--shard-size", str(shard_size), "--workers", "1", "--quiet"]
    assert shards_main(args) == 0
    return out


def _run(clips, out, vae_dir, text_dir, *extra):
    return main(["--shards", str(clips), "--out", str(out), "--vae", str(vae_dir), "--text-encoder", str(text_dir),
                 "--batch-size", "2", "--quiet", *extra])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Components, clip shards, and their latent shards (cached once for the module)."""
    root = tmp_path_factory.mktemp("cache")
    vae_dir, text_dir = make_components(root)
    clips = make_clip_shards(root / "clips")
    assert _run(clips, root / "latents", vae_dir, text_dir) == 0
    return root, vae_dir, text_dir, clips


def test_round_trip_matches_direct_encoding(setup):
    root, vae_dir, text_dir, clips = setup
    out = root / "latents"
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(out.glob("*.tmp")) and latent_format.uncond_path(out).is_file()

    vae = CausalVideoVAE.from_pretrained(vae_dir).eval()
    text = TextEncoder.from_pretrained(text_dir, device="cpu")
    src = {s["__key__"]: s for p in sorted(clips.glob("*.tar")) for s in read_tar_samples(p)}
    got = {s["__key__"]: s for p in sorted(out.glob("*.tar")) for s in read_tar_samples(p)}
    assert got.keys() == src.keys()
    for key, s in got.items():
        latents, row = latent_format.decode_sample(s[latent_format.MEMBER])
        video = decode_video_bytes(src[key]["mp4"]).float()[None] / 127.5 - 1
        with torch.no_grad():
            expected = vae.encode(video)[0]
        assert latents.shape == (4, 2, 8, 8) and latents.dtype == torch.float32
        torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
        emb = text([s["txt"].decode()])
        torch.testing.assert_close(row.states, emb.states[0])
        assert torch.equal(row.mask, emb.mask[0]) and row.pooled.shape == (16,)
        assert json.loads(s["json"])["latent_shape"] == [4, 2, 8, 8]

    # The training loader reads them back.
    batch = next(iter(make_latent_loader(LatentDataConfig(shards=str(out), batch_size=3, workers=0, shuffle=0), seed=0)))
    assert batch["latents"].shape == (3, 4, 2, 8, 8) and batch["text"].states.shape == (3, 8, 16)
    empty = latent_format.read_uncond(latent_format.uncond_path(out))
    torch.testing.assert_close(empty.states, text.empty().states)
    assert torch.equal(empty.mask, text.empty().mask)


def test_resume_skips_finished_shards(setup, tmp_path):
    import shutil

    root, vae_dir, text_dir, clips = setup
    out = tmp_path / "latents"
    shutil.copytree(root / "latents", out)
    first, second = out / "shard-000000.tar", out / "shard-000001.tar"
    before = first.read_bytes()
    os.utime(first, (1, 1))
    second.unlink()  # as if killed while writing the second shard (its temporary is left: it is ignored)
    (out / ".shard-000001.tar.4242-0badcafe.tmp").write_bytes(b"partial")
    assert _run(clips, out, vae_dir, text_dir) == 0
    assert first.stat().st_mtime == 1 and first.read_bytes() == before  # untouched
    assert second.is_file() and len(list(read_tar_samples(second))) == 3


def test_refuses_to_mix_vaes_in_one_folder(setup):
    root, vae_dir, text_dir, clips = setup
    with pytest.raises(SystemExit, match="different vae"):
        _run(clips, root / "latents", root / "other_vae", text_dir)


def test_bad_input_is_reported(setup, tmp_path, capsys):
    root, vae_dir, text_dir, clips = setup
    assert _run(tmp_path / "nothing", tmp_path / "o", vae_dir, text_dir) == 2
    assert "--shards" in capsys.readouterr().err
    assert _run(clips, tmp_path / "o", vae_dir, text_dir, "--frames", "3") == 2
    assert "--frames must be 1 + 4k" in capsys.readouterr().err
    assert _run(clips, tmp_path / "o", vae_dir, text_dir, "--buckets", "16x16,square", "--buckets-from", "nope.yaml") == 2
    err = capsys.readouterr().err
    assert "--buckets: entries must be HEIGHTxWIDTH" in err and "give one" in err and "nope.yaml: no such file" in err
    with pytest.raises(SystemExit, match="bucket 5x15x16: .*multiples of 2"):
        _run(clips, tmp_path / "o", vae_dir, text_dir, "--buckets", "15x16", "--frames", "5")
    assert _run(clips, tmp_path / "o", vae_dir, text_dir, "--max-side", "0") == 2
    assert "--max_side must be >= 1, got 0" in capsys.readouterr().err


def test_a_clip_the_vae_cannot_take_is_skipped_naming_shard_and_key(setup, tmp_path, caplog):
    """3 frames is not 1 + 4k: every sample is skipped, named, counted; no shard is written."""
    import collections

    from lvd.cache_latents import cache_shard

    root, vae_dir, text_dir, clips = setup
    vae = CausalVideoVAE.from_pretrained(vae_dir)
    skipped = collections.Counter()
    with caplog.at_level("WARNING", logger="lvd.cache_latents"):
        n = cache_shard(sorted(clips.glob("*.tar"))[0], tmp_path / "x.tar", vae, TextEncoder.from_pretrained(text_dir, device="cpu"),
                        batch_size=2, device=torch.device("cpu"), dtype=torch.float32, frames=3, skipped=skipped)
    assert n == 0 and skipped == {"does not fit the VAE": 3} and not (tmp_path / "x.tar").exists()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("shard-000000.tar" in ln and "shapes_0_0000000" in ln and "does not fit the VAE" in ln for ln in lines) == 1


def test_bad_samples_are_skipped_named_and_counted_and_the_rest_cached(setup, tmp_path, caplog, capsys):
    from data_helpers import json_bytes, write_tar

    from lvd.video_io import encode_video_bytes

    root, vae_dir, text_dir, clips = setup
    good = [s for p in sorted(clips.glob("*.tar")) for s in read_tar_samples(p)][:2]
    meta = {"num_frames": 5, "height": 16, "width": 16}
    members = [(f"{s['__key__']}.{e}", s[e]) for s in good for e in ("json", "mp4", "txt")]
    bad = {
        "no_mp4": [("no_mp4.json", json_bytes(meta)), ("no_mp4.txt", b"a red circle")],
        "garbage": [("garbage.json", json_bytes(meta)), ("garbage.mp4", b"\x00" * 300), ("garbage.txt", b"a red circle")],
        "oversized": [("oversized.json", json_bytes(meta)),  # json says 5x16x16, the mp4 holds 5x32x32
                      ("oversized.mp4", encode_video_bytes(torch.zeros(3, 5, 32, 32, dtype=torch.uint8), 8)),
                      ("oversized.txt", b"a red circle")],
        "../escape": [(f"../escape.{e}", good[0][e]) for e in ("json", "mp4", "txt")],
        "latin1": [("latin1.json", good[0]["json"]), ("latin1.mp4", good[0]["mp4"]), ("latin1.txt", b"caf\xe9")],
    }
    for extra in bad.values():
        members += extra
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "shard-000000.tar", members)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="lvd.cache_latents"):
        assert _run(tmp_path / "in", out, vae_dir, text_dir) == 0
    got = [s["__key__"] for s in read_tar_samples(out / "shard-000000.tar")]
    assert got == [s["__key__"] for s in good]
    lines = [r.getMessage() for r in caplog.records]
    for key, reason in (("no_mp4", "missing mp4"), ("garbage", "undecodable mp4"), ("oversized", "mp4 larger than its json"),
                        ("../escape", "unsafe key"), ("latin1", "caption not UTF-8")):
        assert sum(f"'{key}' in " in ln and "shard-000000.tar" in ln and reason in ln for ln in lines) == 1, (key, lines)
    err = capsys.readouterr().err
    assert "skipped 5 bad samples (" in err and "mp4 larger than its json: 1" in err
    # A ceiling below every clip: each is refused from its json, nothing written, status 1.
    assert _run(tmp_path / "in", tmp_path / "out2", vae_dir, text_dir, "--max-side", "8") == 1
    err = capsys.readouterr().err
    assert "no sample could be cached" in err
    assert "json larger than the ceiling: 4" in err  # every sample whose json gives its size, before any decoding
    assert not list((tmp_path / "out2").glob("*.tar"))
