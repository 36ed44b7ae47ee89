"""LoRA adapters (lvd.dit.lora, lvd.pipeline.lora): exactness of a zero adapter, fuse/unfuse, save → load, errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lvd.dit.lora import DEFAULT_TARGETS, LORA_WEIGHTS, LoraConfig, add_lora, save_lora
from lvd.pipeline.lora import lora_file
from lvd.pipeline import LVDPipeline

CALL = dict(num_frames=5, height=16, width=16, num_inference_steps=2, guidance_scale=3.0, output_type="latent")


def _pipe(model_dir):
    pipe = LVDPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, seed=0):
    return pipe("a red circle moving right", generator=torch.Generator().manual_seed(seed), **CALL).frames


def _randomise(model):
    """Give every adapter a non-zero B (a trained adapter), so that it changes the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)


def _peft_key(key, state_dict):
    """The name of base-model weight ``key`` in ``state_dict``, where peft may have moved it under ``base_layer``."""
    if key in state_dict:
        return key
    return key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")


def test_a_fresh_adapter_gives_exactly_the_base_output_and_only_it_trains(model_dir):
    pipe = _pipe(model_dir)
    base = _run(pipe)
    trainable = add_lora(pipe.transformer, LoraConfig(rank=4))
    assert torch.equal(_run(pipe), base)  # B starts at zero: x + 0 exactly
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    names = {n.split(".lora_")[0] for n in trainable}
    assert any(n.endswith("attn.qkv") for n in names) and any(n.endswith("mlp.2") for n in names)
    assert not any("adaLN" in n for n in names)  # not a default target

    x = torch.randn(1, 4, 2, 4, 4)
    t = torch.full((1,), 500.0)
    text = pipe.encode_prompt("x", do_classifier_free_guidance=False)
    pipe.transformer.train()
    pipe.transformer(x, t, text.prompt_embeds, text.prompt_attention_mask, text.pooled_prompt_embeds
                     ).square().mean().backward()
    with_grad = {n for n, p in pipe.transformer.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)


def test_fused_equals_unfused_and_unfuse_restores_the_base_weights_bit_for_bit(model_dir):
    pipe = _pipe(model_dir)
    base_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    add_lora(pipe.transformer, LoraConfig(rank=4, alpha=8))
    _randomise(pipe.transformer)
    unfused = _run(pipe)
    pipe.fuse_lora()
    fused = pipe.transformer.state_dict()
    adapted = {key for key in base_weights if _peft_key(key, fused).endswith(".base_layer.weight")}
    changed = {key for key, value in base_weights.items() if not torch.equal(fused[_peft_key(key, fused)], value)}
    assert adapted and changed == adapted  # fusing writes every adapter into its base weight, and nothing else
    torch.testing.assert_close(_run(pipe), unfused, atol=1e-5, rtol=1e-5)
    pipe.unfuse_lora()
    now = pipe.transformer.state_dict()
    for key, value in base_weights.items():
        assert torch.equal(now[_peft_key(key, now)], value), key
    assert torch.equal(_run(pipe), unfused)  # still adapted, unfused


def test_the_transformers_own_unfuse_restores_its_base_weights_bit_for_bit(model_dir):
    """``transformer.fuse_lora()`` / ``unfuse_lora()`` without a pipeline (LoraAdapterMixin): the same exact restore."""
    transformer = _pipe(model_dir).transformer
    add_lora(transformer, LoraConfig(rank=4, alpha=8))
    _randomise(transformer)
    base_weights = {k: v.clone() for k, v in transformer.state_dict().items() if ".lora_" not in k}
    transformer.fuse_lora()
    fused = transformer.state_dict()
    assert any(not torch.equal(fused[k], v) for k, v in base_weights.items())
    transformer.unfuse_lora()
    now = transformer.state_dict()
    for key, value in base_weights.items():
        assert torch.equal(now[key], value), key


def test_save_load_generate_is_byte_identical_and_small(model_dir, tmp_path):
    pipe = _pipe(model_dir)
    add_lora(pipe.transformer, LoraConfig(rank=4))
    _randomise(pipe.transformer)
    expected = _run(pipe)
    file = save_lora(pipe.transformer, tmp_path / "lora")
    assert file == tmp_path / "lora" / LORA_WEIGHTS and (tmp_path / "lora" / "adapter_config.json").is_file()
    keys = list(load_file(file))
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)

    fresh = _pipe(model_dir)
    base = _run(fresh)
    fresh.load_lora_weights(tmp_path / "lora", adapter_name="mine")
    assert torch.equal(_run(fresh), expected)
    fresh.set_adapters(["mine"], [0.0])  # weight 0: the base model again
    assert torch.equal(_run(fresh), base)
    other = _pipe(model_dir)
    other.load_lora_weights(file)  # the file itself works too
    assert torch.equal(_run(other), expected)


