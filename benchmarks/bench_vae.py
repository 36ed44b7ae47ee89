"""Video VAE encode/decode: time, achieved GFLOP/s and peak memory on this CPU.

    python -m benchmarks.bench_vae                 # 1×3×9×128×128, memory sweep 256–1024 px (several minutes)
    python -m benchmarks.bench_vae --big           # also 1×3×17×256×256 (slow: tens of minutes on 2 cores)
    python -m benchmarks.bench_vae --quick         # smoke run: 64 px, tiny sweep
    python -m benchmarks.bench_vae --big --cases ours-base,ours-base-chunked --default-layout \
        --out benchmarks/results/vae_default_layout.json   # ours without the channels-last CPU layout

Compared, all with random weights, fp32, ``--threads`` threads:
- ours, the ``base`` preset (CogVideoX's widths and depths), whole clip and chunked (``enable_tiling(spatial=False)``);
- diffusers ``AutoencoderKLCogVideoX()`` and ``AutoencoderKLWan()`` default configs, through their own
  ``encode``/``decode`` (CogVideoX already processes frames in small batches with a conv cache);
- a small-channel model of ours, tiled + chunked decode of 17-frame clips at 256…1024 px: the peak memory
  should stay flat apart from the output tensor itself, which is listed beside it.

The ceiling is the fp32 matmul rate (2048² GEMMs), measured in the same run before and after.

Each case runs twice, each time in a fresh subprocess, after a warm-up on a small clip:
- the **time** run, with glibc's default settings (what a user's process has) and nothing else active; its
  seconds are the reported ``seconds``;
- the **memory** run, with glibc told to return freed blocks ≥ 128 KiB to the system at once (``MALLOC_ENV``),
  so that RSS follows live tensors. Peak memory is the process's VmHWM after resetting it
  (``/proc/self/clear_refs``), reported absolute and as the rise over the RSS just before the call. Every
  freed block then goes back to the kernel, and every new tensor page-faults in afresh, which slows the call
  (ours chunked 9×128² encode: 4.97 s against 3.49 s): those seconds are kept as ``seconds_memory_run``.
  diffusers' FLOPs are counted here by ``torch.utils.flop_counter.FlopCounterMode``; ours on a meta-device copy.

Writes ``benchmarks/results/vae.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report

REPO = Path(__file__).resolve().parents[1]
# glibc otherwise keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in the heap, so RSS
# shows memory no tensor holds any more: chunked and whole-clip encode then both read ~530 MiB peak rise.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
SMALL_CHANNEL = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, spatial_compression=8,
                     temporal_compression=4, norm_num_groups=4, mid_attention=False)


# ----- measurements inside one subprocess ---------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(fn, count: bool):
    """(result, seconds, flops or None, peak_rss_MiB, peak_rise_MiB) of one call; the peaks mean live
    memory only in the memory run (``MALLOC_ENV``)."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    counter = FlopCounterMode(display=False) if count else contextlib.nullcontext()
    with torch.no_grad(), counter:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    return out, seconds, counter.get_total_flops() if count else None, peak / 1024, (peak - before) / 1024


