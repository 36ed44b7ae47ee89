"""Start training from a trained transformer (``model.init_from`` in the stage-2 recipe).

The folder is a pipeline folder (``model_index.json`` and ``transformer/``, e.g. ``lvd/assets/shapes-demo`` or a
run's ``export/``) or a ``transformer/`` folder itself. Our recipes export the EMA weights there, so that is
what fine-tuning starts from. :func:`with_clean_frames` adds clean-frame conditioning (image-to-video,
continuation) to a trained text-to-video model without changing what it computes.
"""

from __future__ import annotations

import os
from pathlib import Path

from lvd.dit.model import VideoDiT


def transformer_folder(path: str | os.PathLike) -> Path:
    """The ``transformer/`` folder ``path`` names, or ValueError saying what ``path`` is not."""
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path}: neither a pipeline folder (model_index.json + transformer/) nor a transformer "
                         "folder (config.json + weights)")
    return folder


def load_for_finetuning(path: str | os.PathLike, overrides: dict | None = None) -> VideoDiT:
    """The trained VideoDiT in ``path``; ``overrides`` change config keys that keep every tensor's shape (e.g.
    ``attention_mode``). A key whose shape they change, or that the new config lacks, is a ValueError naming it."""
    trained = VideoDiT.from_pretrained(transformer_folder(path), local_files_only=True)
    if not overrides:
        return trained
    model = VideoDiT.from_config({**dict(trained.config), **overrides})
    ours, theirs = model.state_dict(), trained.state_dict()
    problems = [f"{k} {tuple(v.shape)} in {path} but {tuple(ours[k].shape)} in the model" for k, v in theirs.items()
                if k in ours and ours[k].shape != v.shape]
    problems += [f"{k} is in {path} but not in the model" for k in theirs if k not in ours]
    problems += [f"{k} is in the model but not in {path}" for k in ours if k not in theirs]
    if problems:
        raise ValueError(f"model.init_from={str(path)!r} does not fit model.overrides: " + "; ".join(problems[:3])
                         + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    model.load_state_dict(theirs)
    return model


def with_clean_frames(model: VideoDiT) -> VideoDiT:
    """``model`` with ``clean_frame_conditioning``: a trained model without it gets a zero clean-token embedding
    added (its other weights as they are), so it starts out giving exactly the outputs it gave before. A model
    whose weights do not load into the new one is a ValueError naming the keys."""
    if model.config.get("clean_frame_conditioning", False):
        return model
    config = {k: v for k, v in model.config.items() if k != "_use_default_values"}  # keys diffusers would drop
    fresh = VideoDiT.from_config({**config, "clean_frame_conditioning": True})
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if unexpected or missing != ["clean_embed"]:
        raise ValueError(f"adding clean_frame_conditioning: missing {missing}, unexpected {unexpected}")
    return fresh.to(dtype=model.dtype)
