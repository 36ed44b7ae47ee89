"""GroupNorm + SiLU throughput: our Triton kernel vs eager and compiled PyTorch, forward and backward.

Shapes are a video VAE's, 32 groups, bf16: 1×128×17×256×256 and 1×512×5×128×128,
plus 1×128×20×256×256 for the "≥ 10× eager" target; each in both statistics modes (global, per_frame).
Backends: ``triton`` (ours), ``triton-l2`` (ours, per-frame passes over L2-sized frame slices, see
``group_norm(..., frame_slices=True)``), ``eager`` (``F.group_norm`` + ``F.silu``, i.e. ``nn.GroupNorm`` + SiLU; per-frame
by folding T into the batch) and ``compiled`` (``torch.compile`` of the same).

Bandwidth is reported two ways: ``gbps`` on the bytes an ideal fused op must move (forward: read x, write y;
backward: read x and dy, write dx) for every backend, and ``gbps_actual`` on what our kernels move
(forward reads x twice: statistics, then normalise; backward reads x and dy twice).
Goals (README, Kernels): forward ≥ 10× eager at 1×128×20×256×256, backward never slower than eager,
forward + backward ≥ 60% of the copy rate.

- On a GPU: ``triton.testing.do_bench`` (median).
- On a CPU: Triton needs a GPU, so only ``eager`` (and ``compiled`` with ``--compiled``) run, in fp32, on
  smaller default shapes (1×128×17×64×64, 1×512×5×32×32), median of ``--repeats``.

    python -m benchmarks.bench_group_norm
    python -m benchmarks.bench_group_norm --shapes 1x128x17x256x256 --modes global

Writes benchmarks/results/group_norm_<gpu name>.json (``group_norm_cpu.json`` on a CPU; ``--out``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import report
from benchmarks.timing import time_ms
from lvd import kernels

GPU_SHAPES = "1x128x17x256x256,1x512x5x128x128,1x128x20x256x256"
CPU_SHAPES = "1x128x17x64x64,1x512x5x32x32"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GROUPS = 32


def eager_group_norm_silu(x, w, b, per_frame):
    """What the models would run without our kernel: nn.GroupNorm then SiLU (frames folded into batch)."""
    if per_frame:
        bsz, c, t, h, wd = x.shape
        y = F.group_norm(x.transpose(1, 2).reshape(bsz * t, c, h, wd), GROUPS, w, b, 1e-6)  # (B·T, C, H, W)
        return F.silu(y.reshape(bsz, t, c, h, wd).transpose(1, 2))
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-6))


def backend_fn(name):
    if name in ("triton", "triton-l2"):
        def fn(x, w, b, pf):  # triton-l2: per-frame passes over L2-sized frame slices
            return kernels.group_norm(x, GROUPS, w, b, silu=True, per_frame=pf, backend="triton",
                                      frame_slices=name == "triton-l2")
        return fn
    if name == "compiled":
        return torch.compile(eager_group_norm_silu)
    return eager_group_norm_silu


def bench_case(name, shape, per_frame, dtype, *, gpu, repeats):
    device = "cuda" if gpu else "cpu"
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device=device, dtype=dtype)
    fn = backend_fn(name)
    nbytes = x.numel() * x.element_size()
    rows = []
    try:
        with torch.no_grad():
            fwd_ms = time_ms(lambda: fn(x, w, b, per_frame), gpu=gpu, repeats=repeats)
        y = fn(x, w, b, per_frame)
        bwd_ms = time_ms(lambda: y.backward(dy, retain_graph=True), gpu=gpu, repeats=repeats, grad_to_none=[x, w, b])
    except (RuntimeError, kernels.BackendUnavailableError) as e:
        return [dict(backend=name, shape=list(shape), per_frame=per_frame, mode=m,
                     skipped=f"{type(e).__name__}: {str(e)[:120]}") for m in ("fwd", "bwd")]
    for mode, ms, ideal, actual in (("fwd", fwd_ms, 2 * nbytes, 3 * nbytes), ("bwd", bwd_ms, 3 * nbytes, 5 * nbytes)):
        row = dict(backend=name, shape=list(shape), per_frame=per_frame, mode=mode, ms=round(ms, 4),
                   gbps=round(ideal / ms / 1e6, 2))
        if name.startswith("triton"):
            row["gbps_actual"] = round(actual / ms / 1e6, 2)
        rows.append(row)
    return rows


def main(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=GPU_SHAPES if gpu else CPU_SHAPES, help="BxCxTxHxW, comma-separated")
    p.add_argument("--modes", default="global,per_frame")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32")
    p.add_argument("--backends", default="triton,triton-l2,eager,compiled" if gpu else "eager")
    p.add_argument("--repeats", type=int, default=3, help="CPU timing repeats (median)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    device_name = torch.cuda.get_device_name(0) if gpu else "cpu"
    dtype = DTYPES[args.dtype]
    if not gpu and dtype != torch.float32:
        p.error("on a CPU time fp32 only")
    head = report.header("bench_group_norm", argv)
    rows = []
    for shape in (tuple(map(int, s.split("x"))) for s in args.shapes.split(",")):
        for per_frame in (m == "per_frame" for m in args.modes.split(",")):
            case_rows = []
            for name in args.backends.split(","):
                case_rows += bench_case(name, shape, per_frame, dtype, gpu=gpu, repeats=args.repeats)
            eager = {r["mode"]: r["ms"] for r in case_rows if r["backend"] == "eager" and "ms" in r}
            for r in case_rows:
                if "ms" in r and r["mode"] in eager:
                    r["speedup_vs_eager"] = round(eager[r["mode"]] / r["ms"], 2)
                print(f"{r['backend']:>9} {'x'.join(map(str, shape)):>18} {'per_frame' if per_frame else 'global':>9} "
                      f"{r['mode']}: " + (f"{r['ms']:9.3f} ms {r['gbps']:8.1f} GB/s" if "ms" in r else r["skipped"]),
                      flush=True)
            rows += case_rows
    result = dict(
        **head, op="group_norm_silu", device=device_name, dtype=args.dtype, groups=GROUPS,
        timer="triton.testing.do_bench median" if gpu else f"perf_counter median of {args.repeats}",
        bytes="gbps: ideal bytes (fwd x+y, bwd x+dy+dx); gbps_actual: bytes our kernels request (fwd 3×, bwd 5× |x|;"
              " with triton-l2 the second read of each pass may come from L2)",
        note=None if gpu else "Triton timings need a GPU: on a CPU the kernels run only in the interpreter",
        targets_h100_bf16={"fraction_of_hbm": 0.8, "hbm_gbps": 3000, "speedup_vs_eager_1x128x20x256x256": 10},
        rows=rows,
    )
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    report.write(result, args.out or report.RESULTS / f"group_norm_{slug}.json")


if __name__ == "__main__":
    main()
