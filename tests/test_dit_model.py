"""VideoDiT properties on tiny configs: shapes, mode agreement, adaLN-Zero identity, save/load, masks."""

import json

import pytest
import torch

from lvd.dit import DIT_PRESETS, VideoDiT, count_parameters
from lvd.dit.model import factorized_attention

TINY = dict(in_channels=4, hidden_size=32, depth=2, num_heads=2, text_dim=12, pooled_dim=10)


def _inputs(b=2, c=4, t=3, h=4, w=6, L=5, text_dim=12, pooled_dim=10, device=None):
    mask = torch.ones(b, L, dtype=torch.bool, device=device)
    mask[0, 3:] = False
    return dict(
        latents=torch.randn(b, c, t, h, w, device=device),
        timestep=torch.tensor([3.0, 700.0][:b], device=device),
        text_states=torch.randn(b, L, text_dim, device=device),
        text_mask=mask,
        text_pooled=torch.randn(b, pooled_dim, device=device),
    )


def _randomize(model, std=0.2):
    """Leave adaLN-Zero's init: random weights everywhere so every path contributes."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("mode", ["full", "factorized"])
def test_tiny_preset_forward_shape(mode):
    model = VideoDiT.from_preset("tiny", attention_mode=mode)
    assert 1.5e6 < count_parameters(model) < 2.5e6
    x = _inputs(c=16, t=5, h=8, w=8, text_dim=768, pooled_dim=768)
    out = model(**x)
    assert out.shape == x["latents"].shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
@pytest.mark.parametrize("mode", ["full", "factorized"])
def test_every_preset_shapes_on_meta(name, mode):
    with torch.device("meta"):
        model = VideoDiT.from_preset(name, attention_mode=mode, in_channels=16, text_dim=64, pooled_dim=32)
        x = _inputs(b=1, c=16, t=2, h=4, w=4, L=3, text_dim=64, pooled_dim=32, device="meta")
        out = model(**x)
    assert out.shape == (1, 16, 2, 4, 4) and out.device.type == "meta"
    if name == "xl":
        assert 1e9 < count_parameters(model) < 2e9


def test_full_and_factorized_agree_on_one_frame():
    full = _randomize(VideoDiT(**TINY, attention_mode="full"))
    fact = VideoDiT(**TINY, attention_mode="factorized")
    fact.load_state_dict(full.state_dict())  # same weights: the modes share every parameter
    x = _inputs(t=1)
    torch.testing.assert_close(fact(**x), full(**x))
    x = _inputs(t=3)
    assert not torch.allclose(fact(**x), full(**x), atol=1e-3)  # with time they differ


def test_factorized_attention_is_spatial_then_temporal():
    """O[t, s] = Σ_t' softmax_t'(q[t,s]·k[t',s]) · U[t', s], U[t', s] = Σ_s' softmax_s'(q[t',s]·k[t',s']) v[t', s']."""
    b, heads, t, s, d = 1, 2, 3, 4, 8
    q, k, v = (torch.randn(b, heads, t * s, d) for _ in range(3))
    out = factorized_attention(q, k, v, (t, 2, 2))
    q5, k5, v5 = (z.view(b, heads, t, s, d) for z in (q, k, v))
    spatial = torch.softmax(torch.einsum("bhtsd,bhtrd->bhtsr", q5, k5) / d**0.5, dim=-1)
    u = torch.einsum("bhtsr,bhtrd->bhtsd", spatial, v5)
    temporal = torch.softmax(torch.einsum("bhtsd,bhusd->bhstu", q5, k5) / d**0.5, dim=-1)  # over u
    expected = torch.einsum("bhstu,bhusd->bhtsd", temporal, u)
    torch.testing.assert_close(out, expected.reshape(b, heads, t * s, d))


def test_factorized_block_reaches_other_frames_and_locations():
    model = _randomize(VideoDiT(**{**TINY, "depth": 1}, attention_mode="factorized"))
    x = _inputs(b=1)
    x["latents"].requires_grad_(True)
    out = model(**x)
    out[0, :, 0, 0:2, 0:2].sum().backward()  # the first token (frame 0, patch (0, 0))
    grad = x["latents"].grad[0].abs().sum(0)  # (T, H, W)
    assert grad[2, 2:4, 4:6].sum() > 0  # another frame at another location


def test_adaln_zero_makes_every_block_the_identity_at_init():
    model = VideoDiT(**TINY)
    x = torch.randn(2, 9, 32)
    cond, context = torch.randn(2, 32), torch.randn(2, 5, 32)
    rope = torch.randn(9, 8, 2)
    for block in model.blocks:
        torch.testing.assert_close(block(x, cond, context, None, rope, (1, 3, 3)), x, rtol=0, atol=0)
    assert (model(**_inputs()) == 0).all()  # zero output projection too


def test_save_load_round_trip(tmp_path):
    model = _randomize(VideoDiT(**TINY, attention_mode="factorized", patch_size=(1, 2, 2)))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attention_mode"] == "factorized" and config["hidden_size"] == 32 and config["patch_size"] == [1, 2, 2]
    loaded = VideoDiT.from_pretrained(tmp_path)
    x = _inputs()
    torch.testing.assert_close(loaded(**x), model(**x), rtol=0, atol=0)


def test_padding_tokens_are_ignored():
    model = _randomize(VideoDiT(**TINY)).eval()
    x = _inputs()
    ref = model(**x)
    x["text_states"][0, 3:] = 100.0  # masked positions of sample 0
    out = model(**x)
    torch.testing.assert_close(out[0], ref[0])
    x["text_states"][0, 1] = 100.0  # a real token does change the output
    assert not torch.allclose(model(**x)[0], ref[0])


def test_fully_masked_text_row_is_finite():
    model = _randomize(VideoDiT(**TINY))
    x = _inputs()
    x["text_mask"][1] = False
    assert torch.isfinite(model(**x)).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _randomize(VideoDiT(**TINY))
    x = _inputs()
    model(**x).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    model(**x).square().mean().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_patch_and_channel_mismatch_name_the_shape():
    model = VideoDiT(**TINY, patch_size=(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(T, H, W\)=\(3, 4, 5\)"):
        model(**_inputs(w=5))
    with pytest.raises(ValueError, match="expects latents"):
        model(**_inputs(c=3))
    with pytest.raises(ValueError, match="attention_mode"):
        VideoDiT(**TINY, attention_mode="axial")
    with pytest.raises(KeyError, match="unknown VideoDiT preset"):
        VideoDiT.from_preset("huge")


def test_patch_size_in_time_round_trips_shapes():
    model = _randomize(VideoDiT(**TINY, patch_size=(2, 2, 2), attention_mode="factorized"))
    x = _inputs(t=4)
    assert model(**x).shape == x["latents"].shape


def test_text_padding_common_to_every_row_is_dropped_exactly():
    """Text positions masked in every row are removed before cross-attention: the output equals the
    model run on the truncated text without a mask."""
    model = _randomize(VideoDiT(**TINY)).eval()
    x = _inputs(L=7)
    x["text_mask"][:, 5:] = False  # positions 5, 6: padding in both rows
    out = model(**x)
    short = dict(x, text_states=x["text_states"][:, :5], text_mask=x["text_mask"][:, :5])
    torch.testing.assert_close(out, model(**short), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["full", "factorized"])
def test_eager_fast_paths_equal_the_plain_ops(mode, monkeypatch):
    """The fused QK-norm/RoPE op and the padding drop give the outputs and gradients of the plain
    formulation (the path taken under torch.compile) to float rounding."""
    model = _randomize(VideoDiT(**TINY, attention_mode=mode), std=0.1)
    x = _inputs()
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        model.zero_grad()
        out = model(**x)
        out.square().mean().backward()
        results.append([out] + [p.grad.clone() for p in model.parameters()])
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_norm_modulate_equals_layer_norm_then_modulate(batch):
    """The one-sample fast path (modulation folded into LayerNorm's weight and bias) gives the output
    and every gradient of LayerNorm followed by ``x · (1 + scale) + shift``."""
    from lvd.dit.model import modulate, norm_modulate

    norm = torch.nn.LayerNorm(37, eps=1e-6, elementwise_affine=False)
    torch.manual_seed(0)
    x, shift, scale = (torch.randn(batch, n, 37, requires_grad=True) for n in (11, 1, 1))
    grad = torch.randn(batch, 11, 37)
    results = []
    for fn in (lambda: norm_modulate(norm, x, shift, scale), lambda: modulate(norm(x), shift, scale)):
        out = fn()
        results.append((out, *torch.autograd.grad(out, (x, shift, scale), grad)))
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_sincos_pos_embed_gives_each_token_its_time_and_place():
    from lvd.dit.model import sincos_pos_embed_3d

    t, h, w, dim = 3, 4, 5, 32
    emb = sincos_pos_embed_3d((t, h, w), dim).reshape(t, h, w, dim)
    temporal, spatial = emb[..., : dim // 4], emb[..., dim // 4 :]
    assert (temporal == temporal[:, :1, :1]).all()  # time part depends on t only
    assert (spatial == spatial[:1]).all()  # place part depends on (h, w) only
    flat = emb.reshape(t * h * w, dim)
    assert torch.cdist(flat, flat).add(torch.eye(t * h * w)).min() > 0.1  # every token distinct
    torch.testing.assert_close(temporal[0, 0, 0, : dim // 8], torch.zeros(dim // 8, dtype=emb.dtype))  # sin(0)


def test_abs_pos_embed_breaks_shift_equivariance_and_round_trips(tmp_path):
    """Without it a spatially constant input gives the same output at every place (RoPE is relative, the
    attention then averages identical tokens); with it the output varies with the token's place."""
    x = _inputs(b=1)
    x["latents"] = torch.ones(1, 4, 3, 4, 6)
    plain = _randomize(VideoDiT(**TINY, patch_size=(1, 1, 1)))  # one token per latent pixel
    out = plain(**x)
    torch.testing.assert_close(out, out[..., :1, :1].expand_as(out), rtol=1e-4, atol=1e-5)
    absolute = _randomize(VideoDiT(**TINY, patch_size=(1, 1, 1), abs_pos_embed=True))
    out = absolute(**x)
    assert (out - out[..., :1, :1]).abs().amax() > 1e-2
    absolute.save_pretrained(tmp_path)
    loaded = VideoDiT.from_pretrained(tmp_path)
    assert loaded.config.abs_pos_embed is True
    torch.testing.assert_close(loaded(**x), out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 16"):
        VideoDiT(**{**TINY, "hidden_size": 40, "num_heads": 2}, abs_pos_embed=True)


# text_attention="concat": text keys and values appended to the self-attention's


@pytest.mark.parametrize("mode", ["full", "factorized"])
def test_concat_text_attention_shapes_parameters_and_meta(mode):
    cross, concat = VideoDiT(**TINY, attention_mode=mode), VideoDiT(**TINY, attention_mode=mode, text_attention="concat")
    d = TINY["hidden_size"]
    # per block: cross-attention's q, kv, proj and norm2 go (3·D² + … ), text_kv (2·D²) and one modulation chunk less
    per_block_cross = (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + 2 * d + 2 * (d // 2) + (d * d + d)
    per_block_concat = (2 * d * d + 2 * d) + d // 2
    assert count_parameters(cross) - count_parameters(concat) == TINY["depth"] * (per_block_cross - per_block_concat)
    x = _inputs()
    out = _randomize(concat)(**x)
    assert out.shape == x["latents"].shape and torch.isfinite(out).all()
    with torch.device("meta"):
        model = VideoDiT.from_preset("large", attention_mode=mode, text_attention="concat", in_channels=16)
        out = model(**_inputs(b=1, c=16, t=2, h=4, w=4, L=3, text_dim=768, pooled_dim=768, device="meta"))
    assert out.shape == (1, 16, 2, 4, 4)


def test_concat_attention_is_one_softmax_over_video_and_text_keys():
    """SelfAttention with text keys equals a softmax over [video keys (RoPE, norm_k); text keys (norm_text_k)]."""
    from lvd.dit.model import SelfAttention
    from lvd.dit.rope import rope_3d

    torch.manual_seed(0)
    dim, heads, grid = 16, 2, (2, 2, 3)
    attn = SelfAttention(dim, heads, mode="full", qk_norm=True, eps=1e-6, text_keys=True)
    _randomize(attn)
    n, L = 12, 4
    x, context = torch.randn(2, n, dim), torch.randn(2, L, dim)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    rope = rope_3d(grid, (4, 2, 2))
    out = attn(x, rope, grid, context, mask)

    q, k, v = attn.qkv(x).view(2, n, 3, heads, -1).unbind(2)
    q, k = attn.norm_q(q, rope[:, None]), attn.norm_k(k, rope[:, None])
    tk, tv = attn.text_kv(context).view(2, L, 2, heads, -1).unbind(2)
    keys, values = torch.cat([k, attn.norm_text_k(tk)], 1), torch.cat([v, tv], 1)  # (B, N + L, H, Dh)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, keys) / (dim // heads) ** 0.5
    keep = torch.cat([torch.ones(2, n, dtype=torch.bool), mask], 1)
    probs = scores.masked_fill(~keep[:, None, None], float("-inf")).softmax(-1)
    expected = attn.proj(torch.einsum("bhnm,bmhd->bnhd", probs, values).reshape(2, n, dim))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_concat_full_and_factorized_agree_on_one_frame_and_ignore_padding():
    full = _randomize(VideoDiT(**TINY, attention_mode="full", text_attention="concat")).eval()
    fact = VideoDiT(**TINY, attention_mode="factorized", text_attention="concat").eval()
    fact.load_state_dict(full.state_dict())
    x = _inputs(t=1)
    torch.testing.assert_close(fact(**x), full(**x))
    for model in (full, fact):
        x = _inputs()
        ref = model(**x)
        x["text_states"][0, 3:] = 100.0  # masked positions of sample 0
        torch.testing.assert_close(model(**x), ref)
        x["text_states"][0, 1] = 100.0  # a real token does change the output, in every frame
        changed = (model(**x)[0] - ref[0]).abs().amax(dim=(0, 2, 3))  # (T,)
        assert (changed > 1e-4).all()


def test_concat_factorized_sees_text_in_every_frame():
    """The spatial step appends the text keys to each frame's keys, U[t] = softmax([k_t; k_text]) [v_t; v_text];
    the temporal step is as without text."""
    b, heads, t, s, L, d = 2, 2, 3, 4, 5, 8
    q, k, v = (torch.randn(b, heads, t * s, d) for _ in range(3))
    tk, tv = torch.randn(b, L, heads, d), torch.randn(b, L, heads, d)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[1, 2:] = False
    out = factorized_attention(q, k, v, (t, 2, 2), text=(tk, tv, mask))
    q5, k5, v5 = (z.view(b, heads, t, s, d) for z in (q, k, v))
    keep = torch.cat([torch.ones(b, s, dtype=torch.bool), mask], 1)  # (B, S + L)
    u = []
    for f in range(t):
        keys = torch.cat([k5[:, :, f], tk.transpose(1, 2)], 2)
        values = torch.cat([v5[:, :, f], tv.transpose(1, 2)], 2)
        scores = (q5[:, :, f] @ keys.transpose(-1, -2) / d**0.5).masked_fill(~keep[:, None, None], float("-inf"))
        u.append(scores.softmax(-1) @ values)  # (B, H, S, Dh)
    u = torch.stack(u, 2)  # (B, H, T, S, Dh)
    temporal = torch.softmax(torch.einsum("bhtsd,bhusd->bhstu", q5, k5) / d**0.5, dim=-1)
    expected = torch.einsum("bhstu,bhusd->bhtsd", temporal, u)
    torch.testing.assert_close(out, expected.reshape(b, heads, t * s, d))


def test_concat_adaln_zero_identity_checkpointing_and_round_trip(tmp_path):
    model = VideoDiT(**TINY, text_attention="concat")
    x = torch.randn(2, 9, 32)
    cond, context = torch.randn(2, 32), torch.randn(2, 5, 32)
    for block in model.blocks:
        assert block.adaLN_modulation.out_features == 6 * 32
        torch.testing.assert_close(block(x, cond, context, None, torch.randn(9, 8, 2), (1, 3, 3)), x, rtol=0, atol=0)
    _randomize(model)
    inputs = _inputs()
    model(**inputs).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(g.abs().sum() > 0 for g in grads)  # every parameter is used
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(**inputs).square().mean().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)
    model.save_pretrained(tmp_path)
    loaded = VideoDiT.from_pretrained(tmp_path)
    assert loaded.config.text_attention == "concat"
    torch.testing.assert_close(loaded(**inputs), model(**inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="text_attention"):
        VideoDiT(**TINY, text_attention="joint")


@pytest.mark.parametrize("text_attention", ["cross", "concat"])
@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_autocast_forward_and_backward(compiled, text_attention):
    """Under bf16 autocast q, k and v reach attention in one dtype, eager and compiled (the compiled QK-norm
    takes the plain-ops path). aot_eager traces as Inductor does without generating code, which is slow here."""
    model = _randomize(VideoDiT(**TINY, text_attention=text_attention))
    x = _inputs(t=2, h=4, w=4)
    forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(**x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    reference = model(**x)  # fp32: bf16 agrees to bf16 rounding through two blocks
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_autocast_forward_and_backward_on_cuda(compiled):
    """The same on a GPU, where attention takes the Triton/SDPA path the dispatch table picks and compile is
    Inductor's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _randomize(VideoDiT(**TINY)).cuda()
    x = {k: v.cuda() for k, v in _inputs(t=2, h=4, w=4).items()}
    forward = torch.compile(model, fullgraph=True) if compiled else model
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = forward(**x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
