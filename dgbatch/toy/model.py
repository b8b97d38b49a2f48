"""The toy DiffusionGemma's architecture: the real model's class, cut to CPU size."""

from __future__ import annotations

from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig

CANVAS_LENGTH = 16
# A 2-layer vision tower (`None` builds the default ~160M-parameter one). 4-pixel patches pooled 2x2:
# a 64x32 image is resized to 88x40, 220 patches, 55 soft tokens (`IMAGE_PROCESSOR`).
SMALL_VISION = {
    "model_type": "gemma4_vision",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "patch_size": 4,
    "pooling_kernel_size": 2,
    "position_embedding_size": 160,  # patches along a side: at most 560 px / 4 under a 70-token budget
}
# The image processor settings (processor_config.json); max_soft_tokens is the smallest Gemma 4 allows.
IMAGE_PROCESSOR = {"patch_size": 4, "pooling_kernel_size": 2, "max_soft_tokens": 70}


def toy_config(vocab_size: int, *, hidden: int = 128, layers: int = 4, sliding_window: int = 48,
               image_ids: tuple[int, int, int] | None = None, vision: dict | None = None) -> DiffusionGemmaConfig:
    """MoE (4 experts, top-2) in every layer, sliding and full attention alternating, canvas 16;
    image_ids = (boi, eoi, image) token ids. An image's tokens attend to each other both ways
    (`use_bidirectional_attention="vision"`, as the larger Gemma 4 models). `vision` overrides
    `SMALL_VISION`'s settings."""
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
        use_bidirectional_attention="vision",
    )
    boi, eoi, image = image_ids or (255_999, 258_882, 258_880)
    return DiffusionGemmaConfig(text_config=text, vision_config={**SMALL_VISION, **(vision or {})},
                                canvas_length=CANVAS_LENGTH,
                                boi_token_id=boi, eoi_token_id=eoi, image_token_id=image)


def build_toy_model(vocab_size: int, **kw) -> DiffusionGemmaForBlockDiffusion:
    return DiffusionGemmaForBlockDiffusion(toy_config(vocab_size, **kw))
