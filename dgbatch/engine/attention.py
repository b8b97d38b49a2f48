"""Attention plumbing around transformers' own DiffusionGemma modules.

The projections, q/k/v norms, RoPE tables, MLP, router, experts and layer norms are the model's
modules, called as transformers calls them; only where K/V come from and go to is ours (the slot
cache instead of a `Cache` object), so the weights and the math stay the model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import apply_rotary_pos_emb


def project_qkv(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [N, S, Hq, D], k and v [N, S, Hkv, D] (token-major) for hidden states x [N, S, hidden].

    Full-attention layers have no v_proj: V is K's projection taken before k_norm and RoPE (then
    v_norm), exactly as `DiffusionGemma*TextAttention.forward` does.
    """
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = apply_rotary_pos_emb(attn.q_norm(attn.q_proj(x).view(shape)), cos, sin, unsqueeze_dim=2)
    k = attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape) if attn.v_proj is not None else k
    k = apply_rotary_pos_emb(attn.k_norm(k), cos, sin, unsqueeze_dim=2)
    return q, k, attn.v_norm(v)


def sdpa(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA with the layer's scaling; grouped-query attention without repeating K/V.

    q: [N, Hq, S, D]; k, v: [N, Hkv, L, D]; mask: bool [N, 1, S or 1, L] -> [N, Hq, S, D].
    The Hq / Hkv query heads that share a KV head are folded into the query length (head h uses KV
    head h // (Hq / Hkv), as transformers' `repeat_kv` lays them out): a plain multi-head call that
    any SDPA kernel takes with a mask. With a mask, `enable_gqa` leaves CUDA only the math kernel,
    which materialises fp32 scores (pytorch/pytorch#181528; transformers repeats K/V instead).
    """
    n, hq, s, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    if hq == hkv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    g = hq // hkv
    if mask.shape[-2] != 1:  # a mask per query (the encoder's causal one) repeats for each folded head
        mask = mask[:, :, None].expand(n, 1, g, s, length).reshape(n, 1, g * s, length)
    out = F.scaled_dot_product_attention(q.reshape(n, hkv, g * s, d), k, v, attn_mask=mask, scale=attn.scaling)
    return out.view(n, hq, s, d)


def feed_forward(layer, h: torch.Tensor) -> torch.Tensor:
    """The dense MLP and the MoE branch of a DiffusionGemma layer, as in its forward. h: [N, S, hidden]."""
    residual = h
    dense = layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(h)))
    flat = residual.reshape(-1, residual.shape[-1])  # [N*S, hidden]
    _, top_k_weights, top_k_index = layer.router(flat)
    moe = layer.experts(layer.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights)
    moe = layer.post_feedforward_layernorm_2(moe.reshape(residual.shape))
    return residual + layer.post_feedforward_layernorm(dense + moe)
