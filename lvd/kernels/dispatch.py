"""Backend choice for every kernel: the one place that decides Triton / SDPA / xformers / PyTorch.

Backends:

- ``"triton"``   our fused kernels (lvd/kernels/attention.py, lvd/kernels/group_norm.py). CUDA tensors, or CPU
  tensors when ``TRITON_INTERPRET=1`` was set before ``lvd.kernels`` was imported (how the tests run).
- ``"sdpa"``     ``torch.nn.functional.scaled_dot_product_attention`` (attention only).
- ``"xformers"`` ``xformers.ops.memory_efficient_attention``; optional, CUDA only.
- ``"torch"``    the plain PyTorch reference: the fallback and the test oracle.
- ``"auto"``     the default. GroupNorm: Triton on CUDA with compute capability ≥ 8.0, otherwise the
  reference. Attention on such a GPU, where our kernel can run (fp16/bf16, head dim ≤ 128): the backend
  measured faster for (GPU class, dtype, head dim, masked) in the attention table (see
  :func:`attention_table`); with no measurement, SDPA without a mask (its flash kernels are the
  fastest unmasked path measured so far) and Triton with one (SDPA leaves flash for a boolean mask).
  Elsewhere SDPA.

``LVD_KERNELS=<backend>`` in the environment replaces ``"auto"`` as the default. GroupNorm has no SDPA
or xformers version, so for GroupNorm those two names mean the PyTorch reference: one environment
setting can then say "no Triton" for the whole library.

Forcing a backend (the ``backend=`` argument) that cannot run raises :class:`BackendUnavailableError`
naming the reason. ``"auto"`` falling back logs the reason once per (op, reason) at INFO; an
``LVD_KERNELS`` preference that cannot run for some call (say ``triton`` for the VAE's 512-wide
single-head attention) falls back the same way and logs a WARNING once.

Machine facts (xformers installed, CUDA capability and name, Triton and numpy versions) are detected when a
choice needs them; a :class:`Machine` passed as ``machine=`` states them instead.

Importing this module never touches a GPU driver: CUDA is queried only when a call sees a CUDA tensor.
Meta tensors take the Triton path's fake (shape-only) implementations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "sdpa", "xformers", "torch")
ENV_VAR = "LVD_KERNELS"

# Measured faster attention per (GPU class, dtype, head dim, masked), shipped with lvd; a user's own
# measurements (bench_attention.py --write-table) go to user_attention_table_path() and take precedence.
ATTENTION_TABLE = Path(__file__).with_name("attention_table.json")
ATTENTION_TABLE_ENV = "LVD_ATTENTION_TABLE"

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # one (BLOCK_M, 128) fp32 accumulator per program; larger needs another tiling

try:  # Linux wheels ship Triton; elsewhere the PyTorch paths still work.
    import triton  # noqa: F401  (importing triton does not touch the driver)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run these inputs on this machine."""


# ----------------------------------------------------------------------------------------------
# Environment facts (each computed at call time, never at import)


