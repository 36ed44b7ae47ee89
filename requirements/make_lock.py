"""Install lvd into a fresh venv, run the tests, and record the exact package set they passed with.

    python requirements/make_lock.py             # newest versions inside setup.py's ranges -> requirements/lock.txt
    python requirements/make_lock.py --lowest    # the ranges' lower bounds (requirements/lowest.txt): test only

The lock is what `.ci/run` and README's commands install with `-c requirements/lock.txt`. It is written only
when the tests pass, so it is always a set that passed. torch is installed first at TORCH (on this project's
CPU machines pip finds a CPU build on local disk; on PyPI the same pin is the CUDA build), with the triton
that the CUDA build pins, and is recorded without its local build tag (`+cpu`), so the lock serves both builds.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
LOWEST = REPO / "requirements" / "lowest.txt"
# The CUDA build of torch 2.13.0 pins triton 3.7.1; the CPU build pins none, so the lock takes that one too and
# stays installable beside either build.
TORCH = ["torch==2.13.0", "triton==3.7.1"]


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def freeze(python: str) -> list[str]:
    """``pip freeze`` of the venv without lvd itself, local build tags stripped, sorted case-insensitively."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True,
                         text=True).stdout
    lines = [re.sub(r"\+[\w.]+$", "", line.strip()) for line in out.splitlines()]
    return sorted((line for line in lines if line and not line.startswith(("-e ", "lvd"))), key=str.lower)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lowest", action="store_true", help="test the lower bounds instead of writing the lock")
    parser.add_argument("--pytest-args", default="-q -x", help="arguments for the test run (default: %(default)s)")
    parser.add_argument("--venv", type=Path, help="venv folder to (re)create (default: a temporary one)")
    args = parser.parse_args(argv)

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="lvd-lock-") as tmp:
        venv = args.venv or Path(tmp) / "venv"
        run([sys.executable, "-m", "venv", "--clear", str(venv)])
        python = str(venv / "bin" / "python")
        run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])
        run([python, "-m", "pip", "install", "-q", *(TORCH[:1] if args.lowest else TORCH)])  # lowest.txt pins triton
        constraints = ["-c", str(LOWEST)] if args.lowest else []
        run([python, "-m", "pip", "install", "-q", "-e", f"{REPO}[test]", *constraints])
        packages = freeze(python)
        print("\n".join(packages))
        if args.lowest:
            run([python, "-m", "pytest", "-p", "no:cacheprovider", *args.pytest_args.split()], cwd=REPO)
            print(f"lower bounds pass ({time.time() - start:.0f} s)")
            return 0
        # The candidate is in place while the suite runs (the README tests read it); it stays only if they pass.
        previous = LOCK.read_text(encoding="utf-8") if LOCK.is_file() else None
        header = [
            "# The exact set the test suite passed with. Made by `python requirements/make_lock.py`; do not edit.",
            f"# {datetime.date.today().isoformat()}, Python {platform.python_version()}, {platform.machine()}, "
            f"pytest {args.pytest_args}",
        ]
        LOCK.write_text("\n".join(header + packages) + "\n", encoding="utf-8")
        try:
            run([python, "-m", "pytest", "-p", "no:cacheprovider", *args.pytest_args.split()], cwd=REPO)
        except subprocess.CalledProcessError:
            if previous is None:
                LOCK.unlink()
            else:
                LOCK.write_text(previous, encoding="utf-8")
            print(f"tests failed: {LOCK} left as it was", file=sys.stderr)
            return 1
        print(f"wrote {LOCK} ({len(packages)} packages, {time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
