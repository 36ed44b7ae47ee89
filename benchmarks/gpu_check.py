"""One-shot GPU check: kernel correctness, tuning cost, kernel tables, DiT and VAE against diffusers, and the
stage-2 recipe with bf16 + compile + resume. About 8-9 minutes on one H200 (the two Inductor compiles of the
recipe take half of it) from a machine whose Python has
torch and triton (diffusers, webdataset and braceexpand may come as wheels on PYTHONPATH; the DiT/VAE
comparisons skip diffusers' models where it is missing).

    python -m benchmarks.gpu_check                          # every part
    python -m benchmarks.gpu_check --parts kernels,tuning   # some parts
    python -m benchmarks.gpu_check --dry-run                # on a CPU: tiny sizes through every part's code

Each part runs in its own process under a time limit (a crash or hang loses that part only) and writes
``OUT/<part>.json`` (default OUT: benchmarks/results/gpu_<gpu>_<date>/); a table of the headline figures comes
last (``OUT/summary.json``). The attention part records the faster backend per head dim and mask in
``OUT/attention_table.json``, in the format of lvd/kernels/attention_table.json. Parts share one Triton cache
(``OUT/../triton-cache`` unless TRITON_CACHE_DIR is set), so nothing already tuned is tuned again, except in the
``tuning`` part, which measures that cost in a fresh cache on purpose.

The machine need not have lvd installed: the parts, and the recipe they run, find it through PYTHONPATH, which the
driver sets to the repository root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

REPO = Path(__file__).resolve().parents[1]

# In the order they run: correctness and the training path first. Limits are each part's most seconds.
PARTS = ("env", "dit", "recipe", "tuning", "attention", "kernels", "vae", "group_norm")
LIMITS_S = dict(env=30, dit=100, recipe=200, tuning=80, attention=120, kernels=120, vae=50, group_norm=50)


# ----------------------------------------------------------------------------------------------
# Helpers


def cuda_ms(fn, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` by CUDA events (perf_counter on a CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def rel_err(out, ref) -> float:
    """max |out − ref| / max |ref| (0 when both are zero)."""
    scale = ref.abs().max().item()
    return (out.double() - ref).abs().max().item() / (scale or 1.0)


def device_and_dtype(dry_run: bool):
    import torch

    if dry_run or not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Parts: each returns a JSON-able dict


def part_env(args) -> dict:
    import torch

    info = dict(report.header("gpu_check", []), cuda=torch.version.cuda, gpu=None)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    shared_memory_per_block_optin=getattr(props, "shared_memory_per_block_optin", None))
    return info


def part_kernels(args) -> dict:
    """Random shapes, Triton forced, forward and every gradient against float64 references."""
    import torch

    from lvd import kernels

    device = torch.device("cpu" if args.dry_run else "cuda")
    gen = torch.Generator().manual_seed(0)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
    dtypes = [torch.float32] if args.dry_run else [torch.bfloat16, torch.float16, torch.float32]
    rows = []

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    # (dtype, head dim, causal, masked): each combination compiles every tuning candidate (~1 s each), so the
    # GPU run checks four that cover the DiT's cases, an odd head dim and the fp32 path; lengths are random.
    attention_cases = [(torch.float32, 32, False, False), (torch.float32, 32, True, True)] if args.dry_run else [
        (torch.bfloat16, 128, False, False), (torch.bfloat16, 64, False, True), (torch.float16, 80, True, False),
        (torch.float32, 32, False, True)]
    for dtype, d, causal, masked in attention_cases:
        b, h = randint(1, 2), randint(1, 3)
        nq, nk = (randint(5, 40), randint(5, 40)) if args.dry_run else (randint(100, 2100), randint(100, 2100))
        q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype).requires_grad_()
                   for n in (nq, nk, nk))
        mask = None
        if masked:
            mask = torch.rand(b, nk, generator=gen).to(device) > 0.2
            mask[:, 0] = True
        out = kernels.attention(q, k, v, mask=mask, causal=causal, backend="triton")
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = kernels.attention_reference(q64, k64, v64, mask=mask, causal=causal)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
        errors = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
        rows.append(dict(op="attention", dtype=str(dtype), shape=[b, h, nq, nk, d], causal=causal, masked=masked,
                         max_rel_err=max(errors), ok=max(errors) <= tol[dtype]))
    for dtype in dtypes[:2]:  # bf16 and fp16 on a GPU (each GroupNorm variant compiles on first use)
        for case in range(2):
            groups = [8, 32][case] if not args.dry_run else 2
            c = groups * randint(1, 4)
            t = randint(1, 5)
            hw = randint(3, 9) if args.dry_run else randint(17, 90)
            x = (torch.randn(1, c, t, hw, hw, generator=gen) * 3 + 1).to(device, dtype).requires_grad_()
            w = torch.randn(c, generator=gen).to(device, dtype).requires_grad_()
            bias = torch.randn(c, generator=gen).to(device, dtype).requires_grad_()
            per_frame, silu = case % 2 == 0, case != 1
            y = kernels.group_norm(x, groups, w, bias, silu=silu, per_frame=per_frame, backend="triton")
            dy = torch.randn_like(y)
            grads = torch.autograd.grad(y, (x, w, bias), dy)
            x64, w64, b64 = (t_.detach().double().requires_grad_() for t_ in (x, w, bias))
            ref = kernels.group_norm_reference(x64, groups, w64, b64, silu=silu, per_frame=per_frame)
            ref_grads = torch.autograd.grad(ref, (x64, w64, b64), dy.double())
            errors = [rel_err(y, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
            rows.append(dict(op="group_norm", dtype=str(dtype), shape=list(x.shape), groups=groups, per_frame=per_frame,
                             silu=silu, max_rel_err=max(errors), ok=max(errors) <= tol[dtype]))
    return dict(tolerance={str(k): v for k, v in tol.items()}, all_ok=all(r["ok"] for r in rows), rows=rows)


TUNING_PROBE = r'''
import json, sys, time, torch
from lvd import kernels
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
out = []
for n in map(int, sys.argv[1].split(",")):
    q, k, v = (torch.randn(1, 8, n, 128, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    kernels.attention(q, k, v, backend="triton" if device == "cuda" else "auto").sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    out.append(dict(n=n, first_call_s=round(time.perf_counter() - start, 3)))
print(json.dumps(out))
'''


def part_tuning(args) -> dict:
    """First-call cost of the Triton attention (forward + backward) per new length, in a fresh Triton cache:
    process 1 compiles and tunes, then meets a length in a tuned bucket and one in a new bucket; process 2
    starts with the cache process 1 left."""
    lengths = "40,50,300" if args.dry_run else "3000,3500,5000"
    with tempfile.TemporaryDirectory(prefix="lvd-tune-") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        runs = []
        for process in (1, 2):
            out = subprocess.run([sys.executable, "-c", TUNING_PROBE, lengths], env=env, cwd=REPO, capture_output=True,
                                 text=True, timeout=LIMITS_S["tuning"] // 2)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
            runs.append(dict(process=process, calls=json.loads(out.stdout.strip().splitlines()[-1])))
    first, second = runs
    new_bucket = first["calls"][2]["first_call_s"]
    return dict(note="fwd+bwd, B=1 H=8 D=128 bf16; 3000 and 3500 share the 4096 bucket, 5000 is in 8192",
                runs=runs, new_bucket_warm_compile_s=new_bucket,
                second_process_max_s=max(c["first_call_s"] for c in second["calls"]), goal_s=2.0)


def part_attention(args) -> dict:
    from benchmarks import bench_attention

    out = Path(args.out)
    table = out / "attention_table.json"
    common = ["--backends", "triton,sdpa", "--write-table", str(table)]
    if args.dry_run:
        common = ["--backends", "sdpa,torch", "--repeats", "1"]
        sizes = ["--n", "64", "--d", "32"]
    else:
        sizes = ["--n", "4096,16384", "--d", "64,128"]
    results = {}
    for name, extra in (("unmasked", []), ("masked", ["--masked", "0.1"])):
        path = out / f"attention_{name}.json"
        bench_attention.main(sizes + common + extra + ["--out", str(path)])
        results[name] = json.loads(path.read_text())
    return dict(table=json.loads(table.read_text()) if table.is_file() else None,
                **{k: dict(fastest=v["fastest_of_triton_and_sdpa"], ratio=v["ms_ratio_triton_over_sdpa"], rows=v["rows"])
                   for k, v in results.items()})


def part_group_norm(args) -> dict:
    from benchmarks import bench_group_norm

    path = Path(args.out) / "group_norm_bench.json"
    argv = ["--backends", "eager", "--shapes", "1x8x3x16x16", "--repeats", "1"] if args.dry_run else \
        ["--backends", "triton,eager"]
    bench_group_norm.main(argv + ["--out", str(path)])
    return json.loads(path.read_text())


def part_dit(args) -> dict:
    """One training step (forward, MSE backward, AdamW) and one no-grad forward, bf16 autocast, at a size that
    keeps a GPU busy: 4 blocks, width 1536, 12 heads × 128, latents 16×13×60×104 (20,280 tokens)."""
    import torch
    import torch.nn.functional as F

    from benchmarks import bench_dit

    device, dtype = device_and_dtype(args.dry_run)
    grid, size = ((3, 8, 8), dict(width=64, depth=2, heads=2)) if args.dry_run else \
        ((13, 60, 104), dict(width=1536, depth=4, heads=12))
    cases = [("ours-full", "auto"), ("ours-full", "sdpa"), ("ours-full", "triton"), ("ours-factorized", "auto"),
             ("ours-full-concat", "auto"), ("wan", None), ("cogvideox", None)]
    if args.dry_run:
        cases = [("ours-full", "auto"), ("ours-full", "torch")]
    rows = []
    for name, backend in cases:
        if backend:
            os.environ["LVD_KERNELS"] = backend
        try:
            model, forward = bench_dit.build(name, grid, **size)
        except ImportError as e:
            rows.append(dict(model=name, skipped=f"{type(e).__name__}: {e}"))
            continue
        model.to(device)
        x = torch.randn(1, bench_dit.CHANNELS, *grid, device=device)
        ts = torch.tensor([500.0], device=device)
        text, pooled = (torch.randn(1, bench_dit.TEXT_LEN, bench_dit.TEXT_DIM, device=device),
                        torch.randn(1, bench_dit.TEXT_DIM, device=device))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def train_step():
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = F.mse_loss(forward(x, ts, text, pooled).float(), x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def sample_forward():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                forward(x, ts, text, pooled)

        start = time.perf_counter()
        train_step()
        warmup_s = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_ms = cuda_ms(train_step, warmup=1, repeats=3 if args.dry_run else 5)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        fwd_ms = cuda_ms(sample_forward, warmup=1, repeats=3 if args.dry_run else 5)
        rows.append(dict(model=name, kernels=backend or "diffusers", tokens=grid[0] * (grid[1] // 2) * (grid[2] // 2),
                         params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                         train_ms=round(train_ms, 2), fwd_ms=round(fwd_ms, 2),
                         peak_train_gib=None if peak is None else round(peak, 2), first_step_s=round(warmup_s, 2)))
        os.environ.pop("LVD_KERNELS", None)
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(size=dict(grid=list(grid), **size), precision="bf16 autocast, fp32 weights, fused AdamW", rows=rows)


def part_vae(args) -> dict:
    """Encode and decode of a 1×3×17×256² clip in bf16: our base VAE (Triton GroupNorm, then the PyTorch path)
    and diffusers' AutoencoderKLCogVideoX, random weights."""
    import torch

    from lvd.vae import CausalVideoVAE

    device, dtype = device_and_dtype(args.dry_run)
    preset, clip = ("tiny", (1, 3, 5, 32, 32)) if args.dry_run else ("base", (1, 3, 17, 256, 256))
    video = torch.rand(*clip, device=device, dtype=dtype) * 2 - 1
    rows = []
    for name, backend in (("ours", "auto"), ("ours", "torch"), ("cogvideox", None)):
        if name == "cogvideox" and args.dry_run:
            continue
        if backend:
            os.environ["LVD_KERNELS"] = backend
        with torch.no_grad():
            if name == "ours":
                vae = CausalVideoVAE.from_preset(preset).to(device, dtype).eval()
                encode, decode = (lambda v: vae.encode(v)), (lambda z: vae.decode(z))
            else:
                try:
                    from diffusers import AutoencoderKLCogVideoX
                except ImportError as e:
                    rows.append(dict(model=name, skipped=str(e)))
                    continue
                vae = AutoencoderKLCogVideoX().to(device, dtype).eval()
                encode = lambda v: vae.encode(v).latent_dist.mode()  # noqa: E731
                decode = lambda z: vae.decode(z).sample  # noqa: E731
            z = encode(video)
            enc_ms = cuda_ms(lambda: encode(video), warmup=1, repeats=3)
            dec_ms = cuda_ms(lambda: decode(z), warmup=1, repeats=3)
        rows.append(dict(model=name, group_norm=backend or "diffusers", clip=list(clip), encode_ms=round(enc_ms, 1),
                         decode_ms=round(dec_ms, 1)))
        os.environ.pop("LVD_KERNELS", None)
        del vae
    return dict(dtype=str(dtype), rows=rows)


