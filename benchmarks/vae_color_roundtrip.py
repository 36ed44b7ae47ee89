"""Which colours a VAE can reproduce: encode → decode synthetic clips of named colours, report the foreground's
mean RGB and hue before and after.

A latent diffusion model can only draw what its VAE decodes. The bundled demo's VAE was trained on the seven
colours of lvd.data.synthetic; this measures whether a colour outside them (the target of a LoRA fine-tune)
survives the round trip.

    python benchmarks/vae_color_roundtrip.py                      # the bundled demo's VAE
    python benchmarks/vae_color_roundtrip.py --vae runs/demo/vae/export --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lvd.data.synthetic import COLORS, make_clip  # noqa: E402
from lvd.vae import load_vae  # noqa: E402
from recipes.train_shapes_demo import demo_shapes  # noqa: E402

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
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/vae_color_roundtrip.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    vae = load_vae(a.vae, device="cpu")
    rows = []
    for name, rgb in {**COLORS, **EXTRA}.items():
        cfg = dataclasses.replace(demo_shapes(), colors={name: rgb} if name in EXTRA else {}, only_colors=(name,))
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
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"vae": a.vae, "clips_per_color": a.clips, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
