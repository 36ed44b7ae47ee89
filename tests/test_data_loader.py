"""lvd.data.loader: determinism, exact resume, split by node, resampling, buckets, no pickle, latents."""

import itertools
import pickle
import tarfile

import pytest
import torch
from data_helpers import json_bytes, write_tar

from lvd.config import ConfigError, from_dict
from lvd.data.codecs import Bucket, choose_bucket
from lvd.data.loader import ClipDataConfig, LatentDataConfig, make_clip_loader, make_latent_loader
from lvd.text_embeddings import TextEmbeddings
from lvd.data import latents as latent_format
from lvd.data.shards import main as write_shards_cli

N_CLIPS = 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 synthetic clips (9 frames, 32 px) in 6 shards, and 6 clips (5 frames, 48 px) in 2 more."""
    root = tmp_path_factory.mktemp("loader")
    args = ["--fps", "8", "--workers", "2", "--quiet", "--shard-size", "4"]
    assert write_shards_cli(["synthetic", "--count", str(N_CLIPS), "--out", str(root / "a"), "--frames", "9", "--size", "32", *args]) == 0
    assert write_shards_cli(["synthetic", "--count", "6", "--seed", "1", "--out", str(root / "b"), "--frames", "5", "--size", "48", *args]) == 0
    return root


def cfg_for(root, **kw) -> ClipDataConfig:
    base = dict(shards=str(root / "a" / "shard-{000000..000005}.tar"), frames=9, size=32, batch_size=4,
                shuffle=8, workers=0, epochs=1, drop_last=False)  # fmt: skip
    return ClipDataConfig(**{**base, **kw})


def collect(loader, n=None):
    return [(tuple(b["key"]), b["video"]) for b in itertools.islice(loader, n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(a, b))


def test_batches_and_one_epoch_covers_every_clip_once(shards):
    batches = list(make_clip_loader(cfg_for(shards), seed=0))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == N_CLIPS
    b = batches[0]
    assert b["video"].shape == (4, 3, 9, 32, 32) and b["video"].dtype == torch.float32
    assert -1 <= b["video"].min() and b["video"].max() <= 1 and b["video"].max() > 0.5
    assert all(c.startswith("a ") and " moving " in c for c in b["caption"])


def test_same_seed_same_batches_other_seed_other_order(shards):
    a = collect(make_clip_loader(cfg_for(shards), seed=0))
    b = collect(make_clip_loader(cfg_for(shards), seed=0))
    c = collect(make_clip_loader(cfg_for(shards), seed=1))
    assert same(a, b)
    assert [k for k, _ in a] != [k for k, _ in c]


@pytest.mark.parametrize(
    "workers,resampled,stops",
    [(0, False, [1, 7]), (2, False, [3, 8]), (0, True, [2])],
    ids=["in-process", "two-workers", "resampled"],
)
def test_resume_equals_uninterrupted(shards, workers, resampled, stops):
    cfg = cfg_for(shards, workers=workers, epochs=2, resampled=resampled, drop_last=True)
    total = 10 if resampled else None  # resampled streams never end
    full = collect(make_clip_loader(cfg, seed=3), total)
    assert len(full) == (10 if resampled else 12)
    for stop in stops:
        first = make_clip_loader(cfg, seed=3)
        head = collect(first, stop)
        state = first.state_dict()
        second = make_clip_loader(cfg, seed=3)
        second.load_state_dict(state)
        tail = collect(second, None if total is None else total - stop)
        assert same(head + tail, full), f"resume after {stop} batches differs"


def test_iterating_again_continues_where_it_stopped(shards):
    loader = make_clip_loader(cfg_for(shards, epochs=1), seed=0)
    head = collect(loader, 2)
    rest = collect(loader)
    assert same(head + rest, collect(make_clip_loader(cfg_for(shards, epochs=1), seed=0)))


def test_a_finished_pass_is_followed_by_the_next_epoch(shards):
    loader = make_clip_loader(cfg_for(shards, epochs=1), seed=0)
    first = [k for b in loader for k in b["key"]]
    second = [k for b in loader for k in b["key"]]  # a training loop re-iterating on StopIteration
    assert sorted(first) == sorted(second) and first != second
    two = [k for b in make_clip_loader(cfg_for(shards, epochs=2), seed=0) for k in b["key"]]
    assert first + second == two


def test_split_by_node_gives_disjoint_parts_and_resampled_ranks_differ(shards):
    parts = [{k for b in make_clip_loader(cfg_for(shards), seed=0, rank=r, world_size=2) for k in b["key"]} for r in (0, 1)]
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == N_CLIPS
    res = [collect(make_clip_loader(cfg_for(shards, resampled=True), seed=0, rank=r, world_size=2), 3) for r in (0, 1)]
    assert [k for k, _ in res[0]] != [k for k, _ in res[1]]


def test_buckets_group_by_shape_each_with_its_batch_size(shards):
    spec = str(shards / "a" / "shard-{000000..000005}.tar") + "::" + str(shards / "b" / "shard-{000000..000001}.tar")
    buckets = [Bucket(frames=9, height=32, width=32, batch_size=4), Bucket(frames=5, height=48, width=48, batch_size=2)]
    cfg = ClipDataConfig(shards=spec, buckets=buckets, shuffle=30, workers=0, epochs=1, drop_last=False)
    seen = 0
    for b in make_clip_loader(cfg, seed=0):
        shape = tuple(b["video"].shape)
        assert shape in {(4, 3, 9, 32, 32), (2, 3, 5, 48, 48)}
        seen += shape[0]
    assert seen == N_CLIPS + 6


def test_choose_bucket_prefers_aspect_then_no_upscaling_then_area():
    buckets = [Bucket(17, 512, 512, 8), Bucket(17, 1024, 1024, 2), Bucket(17, 576, 1024, 4), Bucket(33, 512, 512, 4)]
    assert choose_bucket(buckets, 17, 1080, 1080) == 1  # 1024 px source -> 1024 bucket
    assert choose_bucket(buckets, 17, 600, 600) == 0  # no upscaling to 1024
    assert choose_bucket(buckets, 17, 720, 1280) == 2  # 16:9 -> the 16:9 bucket
    assert choose_bucket(buckets, 40, 512, 512) == 3  # enough frames for the longer bucket
    assert choose_bucket(buckets, 9, 512, 512) is None  # too short for every bucket


def test_crops_random_or_centre_and_resize(shards):
    def by_key(seed, **kw):
        cfg = cfg_for(shards, shards=str(shards / "a" / "shard-{000000..000001}.tar"), frames=5, **kw)
        return {k: v for b in make_clip_loader(cfg, seed=seed) for k, v in zip(b["key"], b["video"])}

    centre = [by_key(s, size=16, random_crop=False) for s in (0, 1)]  # 32 -> 16 px resize, first 5 frames
    assert next(iter(centre[0].values())).shape == (3, 5, 16, 16)
    assert centre[0].keys() == centre[1].keys() and all(torch.equal(centre[0][k], centre[1][k]) for k in centre[0])
    rand = [by_key(s, size=24) for s in (0, 1)]  # random 24 px crops of 32 px frames, random window
    assert sum(not torch.equal(rand[0][k], rand[1][k]) for k in rand[0]) >= 6


def test_pickle_member_duplicate_key_and_bad_caption_are_skipped_and_counted(shards, tmp_path):
    with tarfile.open(shards / "a" / "shard-000000.tar") as tar:
        good = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({n.split(".")[0] for n in good})
    k0, k1, k2, k3 = keys
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # unpickling this would create the marker file
            return (open, (str(marker), "w"))

    members = [(f"{k0}.{e}", good[f"{k0}.{e}"]) for e in ("json", "mp4", "txt")]
    members += [(f"{k1}.{e}", good[f"{k1}.{e}"]) for e in ("json", "mp4", "txt")] + [(f"{k1}.pyd", pickle.dumps(Evil()))]
    members += [(f"{k2}.{e}", good[f"{k2}.{e}"]) for e in ("json", "mp4")] + [(f"{k2}.txt", b"caf\xe9")]
    members += [(f"{k3}.{e}", good[f"{k3}.{e}"]) for e in ("json", "mp4", "txt")]
    members += [(f"{k0}.{e}", good[f"{k0}.{e}"]) for e in ("json", "mp4", "txt")]  # k0 again: duplicate key
    write_tar(tmp_path / "bad.tar", members)
    loader = make_clip_loader(ClipDataConfig(shards=str(tmp_path / "bad.tar"), frames=9, size=32, batch_size=1,
                                             shuffle=0, workers=0, epochs=1, drop_last=False), seed=0)  # fmt: skip
    keys_out = [k for b in loader for k in b["key"]]
    assert keys_out == [k0, k3]
    assert loader.skipped == {"pickle member .pyd": 1, "caption not UTF-8": 1, "duplicate key": 1}
    assert not marker.exists()


def latent_sample(shape, text_len, seed) -> bytes:
    """One sample's latents.safetensors bytes: random latents of ``shape`` and a ``text_len``-token caption."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(*shape, generator=g)
    text = TextEmbeddings(torch.randn(text_len, 6, generator=g), torch.ones(text_len, dtype=torch.bool),
                          torch.randn(5, generator=g))
    return latent_format.encode_sample(latents, text)


