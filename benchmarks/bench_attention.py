"""Attention throughput: our Triton flash attention vs SDPA, xformers and the compiled reference.

Shapes are the video-DiT ones from the kernels issue: B=1, H=24, N ∈ {4k, 8k, 16k, 32k, 64k}, D ∈ {64, 128},
self-attention, bf16. For each (backend, N, D) it times the forward and the backward alone (dO → dQ, dK, dV,
graph kept) and reports ms and TFLOP/s with the FlashAttention convention: forward 4·B·H·N_q·N_k·D FLOPs,
backward 2.5× that (halved when causal).

- On a GPU: ``triton.testing.do_bench`` (median), backends ``triton`` (ours), ``sdpa``, ``xformers`` when
  installed, and ``compiled`` = ``torch.compile(attention_reference)`` where its N×N score matrix fits in memory.
  Targets on an H100 in bf16 (issue 3): forward at D=128 ≥ 400 TFLOP/s, backward ≥ 240 TFLOP/s.
- On a CPU: Triton needs a GPU (the interpreter is a correctness tool, ~3 ms per program instance), so
  only ``sdpa`` and ``torch`` (the eager reference) are timed, in fp32 at small N, median of ``--repeats``.

    python benchmarks/bench_attention.py                          # GPU: full sweep; CPU: small fp32 sweep
    python benchmarks/bench_attention.py --n 4096,16384 --d 128 --causal

Writes benchmarks/results/attention_<gpu name>.json (``attention_cpu.json`` on a CPU; ``--out``) and prints
a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import logging
import platform
import re
import statistics
import sys
import time
from pathlib import Path

logging.getLogger("xformers").setLevel(logging.ERROR)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lvd import kernels  # noqa: E402
from lvd.kernels import dispatch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GPU_N = (4096, 8192, 16384, 32768, 65536)
CPU_N = (1024, 2048)
COMPILED_SCORE_BUDGET = 0.25  # of GPU memory: the compiled reference materialises (B, H, N, N) fp32 scores
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def flops(b, h, nq, nk, d, causal, mode):
    fwd = 4 * b * h * nq * nk * d * (0.5 if causal else 1.0)
    return fwd if mode == "fwd" else 2.5 * fwd


def time_ms(fn, *, gpu, repeats, grad_to_none=None):
    """Median milliseconds of fn(): do_bench on a GPU, perf_counter after one warm-up on a CPU."""
    if gpu:
        import triton.testing

        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def backend_fn(name, causal):
    """(callable(q, k, v) -> out, skip reason or None)."""
    if name == "compiled":
        ref = torch.compile(kernels.attention_reference)
        return lambda q, k, v: ref(q, k, v, causal=causal), None
    if name == "xformers" and not dispatch.has_xformers():
        return None, "xformers not installed"
    return lambda q, k, v: kernels.attention(q, k, v, causal=causal, backend=name), None


def bench_case(name, b, h, n, d, dtype, causal, *, gpu, repeats):
    rows = []
    fn, skip = backend_fn(name, causal)
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
    """"triton" or "sdpa", whichever has the lower geometric-mean time over the cases both ran; or None."""
    times = {}
    for r in rows:
        if "ms" in r and r["backend"] in ("triton", "sdpa"):
            times.setdefault((r["n"], r["d"], r["mode"]), {})[r["backend"]] = r["ms"]
    both = [t for t in times.values() if len(t) == 2]
    if not both:
        return None
    log_ratio = sum(math.log(t["triton"] / t["sdpa"]) for t in both) / len(both)
    return "triton" if log_ratio < 0 else "sdpa"


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
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    device_name = torch.cuda.get_device_name(0) if gpu else "cpu"
    dtype = DTYPES[args.dtype]
    if not gpu and dtype != torch.float32:
        p.error("on a CPU time fp32 only (bf16 matmul runs at ~0.3 GFLOP/s here)")
    torch.set_grad_enabled(True)
    rows = []
    for d in map(int, args.d.split(",")):
        for n in map(int, args.n.split(",")):
            for name in args.backends.split(","):
                rows += bench_case(name, args.batch, args.heads, n, d, dtype, args.causal, gpu=gpu,
                                   repeats=args.repeats)
                last = rows[-2:]
                print(" | ".join(f"{r['backend']:>9} N={n:>6} D={d:>3} {r['mode']}: " +
                                 (f"{r['ms']:9.3f} ms {r['tflops']:8.2f} TFLOP/s" if "ms" in r else r["skipped"])
                                 for r in last), flush=True)
    winner = fastest(rows)
    if winner:
        print(f"faster of triton/sdpa here (geometric mean of fwd+bwd ms): {winner}; record it in "
              f"lvd.kernels.dispatch.ATTENTION_FASTEST[{device_name!r}]")
    result = dict(
        op="attention", fastest_of_triton_and_sdpa=winner, device=device_name, dtype=args.dtype, batch=args.batch, heads=args.heads,
        causal=args.causal, torch=torch.__version__, python=platform.python_version(),
        load_average=None if gpu else [round(v, 2) for v in os.getloadavg()],
        timer="triton.testing.do_bench median" if gpu else f"perf_counter median of {args.repeats}",
        flops="fwd 4·B·H·N²·D, bwd 2.5× fwd (halved when causal)",
        note=None if gpu else "Triton timings need a GPU: on a CPU the kernels run only in the interpreter",
        targets_h100_bf16={"fwd_d128_tflops": 400, "bwd_tflops": 240},
        rows=rows,
    )
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    out = args.out or RESULTS / f"attention_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
