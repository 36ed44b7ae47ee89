"""VideoDiT: a text-conditioned diffusion transformer over video latents.

The network maps noisy latents ``(B, C, T, H, W)``, a timestep on the diffusers 0..1000 scale and text
embeddings to a tensor of the same shape as the latents (noise, v or flow velocity: the objective is
:mod:`lvd.diffusion`'s business, the network knows nothing of it). One block (DiT, Peebles & Xie 2023,
with PixArt-α's cross-attention to text)::

    (shift₁, scale₁, gate₁, gate_x, shift₂, scale₂, gate₂) = Linear(SiLU(c))     c = emb(t) + emb(pooled)
    x = x + gate₁ · SelfAttn(LN(x) · (1 + scale₁) + shift₁)        3D RoPE + RMSNorm QK-norm
    x = x + gate_x · CrossAttn(LN(x), text_states, text_mask)       padding keys masked out
    x = x + gate₂ · MLP(LN(x) · (1 + scale₂) + shift₂)              GELU(tanh), ratio 4

adaLN-Zero: the modulation Linear is zero-initialised, so every gate is 0 and every block is the
identity at initialisation; the final projection is zero too, so the untrained model outputs zeros.

Attention modes (config key ``attention_mode``), both through :func:`lvd.kernels.attention`:

- ``"full"``: softmax over all ``N = T'·H'·W'`` tokens, ``O(N²)``.
- ``"factorized"``: spatial then temporal on the same rotated q/k/v and the same weights. First each
  query attends within its frame, ``U = softmax_space(q kᵀ) V``; then along time at its location,
  ``O = softmax_time(q kᵀ) U``. The composed map still reaches every token in one block (two hops)
  at ``O(N·(H'W' + T'))``. With one frame the temporal softmax is over a single key, so
  ``O = U`` = full attention: the two modes load the same checkpoint and agree exactly on images.
  (Latte/TimeSformer instead add separate temporal layers; sharing q/k/v keeps one set of weights
  and 1.8× fewer FLOPs than full attention at 3k tokens, see benchmarks/bench_dit.py.)

Text attention (config key ``text_attention``):

- ``"cross"`` (above): a separate cross-attention sublayer, as PixArt-α and Wan.
- ``"concat"``: no cross-attention sublayer. Each block projects the text tokens to keys and values
  (their own Linear and QK-norm, no RoPE) and appends them to the self-attention's keys and values,
  so one softmax weighs video and text keys together; text tokens are never queries and are not
  updated from block to block (unlike CogVideoX's and SD3's joint attention, where they are). The
  cross-attention's query and output projections, its LayerNorm and its attention call go, and the
  modulation has six chunks as in DiT: at 3,328 tokens and width 512 the forward is 7% fewer FLOPs
  (benchmarks/bench_dit.py). In factorized mode the text keys join the spatial (per-frame) step.

Constructor argument names are the keys of ``config.json``: do not rename them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_3d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat

from lvd import kernels
from lvd.dit.lora import LoraAdapterMixin
from lvd.dit.rope import default_axes_dims, rope_3d
from lvd.kernels.rms_norm_rope import apply_rope, rms_norm_rope

ATTENTION_MODES = ("full", "factorized")
TEXT_ATTENTION = ("cross", "concat")

# Architecture sizes. Data-dependent keys (in_channels, text_dim, pooled_dim) come from the VAE and
# the text encoder: pass them to `VideoDiT.from_preset(name, in_channels=…, text_dim=…)`.
# Parameter counts at the default text_dim=pooled_dim=768, in_channels=16.
DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, depth=4, num_heads=4),  # 1.8 M: tests, the CPU shapes demo
    "small": dict(hidden_size=384, depth=12, num_heads=6),  # 42 M
    "base": dict(hidden_size=768, depth=12, num_heads=12),  # 167 M
    "large": dict(hidden_size=1152, depth=28, num_heads=16),  # 864 M
    "xl": dict(hidden_size=1536, depth=28, num_heads=24),  # 1.52 B
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x · (1 + scale) + shift``; x (B, N, D), shift/scale (B, 1, D)."""
    return torch.addcmul(shift, x, 1 + scale)


def norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``modulate(norm(x), shift, scale)`` for a LayerNorm without affine; x (B, N, D), shift/scale (B, 1, D).

    With one sample the modulation is a per-channel affine, so it goes into LayerNorm's own weight and
    bias: one fused op instead of LayerNorm then addcmul (several times faster on a CPU, forward + backward).
    Larger batches take the two-op path.
    """
    if x.shape[0] == 1:
        return F.layer_norm(x, norm.normalized_shape, (1 + scale).reshape(-1), shift.reshape(-1), norm.eps)
    return modulate(norm(x), shift, scale)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dim, statistics in fp32 (QK-norm per head).

    ``forward(x, rope)`` also applies RoPE: :func:`lvd.kernels.rms_norm_rope` does both in one autograd
    op with a hand-written backward (``benchmarks/bench_rms_norm_rope.py`` compares it with the plain ops).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm_rope(x, self.weight, self.eps, rope)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear, RMSNorm QK-norm and 3D RoPE.

    With ``text_keys`` (``text_attention="concat"``) the text tokens' keys and values (``text_kv``, their
    own QK-norm, no RoPE) are appended to the video tokens' before the softmax.
    """

    def __init__(self, dim: int, num_heads: int, *, mode: str, qk_norm: bool, eps: float, text_keys: bool = False):
        super().__init__()
        self.num_heads, self.mode = num_heads, mode
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.text_kv = nn.Linear(dim, 2 * dim) if text_keys else None
        self.norm_text_k = (RMSNorm(head_dim, eps) if qk_norm else nn.Identity()) if text_keys else None
        self.proj = nn.Linear(dim, dim)
        # q, k, v (B, H, N, Dh) -> (B, H, N, Dh); lvd.context_parallel wraps it with the exchange of tokens
        self.core = attend

    def forward(self, x, rope, grid: tuple[int, int, int], context=None, mask=None) -> torch.Tensor:
        """x (B, N, D); context (B, L, D) and mask (B, L) bool or None: used only with ``text_keys``."""
        # Work in the Linear's (B, N, H, Dh) layout: unbind(2)'s backward stacks the q/k/v gradients
        # straight into it (a "three b h n d" split cost a stack plus a 20 MB copy per block at 3k
        # tokens), and torch's CPU flash attention reads and writes (B, N, H, Dh) memory natively.
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # 3 × (B, N, H, Dh) views
        rope = rope[:, None]  # (N, 1, Dh/2, 2): the same rotation for every head
        if isinstance(self.norm_q, RMSNorm):
            q, k = self.norm_q(q, rope), self.norm_k(k, rope)  # normed and rotated
        else:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        text = None
        if self.text_kv is not None:
            text_k, text_v = self.text_kv(context).unflatten(-1, (2, self.num_heads, -1)).unbind(2)  # (B, L, H, Dh)
            text = (self.norm_text_k(text_k), text_v, mask)
        q, k, v = (rearrange(z, "b n h d -> b h n d") for z in (q, k, v))  # (B, H, N, Dh) views
        out = self.core(q, k, v, grid, self.mode, text)  # (B, H, N, Dh)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


def attend(q, k, v, grid: tuple[int, int, int], mode: str, text=None) -> torch.Tensor:
    """Self-attention of the video tokens, q/k/v (B, H, N, Dh) in ``(t h w)`` order over the patch ``grid``:
    ``mode`` "full" or "factorized" (see the module docstring). ``text``: (text_k (B, L, H, Dh), text_v (B, L, H, Dh),
    mask (B, L) bool or None), keys appended after the video keys (``text_attention="concat"``), or None."""
    if mode == "factorized":
        return factorized_attention(q, k, v, grid, text=text)
    mask = None
    if text is not None:  # video keys first, then text, concatenated in (B, N + L, H, Dh) memory: (B, H, N + L, Dh) views
        text_k, text_v, text_mask = text
        k, v = (rearrange(torch.cat([rearrange(z, "b h n d -> b n h d"), t], dim=1), "b n h d -> b h n d")
                for z, t in ((k, text_k), (v, text_v)))
        mask = None if text_mask is None else F.pad(text_mask, (q.shape[2], 0), value=True)
    return kernels.attention(q, k, v, mask=mask)


