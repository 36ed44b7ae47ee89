"""The header every benchmark result starts with, and the one way results are written.

A result records what decides its numbers: when it ran (UTC), the command that reproduces it, the machine (CPU
model, cores, GPU, platform), torch's thread count, the torch and Python versions, and the load average when the
benchmark starts, i.e. the other processes' load: the CPUs these run on are often shared, and a busy neighbour
slows every figure.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(benchmark: str, argv: list[str] | None = None) -> dict:
    """The result header of ``python -m benchmarks.<benchmark> <argv>`` (``argv`` None: this process's own
    arguments). Take it after setting torch's threads and before the work, so that ``threads`` is the count the
    benchmark runs with and ``load_average`` is other processes' load."""
    import torch

    args = sys.argv[1:] if argv is None else argv
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(["python", "-m", f"benchmarks.{benchmark}", *args]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def write(result: dict, path: str | os.PathLike) -> Path:
    """``result`` as indented JSON at ``path`` (its folder made if need be); prints the path and returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path