def test_latent_loader_batches_one_shape_each_and_resumes(tmp_path):
    members = []
    for i in range(10):
        shape = (4, 3, 4, 4) if i % 2 else (4, 2, 6, 6)
        members += [(f"s{i:03d}.{latent_format.MEMBER}", latent_sample(shape, 5 + i % 3, i)),
                    (f"s{i:03d}.txt", f"caption {i}".encode()), (f"s{i:03d}.json", json_bytes({"i": i}))]  # fmt: skip
    write_tar(tmp_path / "lat-000000.tar", members)
    cfg = LatentDataConfig(shards=str(tmp_path / "lat-{000000..000000}.tar"), batch_size=2, shuffle=4, workers=0, epochs=1,
                           buckets=[Bucket(frames=2, height=6, width=6, batch_size=5)])  # fmt: skip
    batches = list(make_latent_loader(cfg, seed=0))
    shapes = sorted(tuple(b["latents"].shape) for b in batches)
    assert shapes == [(2, 4, 3, 4, 4), (2, 4, 3, 4, 4), (5, 4, 2, 6, 6)]  # odd bucket: 1 of 5 dropped (drop_last)
    for b in batches:
        n = b["latents"].shape[0]
        text = b["text"]
        assert isinstance(text, TextEmbeddings) and len(text) == n and text.mask.dtype == torch.bool
        assert text.mask.sum(1).tolist() == [5 + int(k[1:]) % 3 for k in b["key"]]  # padding is masked
        assert text.pooled.shape == (n, 5) and b["caption"] == [f"caption {int(k[1:])}" for k in b["key"]]
    first = make_latent_loader(cfg, seed=0)
    head = [b["key"] for b in itertools.islice(first, 1)]
    second = make_latent_loader(cfg, seed=0)
    second.load_state_dict(first.state_dict())
    assert head + [b["key"] for b in second] == [b["key"] for b in batches]


