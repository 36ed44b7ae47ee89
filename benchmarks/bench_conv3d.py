"""CPU throughput of the VAE's convolution helpers (lvd.kernels.conv3d) against plain ``nn.Conv3d``.

Cases are the shapes a chunked decode of the causal VAE sees (batch 1, a few frames, fp32, no grad):

- ``conv3d``: a 3×3×3 conv over a 4-frame chunk, ours (oneDNN always) vs ``nn.Conv3d`` (PyTorch may pick its
  unblocked ``slow_conv3d`` for small batch-1 inputs), in the contiguous and the channels-last layout;
- ``split_window``: one output frame over a window of 1 cached + 2 new frames, ours (two convolutions, the
  second fused into the first's output) vs ``nn.Conv3d`` over the concatenated window.

Timer: ``time.perf_counter``, median of ``--repeats`` after one warm-up; GFLOP/s counts 2·MACs.

    python -m benchmarks.bench_conv3d                      # writes benchmarks/results/conv3d_cpu.json
    python -m benchmarks.bench_conv3d --size 128 --threads 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks import report
from benchmarks.timing import time_ms
from lvd.kernels.conv3d import conv3d, conv3d_reference, conv3d_split_window


def bench(channels, size, repeats):
    torch.manual_seed(0)
    conv = nn.Conv3d(channels, channels, 3, padding=(0, 1, 1)).eval()
    rows = []
    for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last_3d)):
        chunk = torch.randn(1, channels, 4 + 2, size, size).contiguous(memory_format=fmt)  # 4 outputs + 2 cached
        left = torch.randn(1, channels, 1, size, size).contiguous(memory_format=fmt)
        new = torch.randn(1, channels, 2, size, size).contiguous(memory_format=fmt)
        macs = channels * channels * 27 * size * size
        cases = [("conv3d", "ours", lambda: conv3d(conv, chunk), 4 * macs),
                 ("conv3d", "nn.Conv3d", lambda: conv(chunk), 4 * macs),
                 ("split_window", "ours", lambda: conv3d_split_window(conv, left, new), macs),
                 ("split_window", "nn.Conv3d", lambda: conv3d_reference(conv, new, left), macs)]
        with torch.no_grad():
            for op, impl, fn, n_macs in cases:
                ms = time_ms(fn, repeats=repeats)
                rows.append(dict(op=op, impl=impl, layout=layout, channels=channels, size=size, ms=round(ms, 3),
                                 gflops=round(2 * n_macs / ms / 1e6, 2)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--channels", default="8,64", help="comma-separated channel counts")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=report.RESULTS / "conv3d_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = report.header("bench_conv3d", argv)
    rows = []
    for c in map(int, args.channels.split(",")):
        rows += bench(c, args.size, args.repeats)
    print(f"{'op':>12} {'impl':>9} {'layout':>13} {'C':>4} {'ms':>9} {'GFLOP/s':>8}")
    for r in rows:
        print(f"{r['op']:>12} {r['impl']:>9} {r['layout']:>13} {r['channels']:>4} {r['ms']:9.3f} {r['gflops']:8.2f}")
    result = dict(**head, op="conv3d", device="cpu", dtype="fp32", timer=f"perf_counter median of {args.repeats}",
                  rows=rows)
    report.write(result, args.out)


if __name__ == "__main__":
    main()
