"""Which colours a VAE can reproduce: encode → decode synthetic clips of named colours, report the foreground's
mean RGB and hue before and after.

A latent diffusion model can only draw what its VAE decodes. A VAE trained on the seven colours of
lvd.data.synthetic alone decodes other colours onto them; this measures whether a colour outside them (the target
of a LoRA fine-tune) survives the round trip, on clips in the demo's ranges (:func:`lvd.data.synthetic.demo_config`).

    python -m benchmarks.vae_color_roundtrip                      # the bundled demo's VAE
    python -m benchmarks.vae_color_roundtrip --vae runs/demo/vae/export --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import colorsys
import sys
from pathlib import Path

import torch

from benchmarks import report
from lvd.data.synthetic import COLORS, demo_config, make_clip
from lvd.vae import load_vae

REPO = Path(__file__).resolve().parents[1]

EXTRA = {"orange": (255, 128, 0), "purple": (128, 0, 255), "pink": (255, 128, 192), "lime": (128, 255, 0),
         "azure": (0, 128, 255), "spring": (0, 255, 128), "teal": (0, 128, 128)}


def foreground_rgb(video: torch.Tensor) -> list[int]:
    """Mean RGB (0..255) of the pixels whose brightest channel is above half: the shape, not the black ground."""
    x = (video.float() + 1) / 2  # (3, T, H, W) in [0, 1]
    mask = x.max(0).values > 0.5
    return [round(float(x[c][mask].mean()) * 255) for c in range(3)]


def hue(rgb) -> int:
    return round(colorsys.rgb_to_hsv(*[c / 255 for c in rgb])[0] * 360)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", default=str(REPO / "lvd/assets/shapes-demo/vae"))
    p.add_argument("--clips", type=int, default=4, help="clips per colour (different shapes and paths)")
    p.add_argument("--out", type=Path, default=report.RESULTS / "vae_color_roundtrip.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    head = report.header("vae_color_roundtrip", argv)
    vae = load_vae(a.vae, device="cpu")
    rows = []
    for name, rgb in {**COLORS, **EXTRA}.items():
        cfg = demo_config(colors={name: rgb} if name in EXTRA else {}, only_colors=(name,))
        before, after = [], []
        for index in range(a.clips):
            video = make_clip(index, 1, cfg)[0].float() / 127.5 - 1  # (3, T, H, W) in [-1, 1]
            with torch.no_grad():
                recon = vae.decode(vae.encode(video[None]))[0].clamp(-1, 1)
            before.append(foreground_rgb(video))
            after.append(foreground_rgb(recon))
        mean = [[round(sum(c) / len(c)) for c in zip(*rows_)] for rows_ in (before, after)]
        rows.append({"color": name, "seen_in_training": name in COLORS, "rgb": list(rgb), "clip_rgb": mean[0],
                     "decoded_rgb": mean[1], "clip_hue": hue(mean[0]), "decoded_hue": hue(mean[1])})
        print(f"{name:8s} {str(mean[0]):16s} hue {hue(mean[0]):3d}  ->  {str(mean[1]):16s} hue {hue(mean[1]):3d}")
    report.write({**head, "vae": a.vae, "clips_per_color": a.clips, "rows": rows}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