def _meta_flops(vae, shape) -> tuple[int, int]:
    """(encode, decode) FLOPs of our model, counted on a meta-device copy: on CPU our convs call oneDNN
    directly (``lvd.kernels.conv3d``), which the FLOP counter does not see."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta = type(vae).from_config(vae.config)
        meta.tiling = vae.tiling
        x = torch.empty(shape)
        with FlopCounterMode(display=False) as enc:
            z = meta.encode_posterior(x).mean
        with FlopCounterMode(display=False) as dec:
            meta.decode_raw(z)
    return enc.get_total_flops(), dec.get_total_flops()


def _build(kind: str):
    import torch

    torch.manual_seed(0)
    if kind in ("ours-base", "ours-base-chunked"):
        from lvd.vae import CausalVideoVAE

        vae = CausalVideoVAE.from_preset("base")
        if kind.endswith("chunked"):
            vae.enable_tiling(spatial=False, chunk_latent_frames=1)
        return vae.eval(), (lambda x: vae.encode_posterior(x).mean), vae.decode_raw
    if kind == "ours-small-tiled":
        from lvd.vae import CausalVideoVAE

        vae = CausalVideoVAE(**SMALL_CHANNEL).eval()
        vae.enable_tiling(tile_size=256, overlap=64, chunk_latent_frames=1)
        return vae, (lambda x: vae.encode_posterior(x).mean), vae.decode_raw
    logging.getLogger("xformers").setLevel(logging.ERROR)
    import diffusers

    cls = {"diffusers-cogvideox": diffusers.AutoencoderKLCogVideoX, "diffusers-wan": diffusers.AutoencoderKLWan}[kind]
    vae = cls().eval()
    return vae, (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample)


def run_case(spec: dict) -> dict:
    """One model on one clip: encode (unless decode_only) and decode, measured as ``spec["measure"]`` says:
    "time" (no FLOP counter running) or "memory" (peaks, FLOPs, and the seconds of that run)."""
    import torch

    torch.set_num_threads(spec["threads"])
    vae, encode, decode = _build(spec["kind"])
    if spec.get("default_layout") and hasattr(vae, "set_cpu_channels_last"):  # ours only
        vae.set_cpu_channels_last(False)
    b, t, h, w = spec["shape"]
    x = torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():  # warm-up on a small clip: first-call library set-up is not what we measure
        s = 64 if spec["kind"] != "ours-small-tiled" else 32
        decode(encode(x[:, :, :5, :s, :s]))
    row = {"case": spec["kind"], "shape": [b, 3, t, h, w], "threads": spec["threads"],
           "params_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 1)}
    ours = spec["kind"].startswith("ours")
    if ours:
        row["layout"] = "default" if spec.get("default_layout") else "channels_last_3d (CPU inference)"
    timing = spec["measure"] == "time"
    count = not ours and not timing
    enc_flops, dec_flops = _meta_flops(vae, (b, 3, t, h, w)) if ours and not timing else (None, None)

    def part(sec, flops, peak, rise):
        if timing:
            return dict(seconds=round(sec, 3))
        return dict(seconds_memory_run=round(sec, 3), gflop=round(flops / 1e9, 1), peak_rss_MiB=round(peak),
                    peak_rise_MiB=round(rise))

    if spec.get("decode_only"):
        lat_c = vae.config.latent_channels
        s_, r_ = vae.spatial_compression, vae.temporal_compression
        z = torch.randn(b, lat_c, 1 + (t - 1) // r_, h // s_, w // s_)
    else:
        z, sec, flops, peak, rise = _measure(lambda: encode(x), count=count)
        row["encode"] = part(sec, enc_flops or flops, peak, rise)
    del x
    video, sec, flops, peak, rise = _measure(lambda: decode(z), count=count)
    row["decode"] = part(sec, dec_flops or flops, peak, rise)
    row["output_MiB"] = round(video.numel() * video.element_size() / 2**20, 1)
    return row


# ----- orchestration --------------------------------------------------------------------------------
def matmul_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def _spawn_one(spec: dict, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(HF_HUB_OFFLINE="1", **(MALLOC_ENV if spec["measure"] == "memory" else {}))
    cmd = [sys.executable, "-m", "benchmarks.bench_vae", "--case", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"case": spec["kind"], "shape": spec["shape"], "error": f"{spec['measure']} run timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"case": spec["kind"], "shape": spec["shape"], "error": proc.stderr.strip()[-800:]}
    return json.loads(lines[-1])


def spawn(spec: dict, timeout: float) -> dict:
    """The case's time run, then its memory run, merged into one row (see the module docstring)."""
    timed = _spawn_one({**spec, "measure": "time"}, timeout)
    if "error" in timed:
        return timed
    row = _spawn_one({**spec, "measure": "memory"}, timeout)
    if "error" in row:
        return row
    for key in ("encode", "decode"):
        if key in row:
            sec = timed[key]["seconds"]
            row[key] = dict(seconds=sec, gflop=row[key]["gflop"], gflops_per_s=round(row[key]["gflop"] / sec, 1),
                            **{k: v for k, v in row[key].items() if k != "gflop"})
    return row