def test_config_errors_name_the_problem(shards, tmp_path):
    with pytest.raises(ValueError, match="shards is empty"):
        ClipDataConfig()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ClipDataConfig(shards="x.tar", batch_size=0)
    with pytest.raises(ValueError, match="shard-000006.tar' does not exist \(and 3 more\)"):
        make_clip_loader(ClipDataConfig(shards=str(shards / "a" / "shard-{000000..000009}.tar")), seed=0)
    cfg = from_dict(ClipDataConfig, {"shards": str(shards / "a"), "buckets": [{"frames": 9, "height": 32, "width": 32, "batch_size": 2}]})
    assert cfg.buckets == [Bucket(9, 32, 32, 2)]
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        from_dict(ClipDataConfig, {"shards": "x.tar", "batchsize": 2})
    state = make_clip_loader(cfg_for(shards, workers=0), seed=0).state_dict()
    with pytest.raises(ValueError, match="workers: saved 1, now 2"):
        make_clip_loader(cfg_for(shards, workers=2), seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed: saved 0, now 5"):
        make_clip_loader(cfg_for(shards), seed=5).load_state_dict(state)


def test_a_truncated_shard_is_reported_and_the_rest_still_loads(shards, tmp_path):
    data = (shards / "a" / "shard-000000.tar").read_bytes()
    (tmp_path / "shard-000000.tar").write_bytes(data[: len(data) // 2])  # cut inside a member
    (tmp_path / "shard-000001.tar").write_bytes((shards / "a" / "shard-000001.tar").read_bytes())
    loader = make_clip_loader(cfg_for(shards, shards=str(tmp_path), shuffle=0), seed=0)
    keys = [k for b in loader for k in b["key"]]
    assert 4 <= len(keys) < 8 and len(set(keys)) == len(keys)
    assert sum(loader.skipped.values()) >= 1


def test_pipe_commands_and_urls_in_shards_are_refused_unless_allowed(tmp_path):
    """webdataset runs 'pipe:' shards through a shell: a data spec never runs a command unless the config allows it."""
    from lvd.data.loader import expand_shards

    for spec in (f"pipe:touch {tmp_path / 'ran'}", "https://example.com/shard-{000000..000001}.tar"):
        with pytest.raises(ValueError, match="data.allow_pipe=true"):
            expand_shards(spec)
        assert expand_shards(spec, allow_pipe=True)
    assert not (tmp_path / "ran").exists()


def clip_members(key, video, meta, caption=b"a clip") -> list:
    from lvd.video_io import encode_video_bytes

    return [(f"{key}.json", json_bytes(meta)), (f"{key}.mp4", encode_video_bytes(video, 8)), (f"{key}.txt", caption)]


def test_an_mp4_larger_than_its_json_or_the_ceiling_is_skipped_before_decoding(tmp_path, monkeypatch):
    """json says 9x32x32; the mp4 holds 64x64 frames, or 40 frames: skipped by the stream header, never decoded."""
    from lvd.data import codecs

    meta = {"num_frames": 9, "height": 32, "width": 32}
    members = clip_members("good", torch.zeros(3, 9, 32, 32, dtype=torch.uint8), meta)
    members += clip_members("wide", torch.zeros(3, 9, 64, 64, dtype=torch.uint8), meta)
    members += clip_members("long", torch.zeros(3, 40, 32, 32, dtype=torch.uint8), meta)
    members += clip_members("huge", torch.zeros(3, 9, 32, 32, dtype=torch.uint8), {**meta, "height": 9000})
    write_tar(tmp_path / "s.tar", members)
    decoded = []
    real = codecs.decode_video_bytes
    monkeypatch.setattr(codecs, "decode_video_bytes", lambda data, **kw: decoded.append(kw) or real(data, **kw))
    loader = make_clip_loader(ClipDataConfig(shards=str(tmp_path / "s.tar"), frames=9, size=32, batch_size=1, shuffle=0,
                                             workers=0, epochs=1, drop_last=False), seed=0)  # fmt: skip
    assert [k for b in loader for k in b["key"]] == ["good"]
    assert loader.skipped == {"mp4 larger than its json": 2, "json larger than the ceiling": 1}
    assert decoded == [{"output": "float", "max_shape": (9, 32, 32)}]  # only the good one, and bounded
    # A lower ceiling in the config refuses what it declares.
    loader = make_clip_loader(ClipDataConfig(shards=str(tmp_path / "s.tar"), frames=9, size=16, batch_size=1, shuffle=0,
                                             workers=0, epochs=1, max_side=16), seed=0)  # fmt: skip
    assert list(loader) == [] and loader.skipped == {"json larger than the ceiling": 4}
    with pytest.raises(ValueError, match="max_frames must be >= 1, got 0"):
        ClipDataConfig(shards="x.tar", max_frames=0)


def test_a_clip_longer_than_max_frames_is_skipped_before_decoding(tmp_path, monkeypatch):
    """The frame ceiling: a json declaring more than ``max_frames`` frames is skipped; its mp4 is never decoded."""
    from lvd.data import codecs

    short, long = torch.zeros(3, 9, 32, 32, dtype=torch.uint8), torch.zeros(3, 17, 32, 32, dtype=torch.uint8)
    members = clip_members("short", short, {"num_frames": 9, "height": 32, "width": 32})
    members += clip_members("long", long, {"num_frames": 17, "height": 32, "width": 32})
    write_tar(tmp_path / "s.tar", members)
    decoded = []
    real = codecs.decode_video_bytes
    monkeypatch.setattr(codecs, "decode_video_bytes", lambda data, **kw: decoded.append(kw) or real(data, **kw))
    loader = make_clip_loader(ClipDataConfig(shards=str(tmp_path / "s.tar"), frames=9, size=32, batch_size=1, shuffle=0,
                                             workers=0, epochs=1, drop_last=False, max_frames=9), seed=0)  # fmt: skip
    assert [k for b in loader for k in b["key"]] == ["short"]
    assert loader.skipped == {"json longer than the ceiling": 1}
    assert decoded == [{"output": "float", "max_shape": (9, 32, 32)}]


def test_the_decode_itself_stops_at_what_the_header_promised():
    """Even when the header passes the check, ffmpeg is stopped once its output passes the bound."""
    from lvd.video_io import VideoReadError, decode_video_bytes, encode_video_bytes

    data = encode_video_bytes(torch.zeros(3, 9, 64, 64, dtype=torch.uint8), 8)
    assert decode_video_bytes(data, max_shape=(4, 64, 64)).shape == (3, 4, 64, 64)
    with pytest.raises(VideoReadError, match="larger than its header and limits"):
        decode_video_bytes(data, max_shape=(9, 32, 32))


def test_an_over_bound_decode_is_stopped_before_it_is_held_whole():
    """The bound is kept while ffmpeg writes: its 9 MiB of frames never reach memory, only what passed the bound."""
    import tracemalloc

    from lvd.video_io import VideoReadError, decode_video_bytes, encode_video_bytes

    data = encode_video_bytes(torch.zeros(3, 48, 256, 256, dtype=torch.uint8), 8)  # 48·256²·3 B = 9 MiB decoded
    tracemalloc.start()
    try:
        with pytest.raises(VideoReadError, match="larger than its header and limits"):
            decode_video_bytes(data, max_shape=(48, 16, 16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB held while decoding past a 38 KiB bound"


def test_unsafe_keys_are_skipped_naming_shard_and_key(tmp_path, caplog):
    meta = {"num_frames": 9, "height": 32, "width": 32}
    video = torch.zeros(3, 9, 32, 32, dtype=torch.uint8)
    members = []
    for key in ("good", "../up", "sub/../../up2", "/abs/k", "back\\slash"):
        members += clip_members(key, video, meta)
    write_tar(tmp_path / "s.tar", members)
    loader = make_clip_loader(ClipDataConfig(shards=str(tmp_path / "s.tar"), frames=9, size=32, batch_size=1, shuffle=0,
                                             workers=0, epochs=1), seed=0)  # fmt: skip
    with caplog.at_level("WARNING", logger="lvd.data"):
        assert [k for b in loader for k in b["key"]] == ["good"]
    assert loader.skipped == {"unsafe key": 4}
    lines = [r.getMessage() for r in caplog.records]
    assert any("'../up' in " in ln and "s.tar" in ln and "'..' path component" in ln for ln in lines), lines
    assert any("starts with '/'" in ln for ln in lines) and any("backslash" in ln for ln in lines)
    # The latent loader too.
    lat = [m for i, k in enumerate(("ok", "../x")) for m in ((f"{k}.{latent_format.MEMBER}", latent_sample((4, 2, 6, 6), 5, i)),
                                                             (f"{k}.txt", b"c"))]
    write_tar(tmp_path / "lat.tar", lat)
    latent = make_latent_loader(LatentDataConfig(shards=str(tmp_path / "lat.tar"), batch_size=1, shuffle=0, workers=0,
                                                 epochs=1, drop_last=False), seed=0)  # fmt: skip
    assert [k for b in latent for k in b["key"]] == ["ok"] and latent.skipped == {"unsafe key": 1}


def test_key_problem_names_each_unsafe_form():
    from lvd.data.safety import key_problem

    assert key_problem("sub/clip_000") is None and key_problem("a..b") is None
    for key, reason in (("a/../b", "'..'"), ("..", "'..'"), ("/etc/x", "'/'"), ("a\\b", "backslash"), ("a\x00b", "NUL")):
        assert reason in key_problem(key), key
