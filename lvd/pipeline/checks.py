"""What :class:`lvd.pipeline.LVDPipeline` checks before it generates: the text arguments, the video size and the
given first frames (``image=`` / ``video=``).

Plain functions over the facts they need, so the CLI and the pipeline report the same messages."""

from __future__ import annotations

from lvd.vae import VideoVAE, nearest_frame_counts

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
#: diffusers' names of the embeddings ``__call__`` takes instead of each text: (states, mask, pooled)
EMBEDDING_ARGS = {
    "prompt": ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds"),
    "negative_prompt": ("negative_prompt_embeds", "negative_prompt_attention_mask", "negative_pooled_prompt_embeds"),
}


def prompt_problems(prompt, negative_prompt, guidance_scale, embeds: dict, *, has_text_model: bool) -> list[str]:
    """Why the text arguments cannot be used, as messages: a prompt or ``prompt_embeds`` (not both), each
    embedding with its mask and pooled vector, and a text encoder wherever text must be encoded."""
    problems, given = [], {k for k, v in embeds.items() if v is not None}
    for text_name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        states, mask, pooled = EMBEDDING_ARGS[text_name]
        if text is not None and states in given:
            problems.append(f"give {text_name} or {states}, not both")
        if states not in given:
            if {mask, pooled} & given:
                problems.append(f"{' and '.join(k for k in (mask, pooled) if k in given)} given without {states}")
            continue
        missing = [k for k in (mask, pooled) if k not in given]
        if missing:
            problems.append(f"{states} needs {' and '.join(missing)} too")
            continue
        s, m, p = embeds[states], embeds[mask], embeds[pooled]
        if s.ndim != 3 or tuple(m.shape) != tuple(s.shape[:2]) or p.ndim != 2 or p.shape[0] != s.shape[0]:
            problems.append(f"{states} {tuple(s.shape)}, {mask} {tuple(m.shape)}, {pooled} {tuple(p.shape)}: "
                            "expected (B, L, D), (B, L), (B, D_pooled)")
    if prompt is None and "prompt_embeds" not in given:
        problems.append('give prompt ("" is the unconditional video) or prompt_embeds')
    elif prompt is not None and not (isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))):
        problems.append(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if negative_prompt is not None:
        rows = embeds["prompt_embeds"].shape[0] if "prompt_embeds" in given else None
        n_prompts = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else rows
        if isinstance(negative_prompt, list):
            if len(negative_prompt) != n_prompts:
                problems.append(f"negative_prompt has {len(negative_prompt)} entries but prompt has {n_prompts}")
        elif not isinstance(negative_prompt, str):
            problems.append(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
    needs_text_model = prompt is not None or negative_prompt is not None or (
        guidance_scale > 1 and "negative_prompt_embeds" not in given)
    if needs_text_model and not has_text_model:
        problems.append("the pipeline has no text_encoder/tokenizer: pass prompt_embeds (and, with guidance_scale "
                        "> 1, negative_prompt_embeds), or load them (from_pretrained, a folder with "
                        "text_encoder_id, or from_components)")
    return problems


def size_problems(vae: VideoVAE, patch_size: tuple[int, int, int], num_frames: int, height: int, width: int) -> list[str]:
    """Why (num_frames, height, width) cannot be generated, as messages; [] when it can.

    Frame counts are not rounded: a count the VAE cannot produce is an error that names the nearest
    counts it can (diffusers' "concise error messages rather than silent correction")."""
    problems = []
    pt, ph, pw = patch_size
    s, tc = vae.spatial_compression, vae.temporal_compression
    for name, value, patch in (("height", height, ph), ("width", width, pw)):
        if not isinstance(value, int) or value <= 0 or value % (s * patch):
            problems.append(
                f"{name}={value} must be a positive multiple of {s * patch} "
                f"(VAE spatial factor {s} × transformer patch {patch})"
            )
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % tc:
        nearest = nearest_frame_counts(num_frames if isinstance(num_frames, int) else 0, tc)
        problems.append(
            f"num_frames={num_frames} is not a frame count the VAE produces (1 + {tc}·k); "
            f"nearest: {' or '.join(map(str, nearest))}"
        )
    elif pt > 1 and ((num_frames - 1) // tc + 1) % pt:
        problems.append(
            f"num_frames={num_frames} gives {(num_frames - 1) // tc + 1} latent frames, not a multiple of the "
            f"transformer's temporal patch {pt}"
        )
    if not problems:
        try:
            vae.check_input(num_frames, height, width)
        except ValueError as err:
            problems.append(str(err))
    return problems


def clean_frame_problems(what: str, shape: tuple[int, int, int], vae: VideoVAE | None, patch_t: int,
                         num_frames: int, height: int, width: int) -> list[str]:
    """Why clean frames of ``shape`` (T, H, W), given as ``what`` ("image" or "video"), cannot start a video of
    (num_frames, height, width), as messages; [] when they can."""
    if vae is None:
        return [f"{what}= needs a vae to encode it"]
    t, h, w = shape
    r, problems = vae.temporal_compression, []
    if (h, w) != (height, width):
        problems.append(f"the {what} is {w}x{h} (width x height) but the video is {width}x{height}; resize it, or "
                        "leave height and width out to take its size")
    if (t - 1) % r:
        problems.append(f"video= has {t} frames; the VAE encodes 1 + {r}·j frames into 1 + j latent frames, nearest: "
                        f"{' or '.join(map(str, nearest_frame_counts(t, r)))}")
        return problems
    k = 1 + (t - 1) // r
    if k % patch_t:
        problems.append(f"the {what} gives {k} clean latent frame(s), not a multiple of the transformer's temporal "
                        f"patch {patch_t}")
    if isinstance(num_frames, int) and num_frames >= 1 and 1 + (num_frames - 1) // r <= k:
        problems.append(f"num_frames={num_frames} leaves nothing to generate after the {what}'s {t} frame(s): ask "
                        f"for more than {t}")
    return problems
