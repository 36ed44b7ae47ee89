"""webdataset training pipelines for clip shards and latent shards, with exact resume.

    loader = make_clip_loader(ClipDataConfig(shards="shards/shard-{000000..000009}.tar"), seed=0)
    for batch in loader:          # {"video": (B,3,T,H,W) float [-1,1], "caption": [...], "key": [...]}
        ...
        ckpt["data"] = loader.state_dict()          # JSON-able
    loader.load_state_dict(ckpt["data"])            # continues with exactly the next batch

Pipeline, per (rank, worker):

1. shards: ``--shards`` is brace patterns joined by ``::`` (webdataset's ``expand_urls``) or a
   folder of ``*.tar``. Epoch ``e`` permutes the list with ``rng(seed, e)``; rank ``r`` of ``R``
   takes every R-th shard, worker ``w`` of ``W`` every W-th of those (split by node, then by
   worker). With ``resampled`` each (rank, worker) instead draws shards with replacement from
   ``rng(seed, rank, w)``, forever.
2. samples: tar members are grouped by key (webdataset's tar reader and ``base_plus_ext``). Only
   our keys are decoded, by our own decoders (mp4 via ffmpeg, txt as UTF-8, json, safetensors);
   nothing is ever unpickled. A sample with a pickle member (``.pyd``, ``.pickle``, ``.pkl``,
   ``.pth``, ``.pt``), a duplicate key, an unsafe key (a ``..`` component, a leading ``/``, a
   backslash or NUL), a missing or undecodable part is skipped, counted and logged in one line
   naming shard and key.
3. shuffle: a buffer of ``shuffle`` undecoded samples, drawn with ``rng(seed, e, rank, w)``.
4. buckets: each sample joins the bucket chosen from its metadata (no decoding needed); a full
   bucket becomes a batch. Each bucket has its own (T, H, W) and batch size.
5. decode: only then is a batch decoded, cropped and resized, with crops drawn from
   ``rng(seed, e, rank, w, batch_index)``. Decoding is bounded (:mod:`lvd.data.codecs`): an mp4
   whose stream header is larger than its json or than ``max_side``/``max_frames`` is skipped.

Why resume is exact: every worker's batch sequence is a pure function of (seed, epoch, rank,
worker, batch index), and the torch DataLoader hands batches out round-robin over workers. The
state is, per worker, its epoch and how many of its batches the training loop has received, plus
which worker is due next. Restoring replays steps 1-4 for the batches already seen without
decoding them (reading tar bytes is cheap, decoding is not), and rotates worker roles so that the
round-robin starts at the worker that was due. ``tests/test_data_loader.py`` checks
``resumed == uninterrupted`` batch for batch.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from lvd.data.codecs import Bucket, ClipCodec, LatentCodec, SkipSample
from lvd.data.safety import VideoLimits, key_problem

__all__ = [
    "ClipDataConfig",
    "LatentDataConfig",
    "ShardLoader",
    "make_clip_loader",
    "make_latent_loader",
    "expand_shards",
    "PICKLE_SUFFIXES",
]

log = logging.getLogger("lvd.data")
PICKLE_SUFFIXES = ("pyd", "pickle", "pkl", "pth", "pt")
_STATE_VERSION = 1


@dataclasses.dataclass
class ClipDataConfig:
    """Clip shards -> batches of videos.

    shards:      brace pattern(s) joined by ``::`` (``a/shard-{000000..000099}.tar``) or a folder.
    frames/size/batch_size: the single bucket used when ``buckets`` is empty (size x size).
    buckets:     several (frames, height, width, batch_size); see :func:`choose_bucket`.
    shuffle:     shuffle buffer in samples (0 keeps shard order).
    random_crop: random temporal window and spatial crop; False takes the first frames, centre crop.
    workers:     DataLoader worker processes (0 = in the main process).
    resampled:   draw shards with replacement forever (multi-node training); else epochs.
    epochs:      epochs per pass (one ``for`` loop over the loader); None = one endless pass.
                 The next pass continues with the next epochs (new shuffles), so a training loop
                 that calls ``iter(loader)`` again on StopIteration just keeps going.
                 Ignored when resampled (always endless).
    drop_last:   drop the partial batch each bucket holds at the end of an epoch.
    allow_pipe:  accept ``pipe:`` commands and network URLs in ``shards`` (off: data never runs a shell).
    max_side/max_frames: the ceiling on what a sample may declare in its json; its mp4's stream header is read
                 before decoding and a sample larger than its json or this ceiling is skipped and counted.
    """

    shards: str = ""
    frames: int = 17
    size: int = 256
    batch_size: int = 8
    buckets: list[Bucket] = dataclasses.field(default_factory=list)
    shuffle: int = 1000
    random_crop: bool = True
    workers: int = 2
    resampled: bool = False
    epochs: int | None = None
    drop_last: bool = True
    allow_pipe: bool = False
    max_side: int = VideoLimits.max_side
    max_frames: int = VideoLimits.max_frames

    def __post_init__(self):
        problems = _common_problems(self) + VideoLimits(self.max_side, self.max_frames).problems()
        if not self.buckets:
            if self.frames < 1:
                problems.append(f"frames must be >= 1, got {self.frames}")
            if self.size < 1:
                problems.append(f"size must be >= 1, got {self.size}")
        if problems:
            raise ValueError("invalid ClipDataConfig: " + "; ".join(problems))

    def bucket_list(self) -> list[Bucket]:
        return list(self.buckets) or [Bucket(self.frames, self.size, self.size, self.batch_size)]


@dataclasses.dataclass
class LatentDataConfig:
    """Latent shards -> batches of cached latents and text embeddings.

    Samples are bucketed by their exact latent shape (C, T', H', W'). ``buckets`` optionally gives
    a batch size per latent (frames, height, width); other shapes use ``batch_size``.
    The other fields (``allow_pipe`` too) mean what they mean in :class:`ClipDataConfig`.
    """

    shards: str = ""
    batch_size: int = 8
    buckets: list[Bucket] = dataclasses.field(default_factory=list)
    shuffle: int = 1000
    workers: int = 2
    resampled: bool = False
    epochs: int | None = None
    drop_last: bool = True
    allow_pipe: bool = False

    def __post_init__(self):
        problems = _common_problems(self)
        if problems:
            raise ValueError("invalid LatentDataConfig: " + "; ".join(problems))


def _common_problems(cfg) -> list[str]:
    problems = []
    if not cfg.shards:
        problems.append("shards is empty: give a brace pattern like 'dir/shard-{000000..000009}.tar' or a folder")
    if cfg.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.shuffle < 0:
        problems.append(f"shuffle must be >= 0, got {cfg.shuffle}")
    if cfg.workers < 0:
        problems.append(f"workers must be >= 0, got {cfg.workers}")
    if cfg.epochs is not None and cfg.epochs < 1:
        problems.append(f"epochs must be >= 1 or None, got {cfg.epochs}")
    for i, b in enumerate(cfg.buckets):
        if isinstance(b, dict):
            cfg.buckets[i] = b = Bucket(**b)
        if min(b.frames, b.height, b.width, b.batch_size) < 1:
            problems.append(f"buckets[{i}]: every field must be >= 1, got {b}")
    return problems


# ----------------------------------------------------------------------------------------------
# Shard lists
# ----------------------------------------------------------------------------------------------


def expand_shards(spec: str, *, allow_pipe: bool = False) -> list[str]:
    """Brace patterns joined by ``::``, or a folder (its ``*.tar``). Missing local files are an error, and so are
    ``pipe:`` commands (webdataset runs them through a shell) and network URLs unless ``allow_pipe``."""
    from webdataset.shardlists import expand_urls

    path = Path(spec)
    if "{" not in spec and "::" not in spec and path.is_dir():
        urls = [str(p) for p in sorted(path.glob("*.tar"))]
        if not urls:
            raise ValueError(f"shards: folder '{spec}' holds no .tar files")
        return urls
    urls = expand_urls(spec)
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote and not allow_pipe:
        raise ValueError(f"shards: '{remote[0]}' is a shell command or a network URL; nothing from data runs "
                         "unless the config says data.allow_pipe=true")
    local = [u for u in urls if u not in remote]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"shards: '{missing[0]}' does not exist{more} (pattern '{spec}')")
    return urls


# ----------------------------------------------------------------------------------------------
# The per-worker stream
# ----------------------------------------------------------------------------------------------


class _ShardStream(torch.utils.data.IterableDataset):
    """Steps 1-5 of the module docstring for one (rank, worker); yields decoded batches."""

    def __init__(self, urls, codec, cfg, seed, rank, world_size, state):
        self.urls, self.codec, self.cfg = urls, codec, cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.state = state  # {"epoch": [...], "batches": [...], "next_worker": r}
        self.stats: collections.Counter = collections.Counter()

    # 1. shards
    def _shards(self, epoch: int, worker: int, workers: int) -> Iterator[str]:
        if self.cfg.resampled:
            rng = np.random.default_rng([self.seed, self.rank, worker, 7])
            while True:
                yield self.urls[int(rng.integers(len(self.urls)))]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        yield from (self.urls[i] for i in order[self.rank :: self.world_size][worker::workers])

    # 2. samples
    def _samples(self, urls: Iterator[str]) -> Iterator[dict]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import base_plus_ext, tar_file_expander

        for url in urls:

            def handler(exn: Exception, url=url) -> bool:
                self._skip(url, f"unreadable tar ({exn.args[0] if exn.args else type(exn).__name__})")
                return True

            try:
                stream = gopen(url, "rb")
            except Exception as e:
                self._skip(url, f"cannot open shard ({e})")
                continue
            seen: set[str] = set()
            current = None
            try:
                for member in tar_file_expander([{"url": url, "stream": stream}], handler=handler, eof_value=None):
                    prefix, suffix = base_plus_ext(member["fname"])
                    if prefix is None:
                        continue
                    if current is None or prefix != current["__key__"]:
                        if current is not None:
                            yield current
                        current = {"__key__": prefix, "__url__": url}
                        if prefix in seen:
                            current["__duplicate__"] = True
                        seen.add(prefix)
                    suffix = suffix.lower()
                    if suffix in current:
                        current["__duplicate__"] = True
                    current[suffix] = member["data"]
                if current is not None:
                    yield current
            finally:
                stream.close()

    def _skip(self, where: str, reason: str) -> None:
        self.stats[reason.split(" (")[0]] += 1
        log.warning("skipped %s: %s", where, reason)

    def _checked(self, samples: Iterator[dict]) -> Iterator[dict]:
        for s in samples:
            where = f"{s['__key__']} in {s['__url__']}"
            pickled = [k for k in s if k.rsplit(".", 1)[-1] in PICKLE_SUFFIXES]
            if unsafe := key_problem(s["__key__"]):
                self._skip(f"{s['__key__']!r} in {s['__url__']}", unsafe)
            elif pickled:
                self._skip(where, f"pickle member .{pickled[0]} (never unpickled)")
            elif s.get("__duplicate__"):
                self._skip(where, "duplicate key")
            else:
                yield s

    # 3. shuffle
    def _shuffled(self, samples: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        size = self.cfg.shuffle
        if size <= 1:
            yield from samples
            return
        buf: list[dict] = []
        for s in samples:
            if len(buf) < size:
                buf.append(s)
                continue
            i = int(rng.integers(size))
            buf[i], s = s, buf[i]
            yield s
        while buf:  # drain in random order
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()

    # 4. buckets
    def _batches(self, samples: Iterator[dict]) -> Iterator[tuple]:
        pending: dict = {}
        for s in samples:
            try:
                b = self.codec.bucket(s)
            except SkipSample as e:
                self._skip(f"{s['__key__']} in {s['__url__']}", str(e))
                continue
            group = pending.setdefault(b, [])
            group.append(s)
            if len(group) >= self._batch_size(b):
                yield b, pending.pop(b)
        if not self.cfg.drop_last:
            for b, group in pending.items():
                yield b, group

    def _batch_size(self, b) -> int:
        if isinstance(self.codec, LatentCodec):
            return self.codec.batch_size_of(b)
        return self.codec.buckets[b].batch_size

    # 5. decode
    def _decode(self, bucket, group: list[dict], rng: np.random.Generator) -> dict | None:
        items = []
        for s in group:
            try:
                items.append(self.codec.decode(s, bucket, rng))
            except SkipSample as e:
                self._skip(f"{s['__key__']} in {s['__url__']}", str(e))
            except Exception as e:  # noqa: BLE001 - one bad sample never ends a training run
                self._skip(f"{s['__key__']} in {s['__url__']}", f"unexpected error ({type(e).__name__}: {e})")
        return self.codec.collate(items) if items else None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        physical = info.id if info is not None else 0
        worker = (physical + self.state["next_worker"]) % workers  # logical role, see the docstring
        epoch, done = self.state["epoch"][worker], self.state["batches"][worker]
        last = None if self.cfg.resampled or self.cfg.epochs is None else self.state["first_epoch"] + self.cfg.epochs
        while last is None or epoch < last:
            shards = self._shards(epoch, worker, workers)
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1])
            n = -1
            for n, (bucket, group) in enumerate(self._batches(self._shuffled(self._checked(self._samples(shards)), rng))):
                if n < done:
                    continue  # seen before the restore: replayed, not decoded
                batch = self._decode(bucket, group, np.random.default_rng([self.seed, epoch, self.rank, worker, n, 2]))
                if batch is None:
                    batch = {}
                batch.update(_worker=worker, _epoch=epoch, _batch=n, _stats=dict(self.stats))
                yield batch
            if n < 0 and done == 0:
                break  # this worker got no data in a whole epoch: stop rather than spin
            epoch, done = epoch + 1, 0
        # The skip counts after the last batch (bookkeeping only: the loader yields nothing for it).
        yield {"_worker": worker, "_stats": dict(self.stats), "_final": True}


# ----------------------------------------------------------------------------------------------
# The loader the training loop sees
# ----------------------------------------------------------------------------------------------


class ShardLoader:
    """Iterable of batches with ``state_dict()`` / ``load_state_dict()`` for exact resume.

    Iterating again after a break continues after the last batch received; iterating again after
    a finished pass starts the next ``epochs`` epochs. ``skipped`` counts samples skipped so far,
    by reason. One iteration at a time: two live iterators would share the position.
    """

    def __init__(self, codec, cfg, *, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.codec, self.cfg = codec, cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.urls = expand_shards(cfg.shards, allow_pipe=cfg.allow_pipe)
        if not cfg.resampled and len(self.urls) < world_size * max(1, cfg.workers):
            log.warning(
                "%d shards for %d ranks x %d workers: some workers get no data; write more, smaller shards",
                len(self.urls), world_size, max(1, cfg.workers),
            )  # fmt: skip
        n = max(1, cfg.workers)
        self._state = {"first_epoch": 0, "epoch": [0] * n, "batches": [0] * n, "next_worker": 0}
        self._stats: dict[int, dict] = {}

    @property
    def skipped(self) -> dict[str, int]:
        total: collections.Counter = collections.Counter()
        for stats in self._stats.values():
            total.update(stats)
        return dict(total)

    def __iter__(self):
        n = max(1, self.cfg.workers)
        state = json.loads(json.dumps(self._state))
        dataset = _ShardStream(self.urls, self.codec, self.cfg, self.seed, self.rank, self.world_size, state)
        if self.cfg.workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(
                # its own generator: starting a DataLoader draws its base seed from the global torch generator
                # otherwise, and a resumed run starts one after restoring that generator (the streams use
                # numpy generators of their own, so this value changes no data)
                torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.cfg.workers, prefetch_factor=2,
                                            generator=torch.Generator().manual_seed(self.seed))
            )
        for batch in batches:
            w = batch.pop("_worker")
            self._stats[w] = batch.pop("_stats")
            if batch.pop("_final", False):
                continue
            self._state["epoch"][w] = batch.pop("_epoch")
            self._state["batches"][w] = batch.pop("_batch") + 1
            self._state["next_worker"] = (w + 1) % n
            if batch:  # a batch whose every sample was bad is only bookkeeping
                yield batch
        # The pass ended (not broken off): the next ``iter()`` starts the next epochs.
        if not self.cfg.resampled and self.cfg.epochs is not None:
            end = self._state["first_epoch"] + self.cfg.epochs
            self._state = {"first_epoch": end, "epoch": [end] * n, "batches": [0] * n, "next_worker": 0}

    def _fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """JSON-able position: the pass's first epoch; per worker (epoch, batches received); the
        worker due next."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": max(1, self.cfg.workers),
            "shards": self._fingerprint(),
            **json.loads(json.dumps(self._state)),
        }

    def load_state_dict(self, d: dict) -> None:
        expect = {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": max(1, self.cfg.workers),
            "shards": self._fingerprint(),
        }
        wrong = [f"{k}: saved {d.get(k)!r}, now {v!r}" for k, v in expect.items() if d.get(k) != v]
        if wrong:
            problems = "; ".join(wrong)
            raise ValueError(f"loader state does not match this loader (resume needs the same data setup): {problems}")
        self._state = {
            "first_epoch": int(d["first_epoch"]),
            "epoch": list(d["epoch"]),
            "batches": list(d["batches"]),
            "next_worker": int(d["next_worker"]),
        }


def make_clip_loader(cfg: ClipDataConfig, *, seed: int, rank: int = 0, world_size: int = 1) -> ShardLoader:
    """Batches ``{"video": (B, 3, T, H, W) float [-1, 1], "caption": [str], "key": [str]}``."""
    return ShardLoader(ClipCodec(cfg), cfg, seed=seed, rank=rank, world_size=world_size)


def make_latent_loader(cfg: LatentDataConfig, *, seed: int, rank: int = 0, world_size: int = 1) -> ShardLoader:
    """Batches ``{"latents": (B, C, T', H', W'), "text": TextEmbeddings, "caption": [str], "key": [str]}``;
    every batch holds latents of one shape (one bucket)."""
    return ShardLoader(LatentCodec(cfg), cfg, seed=seed, rank=rank, world_size=world_size)