def factorized_attention(q, k, v, grid: tuple[int, int, int], text=None) -> torch.Tensor:
    """Spatial then temporal attention (see the module docstring); q/k/v (B, H, N, Dh), N in (t s) order.

    ``text``: (text_k (B, L, H, Dh), text_v (B, L, H, Dh), mask (B, L) bool or None), keys appended to
    every frame's keys in the spatial step (``text_attention="concat"``).
    """
    t = grid[0]
    per_frame = "b h (t s) d -> (b t) h s d"
    qs, ks, vs = (rearrange(z, per_frame, t=t) for z in (q, k, v))  # (B·T, H, S, Dh)
    mask = None
    if text is not None:
        text_k, text_v, text_mask = text
        every_frame = "b l h d -> (b t) h l d"  # the same text keys for each of the B·T frames
        ks = torch.cat([ks, repeat(text_k, every_frame, t=t)], dim=2)
        vs = torch.cat([vs, repeat(text_v, every_frame, t=t)], dim=2)
        if text_mask is not None:
            mask = F.pad(text_mask.repeat_interleave(t, dim=0), (qs.shape[2], 0), value=True)  # (B·T, S + L)
    u = kernels.attention(qs, ks, vs, mask=mask)  # (B·T, H, S, Dh)
    if t == 1:  # one key per temporal softmax: the temporal step is the identity
        return rearrange(u, "(b t) h s d -> b h (t s) d", t=t)
    per_location = "b h (t s) d -> (b s) h t d"
    u = rearrange(u, "(b t) h s d -> (b s) h t d", t=t)  # (B·S, H, T, Dh)
    out = kernels.attention(rearrange(q, per_location, t=t), rearrange(k, per_location, t=t), u)
    return rearrange(out, "(b s) h t d -> b h (t s) d", s=grid[1] * grid[2])  # (B, H, N, Dh)