def write_latent_shards(folder: Path, *, count: int, latent: tuple[int, ...], text_len: int, text_dim: int) -> None:
    """Random latent shards in the format lvd.cache_latents writes (no VAE or text encoder needed)."""
    import torch

    from lvd.data.shards import write_tar_samples
    from lvd.text_embeddings import TextEmbeddings
    from lvd.data import latents as latent_format

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def text(batch: tuple[int, ...] = ()) -> TextEmbeddings:
        mask = torch.zeros(*batch, text_len, dtype=torch.bool)
        mask[..., :8] = True
        return TextEmbeddings(torch.randn(*batch, text_len, text_dim, generator=gen), mask,
                              torch.randn(*batch, text_dim, generator=gen))

    samples = [{"__key__": f"{i:06d}", "txt": b"a random clip",
                latent_format.MEMBER: latent_format.encode_sample(torch.randn(*latent, generator=gen), text()),
                "json": json.dumps({"latent_shape": list(latent)}).encode()} for i in range(count)]
    write_tar_samples(folder / "shard-000000.tar", samples)
    latent_format.write_uncond(folder, text((1,)))


# The line the trainer logs when it resumes (lvd.train.loop.Trainer): "resumed from RUN/checkpoints/step_N (step N)".
# A run folder may have spaces in its path, so the folder is anything up to the first " (step N)".
RESUMED = re.compile(r"resumed from (.+?) \(step (\d+)\)")


