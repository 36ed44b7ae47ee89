"""Atomic resume checkpoints: safetensors for tensors, JSON for everything else, no pickle.

A run keeps its resume state in ``RUN/checkpoints/step_N/``; the newest ``keep_last`` folders stay.
One step folder describes itself::

    step_000120/
      model.safetensors            flat state dicts (any name the trainer chooses: model, ema, disc, ...)
      optimizer.safetensors        tensors of a nested state (exp_avg, exp_avg_sq, step, ...)
      optimizer.json               the rest of it (param_groups, lr, betas, ...) with {"__tensor__": key} refs
      trainer.json                 step, LR schedule, NaN counter
      rank0.json / rank0.safetensors   per-rank state: RNG (torch CPU/CUDA, python, numpy), data-loader position
      config.yaml                  the resolved run config
      meta.json                    written last: step, world size, every file's size and SHA-256

Atomicity: everything is written into ``step_N.tmp/``, fsynced, and only then renamed to ``step_N``
(``os.replace`` of a directory is atomic on POSIX). A ``kill -9`` at any moment leaves either the
old set of complete folders or the old set plus the new one; a stale ``*.tmp`` is removed by the next
save. :func:`latest_checkpoint` only ever looks at complete folders. The temporary folder has one fixed name,
not :func:`lvd.atomic.atomic_folder`'s per-writer one, because every rank writes into it (see below).

Verification: ``meta.json`` records the size and SHA-256 of every other file in the folder, hashed
from disk after the fsync and before the rename, so a complete folder vouches for its own bytes.
:func:`verify_checkpoint` checks them all; :func:`select_checkpoint` (what a resume uses) skips a
newest folder that fails, with one warning, and resumes from the newest intact one. A folder whose
``meta.json`` records sizes only (no hashes) still loads, unverified.

Under torchrun every rank writes its own ``rank{r}.*`` files into the same folder (a filesystem all
ranks share) and rank 0 writes the rest and renames. Export for generation is separate: a diffusers
``save_pretrained`` folder of the EMA weights (see :func:`lvd.train.loop.export_pretrained`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lvd.atomic import fsync_path

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
    "select_checkpoint",
    "set_aside_after",
    "resume_from_problem",
    "save_tree",
    "load_tree",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger("lvd.train.checkpoint")

_STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"


@dataclass
class CheckpointConfig:
    """``every``: save resume state every N optimizer steps (and at the last step); ``keep_last``: folders kept.

    ``resume_from``: a ``step_N`` folder to start from instead of the run's newest intact checkpoint
    (this run's or another's); it must pass verification. Every start with it set starts there, so
    clear it once the run has moved on.
    """

    every: int = 500
    keep_last: int = 3
    resume_from: str = ""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Nested state <-> (safetensors tensors, JSON skeleton)
# ----------------------------------------------------------------------------------------------


def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in ``obj`` by ``{"__tensor__": key}`` and collect it in ``tensors``.

    JSON has only str keys and no tuples; optimizer states use int keys and ``random.getstate()`` a
    tuple, so those are written as ``{"__items__": [[k, v], ...]}`` and ``{"__tuple__": [...]}``.
    """
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        if key in tensors:
            raise CheckpointError(f"two tensors map to the same key '{key}'")
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _split(v, f"{path}/{k}" if path else k, tensors) for k, v in obj.items()}
        return {"__items__": [[k, _split(v, f"{path}/{k}" if path else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store {type(obj).__name__} at '{path}' without pickle; convert it to plain data")


def _join(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"{where}: tensor '{key}' is missing from the .safetensors file")
            return tensors[key]
        if "__items__" in obj:
            return {k: _join(v, tensors, where) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_join(v, tensors, where) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _join(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors, where) for v in obj]
    return obj


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies; tensors sharing storage (tied weights) are cloned apart."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach()
        if hasattr(t, "full_tensor"):  # a DTensor that slipped through: gather it
            t = t.full_tensor()
        t = t.to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        if ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def save_tree(folder: str | Path, name: str, tree: Any) -> list[Path]:
    """Write a nested state as ``name.safetensors`` (+ ``name.json`` unless it is a flat tensor dict)."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(tree, "", tensors)
    flat = isinstance(tree, dict) and all(isinstance(v, torch.Tensor) for v in tree.values()) and all(
        isinstance(k, str) for k in tree
    )
    written = []
    if tensors or flat:
        path = folder / f"{name}.safetensors"
        save_file(_cpu_tensors(tensors), str(path))
        written.append(path)
    if not flat:
        path = folder / f"{name}.json"
        path.write_text(json.dumps(skeleton), encoding="utf-8")
        written.append(path)
    return written


def load_tree(folder: str | Path, name: str, *, device: str | torch.device = "cpu") -> Any:
    """Read what :func:`save_tree` wrote; a missing or unreadable file raises :class:`CheckpointError`."""
    folder = Path(folder)
    st, js = folder / f"{name}.safetensors", folder / f"{name}.json"
    if not st.exists() and not js.exists():
        raise CheckpointError(f"checkpoint file missing: {st} (and no {js.name})")
    tensors: dict[str, torch.Tensor] = {}
    if st.exists():
        try:
            tensors = load_file(str(st), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"corrupt checkpoint file {st}: {e}") from e
    if not js.exists():
        return tensors
    try:
        skeleton = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint file {js}: {e}") from e
    return _join(skeleton, tensors, str(js))


# ----------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """torch CPU (+ every CUDA device), python ``random`` and numpy global RNG states."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": np_state[1], "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Step folders
# ----------------------------------------------------------------------------------------------


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete step folders under ``run_dir/checkpoints`` as ``(step, path)``, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete ``step_N`` folder of a run, or None when the run has none yet."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _noop() -> None:
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(step_dir: str | Path) -> dict:
    """Check a step folder against its ``meta.json``; return the meta, or raise naming the file that failed.

    Every file the meta lists must exist with its recorded size and (when recorded) SHA-256. The meta
    gets ``"verified": False`` when it records sizes only (no hashes).
    """
    step_dir = Path(step_dir)
    meta_path = step_dir / META
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {step_dir}")
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint is incomplete, {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        sizes, digests = meta.get("files", {}), meta.get("sha256")
        if not isinstance(sizes, dict) or not isinstance(digests, (dict, type(None))):
            raise ValueError("'files' and 'sha256' must be mappings")
        if any(Path(name).name != name for name in [*sizes, *(digests or {})]):
            raise ValueError("a file name is not a plain name inside the folder")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"corrupt checkpoint file {meta_path}: {_one_line(e)}") from e
    for fname, size in sizes.items():
        p = step_dir / fname
        if not p.is_file():
            raise CheckpointError(f"checkpoint file missing: {p}")
        if p.stat().st_size != size:
            raise CheckpointError(f"corrupt checkpoint file {p}: {p.stat().st_size} bytes, expected {size}")
    for fname, digest in (digests or {}).items():
        p = step_dir / fname
        if not p.is_file():
            raise CheckpointError(f"checkpoint file missing: {p}")
        if _sha256(p) != digest:
            raise CheckpointError(f"corrupt checkpoint file {p}: SHA-256 differs from the one in {META}")
    meta["verified"] = digests is not None
    return meta


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def select_checkpoint(
    run_dir: str | Path, resume_from: str | Path | None = None, *, rank: int = 0
) -> tuple[Path, dict] | None:
    """The folder a resume starts from and its verified meta, or None when the run has no checkpoint.

    ``resume_from`` names the folder: one that fails verification raises :class:`CheckpointError`.
    Otherwise the run's newest folder that passes; each newer one that fails is skipped with one
    warning naming the file. When every folder fails, this raises rather than starting afresh: a
    fresh start would drop the run's progress, and its saves (lower step numbers) would be pruned
    before the broken folders. Every rank verifies (each reads every file anyway); rank 0 logs.
    """
    if resume_from:
        try:
            return Path(resume_from), verify_checkpoint(resume_from)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint.resume_from={str(resume_from)!r}: {e}") from e
    found = list_checkpoints(run_dir)
    for _, step_dir in reversed(found):
        try:
            return step_dir, verify_checkpoint(step_dir)
        except CheckpointError as e:
            if rank == 0:
                log.warning("skipping checkpoint %s: %s", step_dir, e)
    if found:
        raise CheckpointError(
            f"no intact checkpoint in {Path(run_dir) / 'checkpoints'}: all {len(found)} failed verification (see the "
            "warnings above); set checkpoint.resume_from to a good step folder, or move the folder away to start afresh"
        )
    return None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    trees: dict[str, Any],
    *,
    rank_tree: dict | None = None,
    config: dict | None = None,
    keep_last: int = 3,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = _noop,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step_N`` and prune to the newest ``keep_last``.

    ``trees`` (name -> state dict or nested state) are written by rank 0 only; ``rank_tree`` (RNG,
    loader position) by every rank as ``rank{r}``. Every rank must call this with the same ``step``;
    ``barrier`` synchronises them (a no-op for one process).
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    # 1. Rank 0 clears stale partial saves (a crash mid-save leaves only *.tmp behind).
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for p in root.glob("*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        tmp.mkdir()
    barrier()
    # 2. Every rank writes its own state; rank 0 writes the shared trees and the config.
    written: list[Path] = []
    if rank_tree is not None:
        written += save_tree(tmp, f"rank{rank}", rank_tree)
    if rank == 0:
        for name, tree in trees.items():
            written += save_tree(tmp, name, tree)
        if config is not None:
            from lvd.config import save_config

            save_config(config, tmp / "config.yaml")
            written.append(tmp / "config.yaml")
    for p in written:
        fsync_path(p)
    barrier()
    # 3. Rank 0 seals the folder: meta.json last, fsync, then one atomic rename.
    if rank == 0:
        # Hashed from disk after every rank's fsync: the digest covers the bytes a resume will read.
        files = sorted(tmp.iterdir())
        meta = {"step": step, "world_size": world_size, "trees": sorted(trees),
                "files": {p.name: p.stat().st_size for p in files}, "sha256": {p.name: _sha256(p) for p in files}}
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        fsync_path(tmp / META)
        if final.exists():  # re-saving the same step (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
        for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def resume_from_problem(folder: str | Path) -> str | None:
    """A quick look at ``checkpoint.resume_from`` for config checks (the hashes are checked at resume)."""
    from lvd.config import named

    key = named("checkpoint.resume_from", folder)
    if not Path(folder).is_dir():
        return f"{key}: no such folder"
    if not (Path(folder) / META).is_file():
        return f"{key}: not a complete checkpoint folder (no {META}); name a run's checkpoints/step_N folder"
    return None


def set_aside_after(run_dir: str | Path, step: int) -> list[Path]:
    """Rename the run's checkpoints newer than ``step`` to ``step_N.supersededK``; returns the new names.

    Resuming from a chosen older checkpoint starts a new history after ``step``: the newer folders
    belong to the old one. Renamed, not deleted, so no later resume picks them up and pruning does
    not keep them in place of the new saves.
    """
    moved = []
    for s, p in list_checkpoints(run_dir):
        if s > step:
            k = 1
            while p.with_name(f"{p.name}.superseded{k}").exists():
                k += 1
            moved.append(p.rename(p.with_name(f"{p.name}.superseded{k}")))
    if moved:
        log.warning("resumed from step %d: this run's newer checkpoints are set aside as %s",
                    step, ", ".join(p.name for p in moved))
    return moved


def load_checkpoint(
    step_dir: str | Path, names: list[str], *, rank: int = 0, device: str | torch.device = "cpu",
    meta: dict | None = None,
) -> tuple[dict[str, Any], dict | None, dict]:
    """Read ``names`` trees and this rank's state from a step folder; returns ``(trees, rank_tree, meta)``.

    Verifies the folder first (:func:`verify_checkpoint`), so a truncated, half-copied or altered
    folder fails with the file's name instead of deep inside torch; ``meta``, the result of an
    earlier verification of the same folder, skips hashing it again.
    """
    step_dir = Path(step_dir)
    if meta is None:
        meta = verify_checkpoint(step_dir)
    if not meta.get("verified", True) and rank == 0:
        log.info("checkpoint %s predates recorded SHA-256 hashes: loading it unverified (sizes checked)", step_dir)
    trees = {name: load_tree(step_dir, name, device=device) for name in names}
    rank_tree = None
    if any((step_dir / f"rank{rank}{ext}").exists() for ext in (".json", ".safetensors")):
        rank_tree = load_tree(step_dir, f"rank{rank}")
    elif meta.get("world_size", 1) > 1 or rank > 0:
        raise CheckpointError(
            f"checkpoint file missing: {step_dir / f'rank{rank}.json'} (saved with world size "
            f"{meta.get('world_size')}; resume with the same number of processes)"
        )
    return trees, rank_tree, meta
