"""Attention throughput: our Triton flash attention vs SDPA, xformers and the compiled reference.

Shapes are a video DiT's: B=1, H=24, N ∈ {4k, 8k, 16k, 32k, 64k}, D ∈ {64, 128},
self-attention, bf16. For each (backend, N, D) it times the forward and the backward alone (dO → dQ, dK, dV,
graph kept) and reports ms and TFLOP/s with the FlashAttention convention: forward 4·B·H·N_q·N_k·D FLOPs,
backward 2.5× that (halved when causal).

- On a GPU: ``triton.testing.do_bench`` (median), backends ``triton`` (ours), ``sdpa``, ``xformers`` when
  installed, and ``compiled`` = ``torch.compile(attention_reference)`` where its N×N score matrix fits in memory.
  Goals (README, Kernels): forward and backward ≥ 0.9× SDPA at D=128, masked ≥ 1.3× SDPA.
- On a CPU: Triton needs a GPU (the interpreter is a correctness tool, ~3 ms per program instance), so
  only ``sdpa`` and ``torch`` (the eager reference) are timed, in fp32 at small N, median of ``--repeats``.

    python -m benchmarks.bench_attention                          # GPU: full sweep; CPU: small fp32 sweep
    python -m benchmarks.bench_attention --n 4096,16384 --d 128 --causal
    python -m benchmarks.bench_attention --n 4096,16384 --d 64,128 --backends triton,sdpa --write-table
    python -m benchmarks.bench_attention --masked 0.1 --backends triton,sdpa --write-table   # key-padding mask

``--masked F`` drops the last fraction F of keys through a (B, N) boolean mask (SDPA then takes that mask as
``attn_mask``). ``--write-table [PATH]`` records, per head dim, which of triton / sdpa is faster here
(geometric mean of forward and backward times) in the attention table that ``backend="auto"`` reads:
by default this machine's own (``lvd.kernels.dispatch.user_attention_table_path()``); the table shipped
with lvd is ``lvd/kernels/attention_table.json``.

Writes benchmarks/results/attention_<gpu name>.json (``attention_cpu.json`` on a CPU; ``--out``) and prints
a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.timing import time_ms
from lvd import kernels
from lvd.kernels import dispatch

logging.getLogger("xformers").setLevel(logging.ERROR)
GPU_N = (4096, 8192, 16384, 32768, 65536)
CPU_N = (1024, 2048)
COMPILED_SCORE_BUDGET = 0.25  # of GPU memory: the compiled reference materialises (B, H, N, N) fp32 scores
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def flops(b, h, nq, nk, d, causal, mode):
    fwd = 4 * b * h * nq * nk * d * (0.5 if causal else 1.0)
    return fwd if mode == "fwd" else 2.5 * fwd


def backend_fn(name, causal, mask=None):
    """(callable(q, k, v) -> out, skip reason or None)."""
    if name == "compiled":
        ref = torch.compile(kernels.attention_reference)
        return lambda q, k, v: ref(q, k, v, mask=mask, causal=causal), None
    if name == "xformers" and not dispatch.has_xformers():
        return None, "xformers not installed"
    return lambda q, k, v: kernels.attention(q, k, v, mask=mask, causal=causal, backend=name), None


def key_mask(b, n, masked, device):
    """(B, N) bool, the last ``masked`` fraction of keys False; None when masked == 0."""
    if not masked:
        return None
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    mask[:, n - int(n * masked):] = False
    return mask


def bench_case(name, b, h, n, d, dtype, causal, *, gpu, repeats, masked=0.0):
    rows = []
    fn, skip = backend_fn(name, causal, key_mask(b, n, masked, "cuda" if gpu else "cpu"))
    if skip is None and name in ("compiled", "torch"):
        score_bytes = b * h * n * n * 4 * 3  # scores, probabilities and their grads, fp32
        budget = torch.cuda.get_device_properties(0).total_memory * COMPILED_SCORE_BUDGET if gpu else 4e9
        if score_bytes > budget:
            skip = f"N×N scores need {score_bytes / 1e9:.0f} GB"
    if skip is not None:
        return [dict(backend=name, n=n, d=d, mode=m, skipped=skip) for m in ("fwd", "bwd")]
    device = "cuda" if gpu else "cpu"
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(b, h, n, d, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            fwd_ms = time_ms(lambda: fn(q, k, v), gpu=gpu, repeats=repeats)
        out = fn(q, k, v)
        bwd_ms = time_ms(lambda: out.backward(do, retain_graph=True), gpu=gpu, repeats=repeats,
                         grad_to_none=[q, k, v])
    except (RuntimeError, dispatch.BackendUnavailableError) as e:  # e.g. OOM, unsupported shape
        if gpu:
            torch.cuda.empty_cache()
        return [dict(backend=name, n=n, d=d, mode=m, skipped=f"{type(e).__name__}: {str(e)[:120]}")
                for m in ("fwd", "bwd")]
    for mode, ms in (("fwd", fwd_ms), ("bwd", bwd_ms)):
        rows.append(dict(backend=name, n=n, d=d, mode=mode, ms=round(ms, 4),
                         tflops=round(flops(b, h, n, n, d, causal, mode) / ms / 1e9, 3)))
    return rows


def fastest(rows):
    """("triton" or "sdpa", geometric-mean time ratio triton/sdpa) over the cases both ran; (None, None) if none."""
    times = {}
    for r in rows:
        if "ms" in r and r["backend"] in ("triton", "sdpa"):
            times.setdefault((r["n"], r["d"], r["mode"]), {})[r["backend"]] = r["ms"]
    both = [t for t in times.values() if len(t) == 2]
    if not both:
        return None, None
    ratio = math.exp(sum(math.log(t["triton"] / t["sdpa"]) for t in both) / len(both))
    return ("triton" if ratio < 1 else "sdpa"), round(ratio, 3)


def write_table(path, rows, *, device_name, dtype, masked, source):
    """Merge this run's winners, one entry per head dim, into the table at ``path``; same-key entries are replaced."""
    gpu_class = device_name.removeprefix("NVIDIA ").strip()
    entries = json.loads(path.read_text())["entries"] if path.is_file() else []
    for d in sorted({r["d"] for r in rows}):
        winner, ratio = fastest([r for r in rows if r["d"] == d])
        if winner is None:
            continue
        entry = dict(gpu=gpu_class, dtype=str(dtype).removeprefix("torch."), head_dim=d, masked=bool(masked),
                     fastest=winner, ms_ratio_triton_over_sdpa=ratio,
                     n=sorted({r["n"] for r in rows if r["d"] == d}), source=source)
        key = ("gpu", "dtype", "head_dim", "masked")
        entries = [e for e in entries if tuple(e.get(k) for k in key) != tuple(entry[k] for k in key)] + [entry]
        print(f"table: {gpu_class} {entry['dtype']} D={d} masked={entry['masked']}: {winner} (triton/sdpa time {ratio})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(entries=entries), indent=1) + "\n")
    print(f"wrote {path}")


def main(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", default=",".join(map(str, GPU_N if gpu else CPU_N)), help="sequence lengths")
    p.add_argument("--d", default="64,128", help="head dims")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backends", default="triton,sdpa,xformers,compiled" if gpu else "sdpa,torch")
    p.add_argument("--repeats", type=int, default=3, help="CPU timing repeats (median)")
    p.add_argument("--masked", type=float, default=0.0, metavar="F",
                   help="key-padding mask dropping the last fraction F of keys (default: no mask)")
    p.add_argument("--write-table", type=Path, nargs="?", const=dispatch.user_attention_table_path(), default=None,
                   metavar="PATH", help="record the faster of triton/sdpa per head dim (default PATH: %(const)s)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not 0 <= args.masked < 1:
        p.error(f"--masked {args.masked}: give a fraction in [0, 1)")

    device_name = torch.cuda.get_device_name(0) if gpu else "cpu"
    dtype = DTYPES[args.dtype]
    if not gpu and dtype != torch.float32:
        p.error("on a CPU time fp32 only (bf16 matmul runs at ~0.3 GFLOP/s here)")
    torch.set_grad_enabled(True)
    head = report.header("bench_attention", argv)
    rows = []
    for d in map(int, args.d.split(",")):
        for n in map(int, args.n.split(",")):
            for name in args.backends.split(","):
                rows += bench_case(name, args.batch, args.heads, n, d, dtype, args.causal, gpu=gpu,
                                   repeats=args.repeats, masked=args.masked)
                last = rows[-2:]
                print(" | ".join(f"{r['backend']:>9} N={n:>6} D={d:>3} {r['mode']}: " +
                                 (f"{r['ms']:9.3f} ms {r['tflops']:8.2f} TFLOP/s" if "ms" in r else r["skipped"])
                                 for r in last), flush=True)
    winner, ratio = fastest(rows)
    if winner:
        print(f"faster of triton/sdpa here (geometric mean of fwd+bwd ms): {winner} (triton/sdpa time {ratio})")
    triton_version = getattr(dispatch.triton, "__version__", None) if dispatch.HAS_TRITON else None
    result = dict(
        **head, op="attention", fastest_of_triton_and_sdpa=winner, ms_ratio_triton_over_sdpa=ratio,
        device=device_name, dtype=args.dtype, batch=args.batch, heads=args.heads, causal=args.causal,
        masked=args.masked, triton=triton_version,
        timer="triton.testing.do_bench median" if gpu else f"perf_counter median of {args.repeats}",
        flops="fwd 4·B·H·N²·D, bwd 2.5× fwd (halved when causal)",
        note=None if gpu else "Triton timings need a GPU: on a CPU the kernels run only in the interpreter",
        targets_h100_bf16={"fwd_d128_tflops": 400, "bwd_tflops": 240},
        rows=rows,
    )
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    out = report.write(result, args.out or report.RESULTS / f"attention_{slug}{'_masked' if args.masked else ''}.json")
    if args.write_table:
        write_table(args.write_table, rows, device_name=device_name, dtype=dtype, masked=args.masked,
                    source=f"{out.name} ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, triton {triton_version})")


if __name__ == "__main__":
    main()