def resumed_step(log: str) -> int | None:
    """The step at which the run that wrote ``log`` resumed (the trainer's resume line), None if it started afresh."""
    found = RESUMED.findall(log)
    return int(found[-1][1]) if found else None


def part_recipe(args, work: Path | None = None) -> dict:
    """recipes/train_latent_diffusion.py: 100 steps, then the same command to 200 (it resumes at 100). ``work``:
    the folder for its latents and run (default: a new temporary folder)."""
    work = Path(tempfile.mkdtemp(prefix="lvd-recipe-")) if work is None else Path(work)
    latent = (16, 3, 8, 8) if args.dry_run else (16, 5, 16, 16)  # 320 tokens: compile time dominates anyway
    write_latent_shards(work / "latents", count=64, latent=latent, text_len=32, text_dim=384)
    preset, compile_, steps = ("tiny", "false", (4, 8)) if args.dry_run else ("base", "true", (100, 200))
    base = [sys.executable, "recipes/train_latent_diffusion.py", "--config", "recipes/configs/shapes_dit.yaml",
            f"run.dir={work / 'run'}", f"data.shards={work / 'latents'}", "data.workers=0", "data.batch_size=8",
            f"model.preset={preset}", "model.overrides.text_dim=384", "model.overrides.pooled_dim=384",
            "train.mixed_precision=bf16", f"train.compile={compile_}", f"checkpoint.every={steps[0]}",
            "train.log_every=10", "samples.every=0", "samples.shapes_eval=0", "components.vae=",
            "components.text_encoder=", "export.enabled=false"]
    runs = []
    for max_steps in steps:
        start = time.perf_counter()
        out = subprocess.run(base + [f"train.max_steps={max_steps}"], cwd=REPO, capture_output=True, text=True,
                             timeout=LIMITS_S["recipe"] - 20)
        log = out.stdout + out.stderr
        runs.append(dict(max_steps=max_steps, rc=out.returncode, seconds=round(time.perf_counter() - start, 1),
                         resumed_at=resumed_step(log), log_tail=log[-1500:]))
        if out.returncode != 0:
            break
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()] \
        if (work / "run" / "metrics.jsonl").is_file() else []
    losses = [(m.get("step"), m.get("loss")) for m in metrics if "loss" in m]
    return dict(preset=preset, compile=compile_ == "true", latent=list(latent), runs=runs, losses=losses,
                ok=all(r["rc"] == 0 for r in runs) and len(runs) == 2,
                resumed=len(runs) == 2 and runs[1]["resumed_at"] == steps[0])


