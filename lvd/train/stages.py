"""Run a multi-stage recipe (data → VAE → latents → DiT …) one stage at a time, for the end-to-end recipes
(``recipes/train_shapes_demo.py``, ``recipes/train_shapes_lora.py``).

A stage is skipped when its output exists and timed when it runs (:func:`run_stage`); a stage that is a command of
its own (``python recipes/train_vae.py …``, ``python -m lvd.cache_latents …``) runs as a subprocess with its output
in a log file (:func:`run_command`), and its command line is printed, so each step can be run again by hand.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable


def run_command(cmd: list[str], log_path: Path, *, threads: int = 0, cwd: str | os.PathLike | None = None) -> None:
    """Run ``cmd`` (in ``cwd``) with its output appended to ``log_path``; SystemExit naming the log if it fails.
    ``threads`` > 0 sets OMP_NUM_THREADS and MKL_NUM_THREADS for it."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    printable = " ".join(cmd)
    print(f"$ {printable}", flush=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {printable}\n")
        log.flush()
        code = subprocess.call(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"step failed with exit code {code}; see {log_path}")


def run_stage(timings: dict, name: str, done: bool, fn: Callable[[], object]) -> bool:
    """Run one stage unless ``done``, printing its start and its seconds (kept in ``timings[name]``); True if it ran."""
    if done:
        print(f"[{name}] done already, skipped", flush=True)
        return False
    print(f"[{name}] {time.strftime('%H:%M:%S')} start", flush=True)
    start = time.perf_counter()
    fn()
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"[{name}] {timings[name]:.0f} s", flush=True)
    return True