def triton_interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value (torch's has_triton() ignores it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


@torch.compiler.assume_constant_result  # torch.compile evaluates these once while tracing: no graph break
def has_xformers() -> bool:
    """xformers is importable. It imports on a CPU but raises NotImplementedError there, so callers
    must check the device themselves (diffusers' is_xformers_available() does not)."""
    return importlib.util.find_spec("xformers") is not None


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@dataclasses.dataclass(frozen=True)
class Machine:
    """The machine facts a backend choice depends on. Every choice function takes ``machine=``; a fact left
    None (all of them by default) is detected when it is needed. Tests and what-if questions ("what would an
    H200 pick?") state facts here instead of patching this module."""

    has_xformers: bool | None = None
    cuda_capability: tuple[int, int] | None = None  # of the device the tensors are on
    cuda_name: str | None = None
    triton_version: str | None = None
    numpy_version: str | None = None


DETECT = Machine()


def _xformers_installed(machine: Machine) -> bool:
    return has_xformers() if machine.has_xformers is None else machine.has_xformers


def _capability(x, machine: Machine) -> tuple[int, int]:
    return _cuda_capability(_device_index(x)) if machine.cuda_capability is None else machine.cuda_capability


def _versions(machine: Machine) -> tuple[str, str]:
    import numpy

    return machine.triton_version or triton.__version__, machine.numpy_version or numpy.__version__


def default_backend() -> str:
    """The backend ``"auto"`` stands for: ``$LVD_KERNELS`` if set, else ``"auto"``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; choose one of {BACKENDS}")
    return value


def _requested(backend: str) -> tuple[str, bool]:
    """(backend asked for, forced?): an explicit argument forces; ``"auto"`` reads ``$LVD_KERNELS``,
    which states a preference that falls back (with a logged reason) where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    return (default_backend(), False) if backend == "auto" else (backend, True)


_logged: set[tuple[str, str]] = set()


def _log_once(op: str, message: str, level: int = logging.INFO) -> None:
    if torch.compiler.is_compiling():  # logging would break the graph; eager calls log it
        return
    if (op, message) not in _logged:
        _logged.add((op, message))
        logger.log(level, "lvd.kernels.%s: %s", op, message)


# ----------------------------------------------------------------------------------------------
# Why Triton cannot run (None when it can)


def triton_unavailable_reason(tensors, *, op: str, interpreted: bool, machine: Machine = DETECT) -> str | None:
    """Why our Triton kernels cannot run on these tensors, or None.

    ``interpreted`` says whether the op's kernels were decorated under ``TRITON_INTERPRET=1``
    (the flag is read at decoration, so setting it later does not help).
    """
    if not HAS_TRITON:
        return "triton is not installed"
    x = tensors[0]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"inputs are on several devices {sorted(map(str, devices))}"
    if x.device.type == "meta":
        return None  # shape-only tensors: the custom ops' fake implementations answer
    if x.device.type == "cuda":
        if interpreted:
            return "kernels were imported with TRITON_INTERPRET=1, which runs CPU tensors only"
        return None
    if x.device.type == "cpu":
        if interpreted:
            return _interpreter_bug_reason(*_versions(machine))
        if triton_interpreter_requested():
            return ("TRITON_INTERPRET=1 was set after kernels was imported; it is read when the kernels "
                    "are decorated, so set it before importing lvd.kernels")
        return "tensors are on the CPU (Triton runs them only with TRITON_INTERPRET=1)"
    return f"device {x.device.type!r} is not supported by Triton"


@functools.lru_cache(maxsize=None)
def _interpreter_bug_reason(triton_version: str, numpy_version: str) -> str | None:
    """Triton 3.6's interpreter with numpy ≥ 2.4 mis-runs ``range(0, n, BLOCK)`` over a runtime n (Triton
    issue 9171), which every kernel here uses; 3.7.1 and 3.9.0 run them correctly."""
    triton_minor = tuple(int(p) for p in triton_version.split(".")[:2])
    numpy_minor = tuple(int(p) for p in numpy_version.split(".")[:2])
    if triton_minor == (3, 6) and numpy_minor >= (2, 4):
        return (f"the triton {triton_version} interpreter with numpy {numpy_version} mis-runs loops over "
                "runtime bounds (Triton issue 9171); use triton != 3.6 or numpy < 2.4")
    return None


def _int32_reason(tensors, *, first_dims: int) -> str | None:
    """Kernels index within one (batch[, head]) slice in int32; slices must span < 2³¹ elements."""
    for t in tensors:
        extent = sum((n - 1) * abs(st) for n, st in zip(t.shape[first_dims:], t.stride()[first_dims:]) if n > 0)
        if extent >= 2**31:
            return f"one slice of a {tuple(t.shape)} tensor spans {extent} ≥ 2³¹ elements"
    return None


def _fast_gpu_reason(x: torch.Tensor, machine: Machine) -> str | None:
    """Extra conditions for "auto": CUDA capability ≥ 8.0 (Ampere and newer)."""
    if x.device.type != "cuda":
        return None
    major, minor = _capability(x, machine)
    if major < 8:
        return f"CUDA capability {major}.{minor} < 8.0"
    return None


def _resolve(op: str, requested: str, forced: bool, triton_reason: str | None, fallback: str,
             x: torch.Tensor, machine: Machine = DETECT) -> str:
    """Shared rule: a forced "triton" raises when it cannot run; "auto" (and an $LVD_KERNELS=triton
    preference) falls back and logs the reason once."""
    if requested == "triton":
        if triton_reason is None:
            return "triton"
        if forced:
            raise BackendUnavailableError(f"lvd.kernels.{op}(backend='triton'): {triton_reason}")
        _log_once(op, f"{ENV_VAR}=triton, but using {fallback}: {triton_reason}", logging.WARNING)
        return fallback
    if requested != "auto":
        return requested
    reason = triton_reason
    if reason is None and x.device.type == "cpu":
        reason = "CPU tensors (the interpreter is for tests; force backend='triton' to use it)"
    reason = reason or _fast_gpu_reason(x, machine)
    if reason is None:
        return "triton"
    _log_once(op, f"not using Triton: {reason}")
    return fallback


# ----------------------------------------------------------------------------------------------
# Per-op choices


def attention_backend(q, k, v, mask, *, backend: str, interpreted: bool, machine: Machine = DETECT,
                      return_lse: bool = False) -> str:
    """Resolve ``backend`` for :func:`lvd.kernels.attention` to one of triton / sdpa / xformers / torch.

    ``return_lse``: the caller needs the log-sum-exp, which SDPA and xformers do not return, so "auto" chooses
    between our kernel and the PyTorch reference (which stores the N_q × N_k scores): Triton wherever it runs.
    """
    requested, forced = _requested(backend)
    if requested == "xformers":
        why = None
        if not _xformers_installed(machine):
            why = "xformers is not installed (pip install lvd[xformers])"
        elif q.device.type != "cuda":
            why = f"xformers needs CUDA tensors, got {q.device.type}"
        if why is None:
            return "xformers"
        if forced:
            raise BackendUnavailableError(f"lvd.kernels.attention(backend='xformers'): {why}")
        _log_once("attention", f"{ENV_VAR}=xformers, but choosing automatically: {why}", logging.WARNING)
        requested = "auto"
    reason = triton_unavailable_reason([q, k, v] + ([mask] if mask is not None else []), op="attention",
                                       interpreted=interpreted, machine=machine)
    if reason is None and q.dtype not in TRITON_DTYPES + ((torch.float64,) if interpreted else ()):
        reason = f"dtype {q.dtype} (supported: fp16, bf16, fp32)"
    if reason is None and q.shape[-1] > MAX_HEAD_DIM:
        reason = f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if reason is None:
        reason = _int32_reason([q, k, v], first_dims=2)
    if return_lse and requested == "auto":
        return _resolve("attention", requested, forced, reason, "torch", q, machine)
    if reason is None and requested == "auto" and q.dtype == torch.float32 and q.device.type == "cuda":
        # our fp32 path keeps full fp32 products (tl.dot "ieee", no tensor cores); SDPA's fp32 kernels
        # are the safer default there (not yet measured on a GPU)
        reason = "fp32 attention (Triton's fp32 path skips tensor cores; force backend='triton' to use it)"
    choice = _resolve("attention", requested, forced, reason, "sdpa", q, machine)
    if requested == "auto" and choice == "triton" and q.device.type == "cuda":
        dtype, masked = str(q.dtype).removeprefix("torch."), mask is not None
        if machine.cuda_name is None:
            choice = _measured_attention_choice(_device_index(q), dtype, q.shape[-1], masked)
        else:
            choice = fastest_attention(machine.cuda_name, dtype, q.shape[-1], masked, attention_table())[0]
    return choice


# ----------------------------------------------------------------------------------------------
# The attention table: which of Triton / SDPA is faster, measured per GPU class


def user_attention_table_path() -> Path:
    """Where ``bench_attention.py --write-table`` records this machine's measurements:
    ``$LVD_ATTENTION_TABLE``, else ``$XDG_CACHE_HOME/lvd/attention_table.json`` (``~/.cache`` by default)."""
    if os.environ.get(ATTENTION_TABLE_ENV):
        return Path(os.environ[ATTENTION_TABLE_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lvd" / "attention_table.json"


@functools.lru_cache(maxsize=None)
def _read_table(path: str) -> tuple[dict, ...]:
    """The entries of one table file; a missing file has none, an unreadable one is a one-line warning."""
    file = Path(path)
    if not file.is_file():
        return ()
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))["entries"]
        keys = ("gpu", "dtype", "head_dim", "masked", "fastest")
        bad = [e for e in entries if not all(k in e for k in keys) or e["fastest"] not in ("triton", "sdpa")]
        if bad:
            raise ValueError(f"entry {bad[0]} needs {keys} with fastest 'triton' or 'sdpa'")
        return tuple(entries)
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("lvd.kernels: ignoring attention table %s: %s", file, e)
        return ()


def attention_table() -> list[dict]:
    """The user's measured entries first, then the ones shipped with lvd (first match wins)."""
    return [*_read_table(str(user_attention_table_path())), *_read_table(str(ATTENTION_TABLE))]


def fastest_attention(device_name: str, dtype: str, head_dim: int, masked: bool, table: list[dict]) -> tuple[str, str]:
    """(``"triton"`` or ``"sdpa"``, why) for attention on ``device_name`` (e.g. "NVIDIA H200").

    An entry matches when its ``gpu`` is a substring of the device name and dtype and ``masked`` agree; among
    those the nearest head dim wins (the earlier entry on a tie, so the user's table before ours). Without a
    match: SDPA unmasked, Triton masked (the defaults the module docstring explains)."""
    matches = [e for e in table if e["gpu"] in device_name and e["dtype"] == dtype and bool(e["masked"]) == masked]
    if matches:
        best = min(matches, key=lambda e: abs(int(e["head_dim"]) - head_dim))
        return best["fastest"], f"measured on {best['gpu']} ({best.get('source', 'no source')})"
    default = "triton" if masked else "sdpa"
    return default, f"no measurement for {device_name} {dtype} masked={masked}: default {default}"


@torch.compiler.assume_constant_result  # decided once while tracing: no graph break
def _measured_attention_choice(device_index: int, dtype: str, head_dim: int, masked: bool) -> str:
    choice, why = fastest_attention(_cuda_name(device_index), dtype, head_dim, masked, attention_table())
    _log_once("attention", f"auto chose {choice} for {dtype} head dim {head_dim} masked={masked}: {why}")
    return choice


def group_norm_backend(x, *, backend: str, interpreted: bool, machine: Machine = DETECT) -> str:
    """Resolve ``backend`` for :func:`lvd.kernels.group_norm` to "triton" or "torch"."""
    requested, forced = _requested(backend)
    if requested in ("sdpa", "xformers"):  # no such GroupNorm: these names mean "not ours" here
        return "torch"
    reason = triton_unavailable_reason([x], op="group_norm", interpreted=interpreted, machine=machine)
    if reason is None and x.dtype not in TRITON_DTYPES + ((torch.float64,) if interpreted else ()):
        reason = f"dtype {x.dtype} (supported: fp16, bf16, fp32)"
    if reason is None:
        reason = _int32_reason([x], first_dims=1)
    return _resolve("group_norm", requested, forced, reason, "torch", x, machine)


# ----------------------------------------------------------------------------------------------
# Output allocation (tests fill outputs with NaN so an element a kernel never writes shows up)

_nan_outputs = False


@contextlib.contextmanager
def nan_filled_outputs():
    """Within this block, every buffer a Triton launcher allocates starts as NaN, not garbage/zeros."""
    global _nan_outputs
    previous, _nan_outputs = _nan_outputs, True
    try:
        yield
    finally:
        _nan_outputs = previous


def new_empty(shape, *, dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled inside :func:`nan_filled_outputs`)."""
    if _nan_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """``torch.empty_like`` keeping x's dense layout (channels_last stays channels_last)."""
    out = torch.empty_like(x, dtype=dtype, memory_format=torch.preserve_format)
    if _nan_outputs:
        out.fill_(float("nan"))
    return out