class CrossAttention(nn.Module):
    """Attention from video tokens to text tokens; ``mask`` (B, L) bool, True = a real token."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm_q = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, mask) -> torch.Tensor:
        q = self.norm_q(self.q(x).unflatten(-1, (self.num_heads, -1)))  # (B, N, H, Dh), as in SelfAttention
        k, v = self.kv(context).unflatten(-1, (2, self.num_heads, -1)).unbind(2)  # 2 × (B, L, H, Dh)
        k = self.norm_k(k)
        q, k, v = (rearrange(z, "b n h d -> b h n d") for z in (q, k, v))  # (B, H, N or L, Dh) views
        out = kernels.attention(q, k, v, mask=mask)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class VideoDiTBlock(nn.Module):
    """One adaLN-Zero transformer block: self-attention, cross-attention to text (``text_attention="cross"``;
    with ``"concat"`` the text keys join the self-attention instead), MLP."""

    def __init__(self, dim, num_heads, *, mlp_ratio, mode, qk_norm, eps, text_attention="cross"):
        super().__init__()
        self.concat_text = text_attention == "concat"
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads, mode=mode, qk_norm=qk_norm, eps=eps, text_keys=self.concat_text)
        if not self.concat_text:
            self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
            self.cross_attn = CrossAttention(dim, num_heads, qk_norm=qk_norm, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # input: SiLU(c), computed once per forward; outputs (shift1, scale1, gate1, [gate_x,] shift2, scale2, gate2)
        self.adaLN_modulation = nn.Linear(dim, (6 if self.concat_text else 7) * dim)

    def forward(self, x, cond, context, mask, rope, grid):
        mods = list(self.adaLN_modulation(cond)[:, None, :].chunk(6 if self.concat_text else 7, dim=-1))  # (B, 1, D) each
        shift1, scale1, gate1 = mods[:3]
        shift2, scale2, gate2 = mods[-3:]
        h = norm_modulate(self.norm1, x, shift1, scale1)
        if self.concat_text:
            x = torch.addcmul(x, gate1, self.attn(h, rope, grid, context, mask))
        else:
            x = torch.addcmul(x, gate1, self.attn(h, rope, grid))
            x = torch.addcmul(x, mods[3], self.cross_attn(self.norm2(x), context, mask))
        return torch.addcmul(x, gate2, self.mlp(norm_modulate(self.norm3, x, shift2, scale2)))


class VideoDiT(ModelMixin, ConfigMixin, LoraAdapterMixin):
    """Text-to-video diffusion transformer over VAE latents; see the module docstring. Takes LoRA adapters through
    peft (:class:`lvd.dit.lora.LoraAdapterMixin`; :mod:`lvd.dit.lora` chooses targets and saves them).

    Args (each is a config.json key):
        in_channels: latent channels C. out_channels: output channels (default C).
        patch_size: (pt, ph, pw) patch over (T', H', W'); latents must divide by it.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        text_dim: width D of the text token states; pooled_dim: width of the pooled text vector.
        attention_mode: "full" or "factorized"; qk_norm: RMSNorm on q and k per head.
        rope_theta, rope_axes_dims: RoPE base and the (t, h, w) split of the head dim (None: default).
        timestep_freq_dim: sinusoidal features of the timestep; norm_eps: epsilon of every norm.
        abs_pos_embed: also add a fixed 3D sin-cos embedding of each token's absolute place to the patch tokens.
            RoPE alone tells attention only relative offsets; the shapes demo's tiny DiT (see
            recipes/train_shapes_demo.py) learns where a path starts and which way it runs much sooner with it.
        text_attention: "cross" (a cross-attention sublayer per block) or "concat" (text keys and values
            appended to the self-attention's); see the module docstring.
        clean_frame_conditioning: learn image-to-video and continuation: ``forward(..., clean_frames=k)`` says
            that the first k latent frames are clean (given, not noised), and a learned vector ``clean_embed``
            is added to those frames' patch tokens. That is a 0/1 "clean" mask channel through ``patch_embed``
            written as one vector. It starts at zero, so a model fine-tuned with it on starts out as the
            text-to-video model; off (the default), the parameter does not exist, so older configs and
            checkpoints load unchanged and give the same outputs bit for bit.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["VideoDiTBlock"]
    #: Where the token sequence may be split across processes and gathered again (:mod:`lvd.context_parallel`
    #: applies it; the model itself runs unchanged): the first block's ``x`` (B, N, D) and every block's ``rope``
    #: (N, Dh/2, 2) split along N, every block's ``attn.core`` given the whole sequence by an exchange around it, and
    #: ``proj_out``'s output (B, N, C·pt·ph·pw) gathered along N before unpatchify. Entries: module name → positional
    #: argument index → dim; "*" stands for every block.
    _cp_plan = {
        "split_inputs": {"blocks.0": {0: 1}, "blocks.*": {4: 0}},
        "attention": "blocks.*.attn",
        "gather_output": {"proj_out": 1},
    }

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int | None = None,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        text_dim: int = 768,
        pooled_dim: int = 768,
        attention_mode: str = "full",
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        rope_axes_dims: tuple[int, int, int] | None = None,
        timestep_freq_dim: int = 256,
        norm_eps: float = 1e-6,
        abs_pos_embed: bool = False,
        text_attention: str = "cross",
        clean_frame_conditioning: bool = False,
    ):
        super().__init__()
        problems = []
        if attention_mode not in ATTENTION_MODES:
            problems.append(f"attention_mode={attention_mode!r} is not one of {ATTENTION_MODES}")
        if text_attention not in TEXT_ATTENTION:
            problems.append(f"text_attention={text_attention!r} is not one of {TEXT_ATTENTION}")
        if hidden_size % num_heads:
            problems.append(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if len(patch_size) != 3:
            problems.append(f"patch_size must be (pt, ph, pw), got {patch_size}")
        if abs_pos_embed and hidden_size % 16:
            problems.append(f"abs_pos_embed needs hidden_size divisible by 16, got {hidden_size}")
        if problems:
            raise ValueError("VideoDiT config: " + "; ".join(problems))
        head_dim = hidden_size // num_heads
        self.axes_dims = tuple(rope_axes_dims) if rope_axes_dims is not None else default_axes_dims(head_dim)
        if sum(self.axes_dims) != head_dim:
            raise ValueError(f"VideoDiT config: rope_axes_dims={self.axes_dims} must sum to head_dim={head_dim}")
        self.patch = tuple(patch_size)
        self.out_ch = out_channels or in_channels
        pt, ph, pw = self.patch

        self.patch_embed = nn.Linear(in_channels * pt * ph * pw, hidden_size)
        # added to the tokens of the clean latent frames; zero: no clean frames are seen as none
        self.clean_embed = nn.Parameter(torch.zeros(hidden_size)) if clean_frame_conditioning else None
        self.time_proj = Timesteps(timestep_freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(timestep_freq_dim, hidden_size)
        self.pooled_embed = TimestepEmbedding(pooled_dim, hidden_size)  # Linear-SiLU-Linear
        self.text_proj = nn.Sequential(
            nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        self.blocks = nn.ModuleList(
            VideoDiTBlock(
                hidden_size, num_heads, mlp_ratio=mlp_ratio, mode=attention_mode, qk_norm=qk_norm, eps=norm_eps,
                text_attention=text_attention,
            )
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(hidden_size, eps=norm_eps, elementwise_affine=False)
        self.adaLN_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, self.out_ch * pt * ph * pw)
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VideoDiT":
        """Build a fresh model from ``DIT_PRESETS[name]``; ``overrides`` replace or add config keys."""
        if name not in DIT_PRESETS:
            raise KeyError(f"unknown VideoDiT preset {name!r}; known: {sorted(DIT_PRESETS)}")
        return cls(**{**DIT_PRESETS[name], **overrides})

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier Linears, N(0, 0.02) embeddings, zero adaLN and output (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for emb in (self.time_embed, self.pooled_embed):
            nn.init.normal_(emb.linear_1.weight, std=0.02)
            nn.init.normal_(emb.linear_2.weight, std=0.02)
        for layer in [block.adaLN_modulation for block in self.blocks] + [self.adaLN_out, self.proj_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_latents(self, shape) -> tuple[int, int, int]:
        """Patch grid (T', H', W') for latents of ``shape``; a ValueError naming the shape if they do not fit."""
        if len(shape) != 5 or shape[1] != self.config.in_channels:
            raise ValueError(
                f"VideoDiT expects latents (B, {self.config.in_channels}, T, H, W), got {tuple(shape)}"
            )
        if any(n % p for n, p in zip(shape[2:], self.patch)):
            raise ValueError(f"VideoDiT latents (T, H, W)={tuple(shape[2:])} must divide by patch_size={self.patch}")
        return tuple(n // p for n, p in zip(shape[2:], self.patch))

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        text_pooled: torch.Tensor | None = None,
        clean_frames: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """latents (B, C, T, H, W), timestep (B,) on 0..1000, text_states (B, L, D_text),
        text_mask (B, L) bool (True = real token), text_pooled (B, D_pooled) -> (B, C_out, T, H, W).

        ``clean_frames``: k (an int for every sample, or (B,) ints) = the first k latent frames are clean; needs
        ``clean_frame_conditioning`` and k divisible by the temporal patch pt. 0 (the default) adds nothing."""
        # 1. Patchify
        grid = self.check_latents(latents.shape)
        pt, ph, pw = self.patch
        x = rearrange(latents, "b c (t p) (h q) (w r) -> b (t h w) (c p q r)", p=pt, q=ph, r=pw)  # (B, N, C·pt·ph·pw)
        x = self.patch_embed(x)  # (B, N, D)
        if not (isinstance(clean_frames, int) and clean_frames == 0):
            x = self._mark_clean(x, clean_frames, grid)
        if self.config.abs_pos_embed:
            x = x + sincos_pos_embed_3d(grid, x.shape[-1], device=x.device).to(x.dtype)
        rope = rope_3d(grid, self.axes_dims, theta=self.config.rope_theta, device=x.device)  # (N, Dh/2, 2)

        # 2. Conditioning: c = emb(t) + emb(pooled), and the projected text tokens
        b = latents.shape[0]
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)
        cond = self.time_embed(self.time_proj(timestep).to(x.dtype))  # (B, D)
        if text_pooled is not None:
            cond = cond + self.pooled_embed(text_pooled.to(x.dtype))
        cond = F.silu(cond)
        text_states, mask = _drop_padding(text_states, _cross_attention_mask(text_mask))  # (B, L', D_text)
        context = self.text_proj(text_states.to(x.dtype))  # (B, L', D)

        # 3. Blocks
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, cond, context, mask, rope, grid)
            else:
                x = block(x, cond, context, mask, rope, grid)

        # 4. Final adaLN + projection, unpatchify
        shift, scale = self.adaLN_out(cond)[:, None, :].chunk(2, dim=-1)  # 2 × (B, 1, D)
        x = self.proj_out(norm_modulate(self.norm_out, x, shift, scale))  # (B, N, C_out·pt·ph·pw)
        t, h, w = grid
        return rearrange(x, "b (t h w) (c p q r) -> b c (t p) (h q) (w r)", t=t, h=h, w=w, p=pt, q=ph, r=pw)

    def enable_parallelism(self, *, config, cp_plan=None) -> None:
        """diffusers' ``ModelMixin.enable_parallelism`` for context parallelism, e.g.
        ``model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=2))`` after
        ``init_process_group``: the sequence is split by this model's ``_cp_plan`` and the output is gathered, so the
        model returns the whole prediction on every process. diffusers' own version would hand ``_cp_plan`` to its
        hooks and exchange inside its attention dispatcher, which this model's attention does not use; the work is
        :func:`lvd.context_parallel.enable_diffusers_parallelism`'s (imported here, so that the model's code holds no
        process-group code)."""
        from lvd.context_parallel import enable_diffusers_parallelism

        enable_diffusers_parallelism(self, config, cp_plan)

    def _mark_clean(self, x: torch.Tensor, clean_frames: int | torch.Tensor, grid) -> torch.Tensor:
        """``x`` (B, N, D) with ``clean_embed`` added to the tokens of the first ``clean_frames`` latent frames."""
        if self.clean_embed is None:
            raise ValueError("VideoDiT: clean_frames given, but this model was built without clean_frame_conditioning "
                             "(it was not trained to take clean latent frames)")
        b, (t, h, w), pt = x.shape[0], grid, self.patch[0]
        k = torch.as_tensor(clean_frames, device=x.device).reshape(-1).expand(b)  # (B,) latent frames
        if not torch.compiler.is_compiling() and x.device.type != "meta":  # no data-dependent check when tracing
            if bool(((k < 0) | (k > t * pt) | (k % pt != 0)).any()):
                raise ValueError(f"VideoDiT: clean_frames={k.tolist()} must be in [0, {t * pt}] (the latent frames) "
                                 f"and divisible by the temporal patch {pt}")
        token_frame = torch.arange(t, device=x.device).repeat_interleave(h * w)  # (N,) patch frame of each token
        clean = (token_frame[None] < (k // pt)[:, None]).to(x.dtype)  # (B, N) 1 = clean token
        return x + clean[..., None] * self.clean_embed.to(x.dtype)


def sincos_pos_embed_3d(grid: tuple[int, int, int], dim: int, device=None) -> torch.Tensor:
    """Fixed sin-cos embedding of each token's absolute (t, h, w) place, (N, dim) in the ``(t h w)`` token order:
    diffusers' ``get_3d_sincos_pos_embed`` (CogVideoX-2b, Latte), dim/4 for time and 3·dim/8 for each of h and w."""
    t, h, w = grid
    return get_3d_sincos_pos_embed(dim, (w, h), t, device=device, output_type="pt").reshape(t * h * w, dim)


def _cross_attention_mask(text_mask: torch.Tensor | None):
    """Key-padding mask for cross-attention. A row with no kept token would make softmax NaN; it
    keeps all its keys instead (callers drop text with the empty-prompt embedding, which has tokens)."""
    if text_mask is None:
        return None
    mask = text_mask.bool()
    if mask.device.type == "meta" or torch.compiler.is_compiling():
        return mask | ~mask.any(dim=-1, keepdim=True)  # no data-dependent branch (a graph break)
    empty = ~mask.any(dim=-1, keepdim=True)  # (B, 1)
    if bool(empty.any()):
        mask = mask | empty
    if bool(mask.all()):
        return None  # nothing to mask: lets SDPA take its fastest path
    return mask


def _drop_padding(text_states: torch.Tensor, mask: torch.Tensor | None):
    """Remove the text positions that are padding in every row: a masked key gets softmax weight
    exactly 0, so attending to the L' kept keys gives the same output, at L'/L of the cost (a 20-token
    caption padded to 77 keeps 20 of 77 keys).
    Returns (text_states (B, L', D), mask (B, L') or None when nothing is left to mask)."""
    if mask is None or mask.device.type == "meta" or torch.compiler.is_compiling():
        return text_states, mask  # data-dependent length: keep the static shape when tracing
    keep = mask.any(dim=0)  # (L,)
    if not bool(keep.all()):
        text_states, mask = text_states[:, keep], mask[:, keep]
    return text_states, (None if bool(mask.all()) else mask)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(math.prod(p.shape) for p in model.parameters())
