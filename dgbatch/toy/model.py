"""The toy DiffusionGemma's architecture: the real model's class, cut to CPU size."""

from __future__ import annotations

from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig

CANVAS_LENGTH = 16
# A 1-layer vision tower: the class needs one (`None` builds the default ~160M-parameter tower).
SMALL_VISION = {
    "model_type": "gemma4_vision",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
}


def toy_config(vocab_size: int, *, hidden: int = 128, layers: int = 4, sliding_window: int = 48) -> DiffusionGemmaConfig:
    """MoE (4 experts, top-2) in every layer, sliding and full attention alternating, canvas 16."""
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        global_head_dim=hidden // 4,
        num_global_key_value_heads=1,
        max_position_embeddings=1024,
        sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=hidden,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return DiffusionGemmaConfig(text_config=text, vision_config=SMALL_VISION, canvas_length=CANVAS_LENGTH)


def build_toy_model(vocab_size: int, **kw) -> DiffusionGemmaForBlockDiffusion:
    return DiffusionGemmaForBlockDiffusion(toy_config(vocab_size, **kw))
