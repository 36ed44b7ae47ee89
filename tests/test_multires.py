"""Multi-resolution latents end to end: clips of three aspect ratios → lvd.cache_latents --buckets → per-bucket
latent batches → two steps of the stage-2 recipe on mixed buckets."""

import json
from pathlib import Path

import pytest
import torch
from data_helpers import frames_with_index, json_bytes, write_tar, write_with_ffmpeg
from test_cache_latents import make_components

from lvd.cache_latents import buckets_from_config, fit_clip, main as cache_main, parse_buckets
from lvd.data import latents as latent_format
from lvd.data.codecs import Bucket
from lvd.data.loader import LatentDataConfig, make_latent_loader
from lvd.data.shards import read_tar_samples

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(64, 64), (64, 112), (112, 64)]  # (H, W): 1:1, 16:9-ish, 9:16-ish
BUCKETS = "16x16,16x28,28x16"  # pixel HxW; the tiny VAE (2x space, 4x time) makes 8x8, 8x14, 14x8 latents


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One clip shard holding two 9-frame clips of each aspect ratio, and its latents cached into buckets."""
    root = tmp_path_factory.mktemp("multires")
    vae_dir, text_dir = make_components(root)
    members = []
    for i in range(6):
        h, w = SIZES[i % 3]
        mp4 = write_with_ffmpeg(root / f"c{i}.mp4", frames_with_index(9, h, w), fps=8).read_bytes()
        members += [(f"c{i:03d}.mp4", mp4), (f"c{i:03d}.txt", b"a red circle moving left"),
                    (f"c{i:03d}.json", json_bytes({"num_frames": 9, "height": h, "width": w}))]
    (root / "clips").mkdir()
    write_tar(root / "clips" / "shard-000000.tar", members)
    assert cache_main(["--shards", str(root / "clips"), "--out", str(root / "latents"), "--vae", str(vae_dir),
                       "--text-encoder", str(text_dir), "--buckets", BUCKETS, "--frames", "9", "--quiet"]) == 0
    return root, vae_dir, text_dir


def test_each_clip_lands_in_the_bucket_of_its_aspect_ratio(mixed):
    root, _, _ = mixed
    (shard,) = sorted((root / "latents").glob("*.tar"))
    got = {}
    for s in read_tar_samples(shard):
        meta = json.loads(s["json"])
        shape = latent_format.latent_shape(s[latent_format.MEMBER])
        assert list(shape) == meta["latent_shape"]
        got[s["__key__"]] = (meta["height"], meta["width"]), meta["bucket"], shape
    for i in range(6):
        clip, bucket, shape = got[f"c{i:03d}"]
        assert clip == SIZES[i % 3]
        want = {(64, 64): (16, 16), (64, 112): (16, 28), (112, 64): (28, 16)}[clip]
        assert (bucket["frames"], bucket["height"], bucket["width"]) == (9, *want)
        assert shape == (4, 3, want[0] // 2, want[1] // 2)


def test_mixed_buckets_in_one_shard_batch_one_shape_each(mixed):
    root, _, _ = mixed
    cfg = LatentDataConfig(shards=str(root / "latents"), batch_size=2, shuffle=6, workers=0, epochs=1)
    batches = list(make_latent_loader(cfg, seed=0))
    assert sorted(tuple(b["latents"].shape) for b in batches) == [(2, 4, 3, 8, 8), (2, 4, 3, 8, 14), (2, 4, 3, 14, 8)]
    for b in batches:  # each batch: one bucket, its keys the clips of one aspect ratio
        assert len({int(k[1:]) % 3 for k in b["key"]}) == 1 and b["text"].states.shape[0] == 2


def test_stage2_recipe_trains_on_mixed_buckets(mixed, tmp_path):
    from recipes.train_latent_diffusion import main

    root, vae_dir, text_dir = mixed
    run = tmp_path / "run"
    assert main(["--config", str(ROOT / "recipes/configs/shapes_dit.yaml"), f"run.dir={run}",
                 f"data.shards={root / 'latents'}", f"components.vae={vae_dir}", f"components.text_encoder={text_dir}",
                 "data.batch_size=2", "data.workers=0", "data.shuffle=6", "diffusion.dynamic_shift=true",
                 "model.overrides={hidden_size: 32, depth: 1, num_heads: 2, patch_size: [1, 2, 2]}",
                 "train.cpu_threads=1", "train.progress=false", "train.log_every=1", "train.max_steps=3",
                 "checkpoint.every=100", "samples.every=0", "components.text_max_length=8"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    # the export keeps the shift dynamic, so each generated size gets the shift its token count trained with
    from lvd.pipeline import LVDPipeline
    from lvd.pipeline.sampling import dynamic_shift_mu

    pipe = LVDPipeline.from_pretrained(run / "export")
    assert pipe.scheduler.config.use_dynamic_shifting
    mus = {size: dynamic_shift_mu(pipe.scheduler, (1, 4, 3, size[0] // 2, size[1] // 2), pipe.patch_size)
           for size in ((16, 16), (16, 28))}
    assert mus[(16, 16)] < mus[(16, 28)]
    pipe.set_progress_bar_config(disable=True)
    video = pipe("a red circle moving left", num_frames=9, height=16, width=28, num_inference_steps=2,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 9, 3, 16, 28) and torch.isfinite(video).all()


def test_fit_clip_resizes_and_crops_into_the_nearest_aspect():
    buckets = parse_buckets("16x16,16x28,28x16", 5)
    video = torch.full((3, 9, 36, 60), 255, dtype=torch.uint8)  # 3:5, nearest 16:28
    x, b = fit_clip(video, buckets)
    assert (b.frames, b.height, b.width) == (5, 16, 28) and x.shape == (3, 5, 16, 28)
    torch.testing.assert_close(x, torch.ones_like(x))
    with pytest.raises(ValueError, match="fewer than every bucket"):
        fit_clip(video[:, :3], buckets)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_buckets("16x16,wide", 5)


def test_ucf101_config_buckets_are_producible(tmp_path):
    """The latent buckets of ucf101_dit_256.yaml, turned into pixels with its VAE (4x time, 8x space), fit that VAE."""
    from lvd.vae import CausalVideoVAE

    buckets = buckets_from_config(ROOT / "recipes/configs/ucf101_dit_256.yaml", temporal_compression=4,
                                  spatial_compression=8)
    assert [(b.frames, b.height, b.width) for b in buckets] == [(17, 256, 256), (17, 256, 320)]
    with torch.device("meta"):
        vae = CausalVideoVAE.from_preset("small")
    assert (vae.temporal_compression, vae.spatial_compression) == (4, 8)
    for b in buckets:
        assert vae.latent_shape(b.frames, b.height, b.width)[1:] in [(5, 32, 32), (5, 32, 40)]
    x, b = fit_clip(torch.zeros(3, 20, 240, 320, dtype=torch.uint8), buckets)  # UCF-101's 4:3 frames
    assert (b.height, b.width) == (256, 320) and x.shape == (3, 17, 256, 320)
    assert Bucket(17, 256, 256, 1) in buckets
