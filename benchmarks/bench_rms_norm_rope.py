"""CPU time of the fused QK-norm + RoPE op (lvd.kernels.rms_norm_rope) against its plain-ops reference.

The input is what the DiT gives it: a strided q view (B, N, H, Dh) cut out of the fused qkv Linear's output,
the 3D RoPE table of the patch grid, fp32. Forward alone (no grad) and forward + backward (grads of qkv
and the weight), median of ``--repeats`` after one warm-up, ``time.perf_counter``.

    python -m benchmarks.bench_rms_norm_rope                 # writes benchmarks/results/rms_norm_rope_cpu.json
    python -m benchmarks.bench_rms_norm_rope --grid 13x16x16 --heads 8 --head-dim 64 --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.timing import time_ms
from lvd.dit.rope import default_axes_dims, rope_3d
from lvd.kernels import rms_norm_reference, rms_norm_rope

IMPLS = {"fused": rms_norm_rope, "reference": rms_norm_reference}


def bench(grid, heads, head_dim, repeats):
    torch.manual_seed(0)
    n = grid[0] * grid[1] * grid[2]
    rope = rope_3d(grid, default_axes_dims(head_dim))[:, None]  # (N, 1, Dh/2, 2): heads inner
    qkv = torch.randn(1, n, 3 * heads * head_dim, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(head_dim))
    grad = torch.randn(1, n, heads, head_dim)
    rows = []
    for name, fn in IMPLS.items():
        def q():
            return qkv.unflatten(-1, (3, heads, head_dim)).unbind(2)[0]  # (B, N, H, Dh), strided

        def fwd():
            with torch.no_grad():
                fn(q(), weight, 1e-6, rope)

        def fwd_bwd():
            torch.autograd.grad(fn(q(), weight, 1e-6, rope), (qkv, weight), grad)

        for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            rows.append(dict(impl=name, mode=mode, shape=[1, n, heads, head_dim], ms=round(time_ms(call, repeats=repeats), 3)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", default="13x16x16", help="patch grid TxHxW (13x16x16: 3328 tokens)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=report.RESULTS / "rms_norm_rope_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = report.header("bench_rms_norm_rope", argv)
    grid = tuple(map(int, args.grid.split("x")))
    rows = bench(grid, args.heads, args.head_dim, args.repeats)
    ref = {r["mode"]: r["ms"] for r in rows if r["impl"] == "reference"}
    print(f"{'impl':>10} {'mode':>8} {'ms':>9} {'vs reference':>13}")
    for r in rows:
        r["speedup_vs_reference"] = round(ref[r["mode"]] / r["ms"], 2)
        print(f"{r['impl']:>10} {r['mode']:>8} {r['ms']:9.3f} {r['speedup_vs_reference']:12.2f}x")
    result = dict(**head, op="rms_norm_rope", device="cpu", dtype="fp32", grid=list(grid),
                  timer=f"perf_counter median of {args.repeats}", rows=rows)
    report.write(result, args.out)


if __name__ == "__main__":
    main()
