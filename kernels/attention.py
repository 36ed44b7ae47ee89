"""Attention: softmax(q kᵀ · scale + mask) v over (B, H, N, D) tensors.

Skeleton: the PyTorch reference and SDPA paths. The Triton flash-attention kernel lands here
(see the kernels issue); the public signature below is the contract models rely on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_reference(q, k, v, *, mask=None, scale=None, causal=False):
    """Plain PyTorch attention in fp32; the test oracle.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); mask: (B, Nk) bool, True where a key is kept.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # (B, H, Nq, Nk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        nq, nk = scores.shape[-2:]
        keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row gives zeros
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)


def attention(q, k, v, *, mask=None, scale=None, causal=False, backend="auto"):
    """Scaled dot-product attention; see :func:`attention_reference` for shapes."""
    if backend == "torch":
        return attention_reference(q, k, v, mask=mask, scale=scale, causal=causal)
    attn_mask = None if mask is None else mask[:, None, None, :]
    if causal and attn_mask is not None:
        nq, nk = q.shape[-2], k.shape[-2]
        attn_mask = attn_mask & torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)