def test_two_adapters_combine_by_weight(model_dir, tmp_path):
    pipe = _pipe(model_dir)
    add_lora(pipe.transformer, LoraConfig(rank=2))
    _randomise(pipe.transformer)
    save_lora(pipe.transformer, tmp_path / "a")
    fresh = _pipe(model_dir)
    fresh.load_lora_weights(tmp_path / "a", adapter_name="a")
    fresh.load_lora_weights(tmp_path / "a", adapter_name="b")
    fresh.set_adapters(["a", "b"], [0.5, 0.5])  # two halves of one adapter == the adapter
    both = _run(fresh)
    fresh.set_adapters(["a"], [1.0])
    torch.testing.assert_close(both, _run(fresh), atol=1e-5, rtol=1e-5)


def test_bad_adapter_files_are_one_line_errors(model_dir, tmp_path):
    pipe = _pipe(model_dir)
    with pytest.raises(ValueError, match="no LoRA file"):
        pipe.load_lora_weights(tmp_path / "missing")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        pipe.load_lora_weights(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"transformer.blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(ValueError, match="not a LoRA file"):
        lora_file(plain)

    wide = _pipe(model_dir)  # an adapter whose widths do not fit: rank 4 A over a layer twice as wide
    add_lora(wide.transformer, LoraConfig(rank=4))
    save_lora(wide.transformer, tmp_path / "good")
    tensors = load_file(tmp_path / "good" / LORA_WEIGHTS)
    key = next(k for k in tensors if k.endswith("attn.qkv.lora_A.weight"))
    tensors[key] = torch.zeros(4, tensors[key].shape[1] * 2)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=None)
    with pytest.raises(ValueError, match="does not fit this transformer") as err:
        _pipe(model_dir).load_lora_weights(tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value)


def test_config_and_targets_are_checked(model_dir):
    pipe = _pipe(model_dir)
    assert "lora.rank=-1" in LoraConfig(rank=-1).problems()[0]
    assert "lora.dropout=1.0" in LoraConfig(rank=2, dropout=1.0).problems()[0]
    with pytest.raises(ValueError, match=r"lora.targets \['to_q'\] match no Linear"):
        add_lora(pipe.transformer, LoraConfig(rank=2, targets=["to_q"]))
    assert "attn.text_kv" in DEFAULT_TARGETS["VideoDiT"]  # concat-text models; cross-attention models lack it, which is fine
    add_lora(pipe.transformer, LoraConfig(rank=2, targets=["adaLN_modulation"]))


def test_a_wan_transformer_takes_lvds_call_and_adapters(tmp_path):
    """DiffusersTransformer: a tiny random Wan transformer behind lvd's denoiser call; padding tokens are zeroed
    as Wan's pipeline does; its default LoRA targets adapt it and save in diffusers' layout."""
    from diffusers import WanTransformer3DModel

    from lvd.dit.diffusers_transformer import DiffusersTransformer

    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                rope_max_seq_len=32)
    wan.save_pretrained(tmp_path / "transformer")
    model = DiffusersTransformer.from_pretrained("WanTransformer3DModel", tmp_path / "transformer")
    assert model.config.patch_size == (1, 2, 2) and model.config.text_dim == 16 and model.config.pooled_dim is None
    x, t = torch.randn(2, 4, 3, 8, 8), torch.tensor([500.0, 20.0])
    states, mask = torch.randn(2, 6, 16), torch.tensor([[1] * 6, [1] * 3 + [0] * 3], dtype=torch.bool)
    out = model(x, t, states, mask, None)
    assert out.shape == x.shape
    zeroed = states.clone()
    zeroed[1, 3:] = 0
    torch.testing.assert_close(out, model.model(hidden_states=x, timestep=t, encoder_hidden_states=zeroed,
                                                return_dict=False)[0])
    trainable = add_lora(model.model, LoraConfig(rank=2))
    assert any("attn2.to_k" in n for n in trainable) and any("ffn.net.2" in n for n in trainable)
    torch.testing.assert_close(model(x, t, states, mask, None), out)  # zero-initialised B
    file = save_lora(model.model, tmp_path / "lora")
    assert all(k.startswith("transformer.blocks.0.") for k in load_file(file))
    with pytest.raises(ValueError, match="not supported"):
        DiffusersTransformer(torch.nn.Linear(2, 2))