# ----------------------------------------------------------------------------------------------
# Driver


def summarise(results: dict) -> list[str]:
    lines = []
    env = results.get("env", {})
    lines.append(f"{env.get('gpu') or 'CPU (dry run)'} | torch {env.get('torch')} | triton {env.get('triton')} | "
                 f"{env.get('date')}")
    for part, res in results.items():
        if "error" in res:
            lines.append(f"{part}: FAILED ({res['error'][:200]})")
        elif part == "kernels":
            lines.append(f"kernels: {sum(r['ok'] for r in res['rows'])}/{len(res['rows'])} within tolerance")
        elif part == "tuning":
            lines.append(f"tuning: new bucket with compiled kernels {res['new_bucket_warm_compile_s']} s; second "
                         f"process at most {res['second_process_max_s']} s (goal ≤ {res['goal_s']} s)")
        elif part == "attention":
            for k in ("unmasked", "masked"):
                lines.append(f"attention {k}: faster {res[k]['fastest']} (triton/sdpa time {res[k]['ratio']})")
        elif part == "dit":
            for r in res["rows"]:
                lines.append(f"dit {r['model']} [{r.get('kernels')}]: " + (r.get("skipped") or
                             f"train {r['train_ms']} ms, fwd {r['fwd_ms']} ms, peak {r['peak_train_gib']} GiB"))
        elif part == "vae":
            for r in res["rows"]:
                lines.append(f"vae {r['model']} [{r.get('group_norm')}]: " + (r.get("skipped") or
                             f"encode {r['encode_ms']} ms, decode {r['decode_ms']} ms"))
        elif part == "recipe":
            lines.append(f"recipe {res['preset']} compile={res['compile']}: ok={res['ok']} resumed={res['resumed']} "
                         + ", ".join(f"{r['max_steps']} steps {r['seconds']} s rc={r['rc']}" for r in res["runs"]))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list from {PARTS}")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on a CPU: every part's code path")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/gpu_<gpu>_<date>)")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="stop starting parts when less than a part's limit is left (default %(default)s s)")
    parser.add_argument("--part-only", default=None, help=argparse.SUPPRESS)  # one part, in this process
    args = parser.parse_args(argv)

    if args.part_only:
        result = globals()[f"part_{args.part_only}"](args)
        report.write(result, Path(args.out, f"{args.part_only}.json"))
        return 0

    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    if args.out is None:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "cpu_dry_run"
        slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
        args.out = str(report.RESULTS / f"gpu_{slug}_{datetime.date.today().isoformat()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TRITON_CACHE_DIR", str(out.parent / "triton-cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    results, start = {}, time.perf_counter()
    for part in [p for p in PARTS if p in parts or p == "env"]:
        t0 = time.perf_counter()
        left = args.budget_s - (t0 - start)
        if left < min(LIMITS_S[part], 30):
            results[part] = dict(error=f"skipped: {left:.0f} s of the --budget-s left")
            print(f"{part}: skipped ({left:.0f} s left)", flush=True)
            continue
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--part-only", part, "--out", str(out)] + \
            (["--dry-run"] if args.dry_run else [])
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=min(LIMITS_S[part], left))
            if proc.returncode == 0:
                results[part] = json.loads((out / f"{part}.json").read_text())
            else:
                results[part] = dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}",
                                     stderr_tail=proc.stderr[-4000:])
        except subprocess.TimeoutExpired as e:
            results[part] = dict(error=f"timed out after {e.timeout:.0f} s", stdout_tail=str(e.stdout)[-2000:],
                                 stderr_tail=str(e.stderr)[-2000:])
        results[part]["part_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - start:6.1f} s] {part}: "
              f"{'FAILED ' + results[part]['error'][:300] if 'error' in results[part] else 'done'}", flush=True)
    lines = summarise(results)
    report.write(dict(lines=lines, parts=results), out / "summary.json")
    print("\n".join(lines))
    print(f"total {time.perf_counter() - start:.0f} s; results in {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
