"""VideoDiT vs diffusers video transformers on this CPU: training step, sampling forward, CPU "MFU".

Matched size: 8 layers, width 512, 8 heads × 64, MLP 2048, 16 latent channels, patch 1×2×2,
text 77×768, batch 1, fp32. Token counts: "3k" = 13×32×32 latents (3,328 tokens), "6k" = 13×44×44
(6,292), "13k" = 13×64×64 (13,312). Models:

- ``ours-full`` / ``ours-factorized``: :class:`lvd.dit.VideoDiT` with ``attention_mode`` full / factorized
  and a cross-attention sublayer per block (``text_attention="cross"``, the default);
- ``ours-full-concat`` / ``ours-factorized-concat``: the same with ``text_attention="concat"`` (text keys
  and values appended to the self-attention's, no cross-attention sublayer);
- ``cogvideox``: ``diffusers.CogVideoXTransformer3DModel`` (joint text+video attention, sin-cos positions);
- ``wan``: ``diffusers.WanTransformer3DModel`` (self-attention + cross-attention, 3D RoPE).

For each (model, tokens): one warm-up call under ``torch.utils.flop_counter.FlopCounterMode`` counts
the FLOPs (CPU flash attention added, which torch's counter misses), then the best of ``--repeats``
timed calls of (a) the training step: forward, MSE backward and ``AdamW.step`` and (b) the sampling
forward under ``torch.no_grad``. "MFU" = achieved GFLOP/s ÷ the GFLOP/s of fp32 2048² matmuls
of the same total FLOPs as the forward, timed in the same run
right before the model, so load from other processes hits both alike.

    python -m benchmarks.bench_dit                                  # everything (~15+ min on 2 cores)
    python -m benchmarks.bench_dit --models ours-full,wan --tokens 3k --repeats 1
    nohup python -m benchmarks.bench_dit > benchmarks/results/dit.log 2>&1 &
    python -m benchmarks.bench_dit --tokens 3k --repeats 3 --merge   # re-measure 3k, keep the rest
    python -m benchmarks.bench_dit --threads 1 --tokens 3k --merge   # beside a job that holds the other core

Writes benchmarks/results/dit.json (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from benchmarks import report

logging.getLogger("xformers").setLevel(logging.ERROR)

MODELS = ("ours-full", "ours-factorized", "ours-full-concat", "ours-factorized-concat", "cogvideox", "wan")
TOKENS = {"3k": (13, 32, 32), "6k": (13, 44, 44), "13k": (13, 64, 64)}  # latent (T, H, W), patch 1×2×2
DEFAULT_CASES = [(m, "3k") for m in MODELS] + [
    ("ours-factorized", "6k"), ("ours-factorized-concat", "6k"), ("cogvideox", "6k"),
    ("ours-factorized", "13k"), ("ours-factorized-concat", "13k"), ("cogvideox", "13k"),
]
WIDTH, DEPTH, HEADS, TEXT_LEN, TEXT_DIM, CHANNELS = 512, 8, 8, 77, 768, 16


def _cpu_flash_fwd(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _cpu_flash_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, q, k, v)


FLOP_EXTRA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
}


def build(name: str, grid: tuple[int, int, int], *, width: int = WIDTH, depth: int = DEPTH, heads: int = HEADS):
    """(model, forward(latents (B,C,T,H,W), timestep, text (B,L,D), pooled) -> (B,C,T,H,W)), fp32 on the CPU.
    ``width``/``depth``/``heads`` default to this benchmark's matched size (:mod:`benchmarks.gpu_check` uses
    larger ones)."""
    WIDTH, DEPTH, HEADS = width, depth, heads  # noqa: N806  (the names the model arguments below read)
    t, h, w = grid
    if name.startswith("ours"):
        from lvd.dit import VideoDiT

        model = VideoDiT(
            in_channels=CHANNELS, patch_size=(1, 2, 2), hidden_size=WIDTH, depth=DEPTH, num_heads=HEADS,
            text_dim=TEXT_DIM, pooled_dim=TEXT_DIM, attention_mode=name.split("-")[1],
            text_attention="concat" if name.endswith("-concat") else "cross",
        )
        mask = torch.ones(1, TEXT_LEN, dtype=torch.bool)
        mask[:, 20:] = False  # a realistic caption: 20 real tokens, the rest padding

        def forward(x, ts, text, pooled):
            return model(x, ts, text, mask.to(x.device), pooled)

    elif name == "cogvideox":
        from diffusers import CogVideoXTransformer3DModel

        model = CogVideoXTransformer3DModel(
            num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS, in_channels=CHANNELS,
            out_channels=CHANNELS, time_embed_dim=WIDTH, text_embed_dim=TEXT_DIM, num_layers=DEPTH,
            sample_width=w, sample_height=h, sample_frames=(t - 1) * 4 + 1, patch_size=2,
            max_text_seq_length=TEXT_LEN,
        )

        def forward(x, ts, text, pooled):
            out = model(hidden_states=x.transpose(1, 2), encoder_hidden_states=text, timestep=ts, return_dict=False)
            return out[0].transpose(1, 2)  # CogVideoX is (B, T, C, H, W)

    elif name == "wan":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS,
            in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT_DIM, ffn_dim=4 * WIDTH, num_layers=DEPTH,
        )

        def forward(x, ts, text, pooled):
            return model(hidden_states=x, timestep=ts, encoder_hidden_states=text, return_dict=False)[0]

    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return model.float(), forward


def matmul_seconds(flops: float, repeats: int = 1) -> float:
    """Seconds for fp32 2048×2048 matmuls totalling ``flops`` (the same-run reference rate), the best of
    ``repeats`` like the model timings (a single shot caught by a load spike can read as 125% MFU).

    Square matmuls run at this CPU's best fp32 rate (219 GFLOP/s on 2 idle threads, against 190 for the
    (3328, 512) × (512, 2048) Linear shape), so the MFU below is the stricter of the two.
    """
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    per_call = 2 * 2048**3
    calls = max(1, round(flops / per_call))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        best = min(best, time.perf_counter() - start)
    return best * flops / (calls * per_call)


def run_case(name: str, tokens: str, repeats: int) -> dict:
    grid = TOKENS[tokens]
    torch.manual_seed(0)
    model, forward = build(name, grid)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, CHANNELS, *grid)
    ts = torch.tensor([500.0])
    text, pooled = torch.randn(1, TEXT_LEN, TEXT_DIM), torch.randn(1, TEXT_DIM)
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    load_before = os.getloadavg()[0]

    def train_step():
        loss = F.mse_loss(forward(x, ts, text, pooled), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample_forward():
        with torch.no_grad():
            forward(x, ts, text, pooled)

    # 1. Sampling forward: FLOPs (warm-up), same-FLOP matmul reference, best of `repeats`
    model.eval()
    with FlopCounterMode(display=False, custom_mapping=FLOP_EXTRA) as counter:
        sample_forward()
    fwd_flops = counter.get_total_flops()
    ref_seconds = matmul_seconds(fwd_flops, repeats)
    fwd_seconds = min(_timed(sample_forward) for _ in range(repeats))

    # 2. Training step
    model.train()
    with FlopCounterMode(display=False, custom_mapping=FLOP_EXTRA) as counter:
        train_step()
    train_flops = counter.get_total_flops()
    train_seconds = min(_timed(train_step) for _ in range(repeats))
    matmul_rate = fwd_flops / ref_seconds
    row = dict(
        model=name, tokens=grid[0] * (grid[1] // 2) * (grid[2] // 2), latents=list(grid), params_m=params / 1e6,
        train_step_s=train_seconds, forward_s=fwd_seconds, forward_gflop=fwd_flops / 1e9,
        train_gflop=train_flops / 1e9, forward_gflops_per_s=fwd_flops / fwd_seconds / 1e9,
        train_gflops_per_s=train_flops / train_seconds / 1e9, matmul_gflops_per_s=matmul_rate / 1e9,
        forward_mfu=fwd_flops / fwd_seconds / matmul_rate, train_mfu=train_flops / train_seconds / matmul_rate,
        threads=torch.get_num_threads(), loadavg_before=load_before, loadavg_after=os.getloadavg()[0],
    )
    del model, opt
    return row


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def print_table(rows: list[dict]) -> None:
    head = f"{'model':16s} {'tokens':>6s} {'params':>7s} {'train s':>8s} {'fwd s':>7s} {'fwd GF':>7s} " \
           f"{'fwd GF/s':>8s} {'mm GF/s':>8s} {'fwd MFU':>7s} {'trn MFU':>7s} {'thr':>3s} {'load':>5s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['model']:16s} {r['tokens']:6d} {r['params_m']:6.1f}M {r['train_step_s']:8.2f} {r['forward_s']:7.2f} "
            f"{r['forward_gflop']:7.0f} {r['forward_gflops_per_s']:8.1f} {r['matmul_gflops_per_s']:8.1f} "
            f"{r['forward_mfu']:7.0%} {r['train_mfu']:7.0%} {r.get('threads', 0):3d} {r['loadavg_after']:5.1f}"
        )


def speedups(rows: list[dict]) -> list[dict]:
    """Training-step speed-up of ours over the faster diffusers model measured at each token count."""
    out = []
    for tokens in sorted({r["tokens"] for r in rows}):
        at = {r["model"]: r for r in rows if r["tokens"] == tokens}
        rivals = [at[m] for m in ("cogvideox", "wan") if m in at]
        if not rivals:
            continue
        best = min(rivals, key=lambda r: r["train_step_s"])
        for ours in (m for m in MODELS if m.startswith("ours")):
            if ours in at:
                out.append(dict(tokens=tokens, model=ours, versus=best["model"],
                                train_speedup=best["train_step_s"] / at[ours]["train_step_s"],
                                forward_speedup=best["forward_s"] / at[ours]["forward_s"]))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None, help=f"comma list from {MODELS} (default: the standard cases)")
    parser.add_argument("--tokens", default=None, help=f"comma list from {tuple(TOKENS)}")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--out", default=str(report.RESULTS / "dit.json"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of --out for (model, tokens) cases not run now (re-measure a few cases)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    head = report.header("bench_dit", argv)
    if args.models is None and args.tokens is None:
        cases = DEFAULT_CASES
    else:
        models = args.models.split(",") if args.models else list(MODELS)
        tokens = args.tokens.split(",") if args.tokens else ["3k"]
        unknown = [m for m in models if m not in MODELS] + [t for t in tokens if t not in TOKENS]
        if unknown:
            parser.error(f"unknown model/token choices {unknown}; models {MODELS}, tokens {tuple(TOKENS)}")
        cases = [(m, t) for t in tokens for m in models]

    rows = []
    for name, tokens in cases:
        print(f"running {name} at {tokens} tokens …", flush=True)
        rows.append(run_case(name, tokens, args.repeats))
        print_table(rows[-1:])
    print()
    print_table(rows)
    if args.merge and Path(args.out).is_file():
        fresh = {(r["model"], r["tokens"]) for r in rows}
        stored = json.loads(Path(args.out).read_text())
        kept = [r for r in stored["rows"] if (r["model"], r["tokens"]) not in fresh]
        rows = sorted(kept + rows, key=lambda r: (r["tokens"], MODELS.index(r["model"])))
        print("merged with the stored rows of", args.out)
        print_table(rows)
    ups = speedups(rows)
    for s in ups:
        print(f"{s['model']} vs {s['versus']} at {s['tokens']} tokens: training step {s['train_speedup']:.2f}x, "
              f"forward {s['forward_speedup']:.2f}x")
    result = dict(
        **head, note="cores shared with other processes; threads and loadavg per row (merged rows keep theirs)",
        config=dict(width=WIDTH, depth=DEPTH, heads=HEADS, text=[TEXT_LEN, TEXT_DIM], channels=CHANNELS,
                    patch=[1, 2, 2], batch=1, dtype="float32", repeats=args.repeats),
        rows=rows, speedups=ups,
    )
    report.write(result, args.out)


if __name__ == "__main__":
    main()
