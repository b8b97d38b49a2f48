"""DiffusionGemma 26B-A4B's shape for the parallel benchmarks and memory plans (no weights needed).

The shape is `REAL_26B_A4B` (google/diffusiongemma-26B-A4B-it's text config: hidden
2816, 16 q heads, 8 KV heads of dim 256 on sliding layers, 2 KV heads of dim 512 and no v_proj on
full ones, dense MLP 2112, 128 experts top-8 of intermediate 704, vocab 262,144, window 1024, canvas
256), with all 30 layers (5 sliding : 1 full). The same values appear in third-party loaders' test
fixtures of the published config. Check: 25.25 B text parameters, 3.8 B active per token (published:
25.2 B / 3.8 B). transformers' own `DiffusionGemmaTextConfig` defaults are a different shape.
"""

from __future__ import annotations

import torch

from dgbatch.toy.model import SMALL_VISION

# google/diffusiongemma-26B-A4B-it's text config (the fields that set shapes and numerics).
REAL_26B_A4B = dict(  # noqa: C408 (keyword form, as in the config class)
    vocab_size=262144,
    hidden_size=2816,
    intermediate_size=2112,
    num_attention_heads=16,
    num_key_value_heads=8,
    num_global_key_value_heads=2,
    head_dim=256,
    global_head_dim=512,
    moe_intermediate_size=704,
    num_experts=128,
    top_k_experts=8,
    sliding_window=1024,
    final_logit_softcapping=30.0,
    max_position_embeddings=262144,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
CANVAS = 256
PATTERN = ["sliding_attention"] * 5 + ["full_attention"]
TEXT_26B_A4B = {**REAL_26B_A4B, "num_hidden_layers": 30}

# The same structure at CPU size (for `--device cpu --tiny`), keeping the ratios sharding cares about:
# 16 q heads, 8 / 2 KV heads, experts top-k of many (16 top-4).
TEXT_TINY = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 16,
    "num_key_value_heads": 8, "num_global_key_value_heads": 2, "head_dim": 8, "global_head_dim": 16, "sliding_window": 32,
    "num_experts": 16, "top_k_experts": 4, "moe_intermediate_size": 32, "max_position_embeddings": 4096,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
}  # fmt: skip


def layer_types(n: int) -> list[str]:
    """The real 5:1 pattern for n layers, the last forced to full attention (as transformers does)."""
    types = [PATTERN[i % 6] for i in range(n)]
    types[-1] = "full_attention"
    return types


def config(layers: int | None = None, tiny: bool = False, canvas: int | None = None):
    """A DiffusionGemmaConfig of the real shape (or the tiny one), cut to `layers` layers."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig

    text = dict(TEXT_TINY if tiny else TEXT_26B_A4B)
    text["num_hidden_layers"] = layers or text["num_hidden_layers"]
    text["layer_types"] = layer_types(text["num_hidden_layers"])
    return DiffusionGemmaConfig(
        text_config=DiffusionGemmaTextConfig(**text), vision_config=dict(SMALL_VISION),
        canvas_length=canvas or (16 if tiny else CANVAS),
    )


def random_model(cfg, device: str, dtype: torch.dtype):
    """Random weights, built on `device` (a GPU initialises billions of parameters in seconds)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion(cfg)
    return model.to(dtype).eval()


def meta_model(cfg, dtype: torch.dtype):
    """No storage at all: for memory arithmetic."""
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(cfg)
    return model.to(dtype)