def _fmt(part: dict | None) -> str:
    if not part:
        return f"{'—':>36}"
    return f"{part['seconds']:7.2f} s {part['gflop']:8.1f} GF {part['gflops_per_s']:6.1f} GF/s {part['peak_rss_MiB']:6d} MiB"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--big", action="store_true", help="also 1×3×17×256×256 (slow)")
    p.add_argument("--quick", action="store_true", help="smoke run on small clips")
    p.add_argument("--sweep-frames", type=int, default=17, help="frames of the memory-sweep clips (1 + 4k)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--out", type=Path, default=report.RESULTS / "vae.json")
    p.add_argument("--cases", default=None,
                   help="comma list of kinds to run (ours-base, ours-base-chunked, diffusers-cogvideox, diffusers-wan, "
                        "ours-small-tiled); default: all")
    p.add_argument("--default-layout", action="store_true",
                   help="run our VAE in the default (channels-first) layout on CPU: vae.set_cpu_channels_last(False)")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))), flush=True)
        return

    import torch

    torch.set_num_threads(args.threads)
    head = report.header("bench_vae", argv)
    shapes = [(1, 5, 64, 64)] if args.quick else [(1, 9, 128, 128)] + ([(1, 17, 256, 256)] if args.big else [])
    sweep = [64, 128] if args.quick else [256, 512, 1024]
    rate_before = matmul_gflops(args.threads)
    print(f"fp32 matmul (2048², {args.threads} threads): {rate_before:.1f} GFLOP/s", flush=True)
    rows = []
    wanted = set(args.cases.split(",")) if args.cases else None
    layout = {"default_layout": True} if args.default_layout else {}
    for shape in shapes:
        for kind in ("ours-base", "ours-base-chunked", "diffusers-cogvideox", "diffusers-wan"):
            if wanted is not None and kind not in wanted:
                continue
            rows.append(spawn({"kind": kind, "shape": list(shape), "threads": args.threads, **layout}, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    for size in sweep if wanted is None or "ours-small-tiled" in wanted else []:
        spec = {"kind": "ours-small-tiled", "shape": [1, args.sweep_frames, size, size], "threads": args.threads,
                "decode_only": True, **layout}
        rows.append(spawn(spec, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    rate_after = matmul_gflops(args.threads)
    rate = (rate_before + rate_after) / 2

    print(f"\nfp32 matmul: {rate_before:.1f} GFLOP/s before, {rate_after:.1f} after; "
          f"load average {os.getloadavg()[0]:.1f} (2 cores shared with other jobs)")
    print(f"{'case':22} {'clip':>16} | {'encode':^36} | {'decode':^36} | % of matmul (enc/dec)")
    for r in rows:
        clip = "x".join(str(v) for v in r["shape"][2:])
        if "error" in r:
            print(f"{r['case']:22} {clip:>16} | error: {r['error'][:120]}")
            continue
        pct = "/".join(f"{100 * r[k]['gflops_per_s'] / rate:.0f}%" if k in r else "—" for k in ("encode", "decode"))
        print(f"{r['case']:22} {clip:>16} | {_fmt(r.get('encode'))} | {_fmt(r.get('decode'))} | {pct}"
              + (f"  (output {r['output_MiB']} MiB, decode peak rise {r['decode']['peak_rise_MiB']} MiB)"
                 if r["case"] == "ours-small-tiled" else ""))

    result = {**head, "load_average_1min_at_end": round(os.getloadavg()[0], 2),
              "matmul_gflops": {"before": round(rate_before, 1), "after": round(rate_after, 1)},
              "method": {"seconds": "time run: fresh process, default glibc malloc, no FLOP counter",
                         "peak_rss_MiB, peak_rise_MiB, seconds_memory_run": f"memory run: fresh process, {MALLOC_ENV}"},
              "rows": rows}
    report.write(result, args.out)


if __name__ == "__main__":
    main()
