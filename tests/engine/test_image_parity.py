"""The engine's prefill of an image prompt equals transformers': the vision tower's soft tokens in place
of the image tokens, an image's tokens attending to each other both ways, then the decoder (fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import TransformersOracle, engine_logits, random_images, random_vision_model, split_images

TOL = 1e-4


def _prompt(vocab: int, text: list[int], images, g: torch.Generator) -> list[int]:
    """text[0] random tokens, then per image boi + soft tokens + eoi followed by text[k + 1] tokens."""
    boi, eoi, image = vocab - 3, vocab - 2, vocab - 1
    out = torch.randint(3, vocab - 3, (text[0],), generator=g).tolist()
    for k, n in enumerate(images.soft_tokens if images is not None else ()):
        out += [boi] + [image] * n + [eoi] + torch.randint(3, vocab - 3, (text[k + 1],), generator=g).tolist()
    return out


@torch.inference_mode()
def _check(model, rows: list[tuple[list[int], list[tuple[int, int]]]], num_canvases: int, with_sc: bool, seed=0):
    """rows: (text run lengths, image sizes (width, height)) per prompt."""
    vocab = model.config.text_config.vocab_size
    sizes = [s for _, row_sizes in rows for s in row_sizes]
    vision = split_images(random_images(sizes, seed), [len(r) for _, r in rows]) if sizes else [None] * len(rows)
    g = torch.Generator().manual_seed(seed)
    prompts = [_prompt(vocab, text, v, g) for (text, _), v in zip(rows, vision)]
    canvases = [torch.randint(0, vocab, (len(prompts), 16), generator=g) for _ in range(num_canvases)]
    canvas = torch.randint(0, vocab, (len(prompts), 16), generator=g)
    sc = torch.randn(len(prompts), 16, vocab, generator=g) * 3 if with_sc else None
    oracle = TransformersOracle(model, prompts, vision=vision)
    for c in canvases:
        oracle.commit(c)
    ref = oracle.decode(canvas, sc)
    for mode in ("separate", "fused", "unfused"):
        ours = engine_logits(model, prompts, canvases, canvas, sc, mode=mode, vision=vision)
        diff = (ours - ref).abs().max().item()
        assert diff <= TOL, f"{mode}: max abs logits diff {diff:.2e} > {TOL}"


def test_one_image_prompt_prefill():
    # 64x32 -> 55 soft tokens: the image's block is longer than the sliding window (12)
    _check(random_vision_model(), [([4, 5], [(64, 32)])], num_canvases=0, with_sc=False)


def test_mixed_batch_of_text_and_image_rows_with_committed_canvases():
    rows = [([9], []), ([3, 6], [(64, 32)]), ([2, 4, 1], [(40, 40), (96, 24)]), ([17], [])]
    _check(random_vision_model(), rows, num_canvases=2, with_sc=True)


def test_image_tokens_see_each_other_both_ways():
    # the same prompts, with the model's causal vision variant: the engine must then stay causal too
    model = random_vision_model()
    model.config.text_config.use_bidirectional_attention = None
    model.model.encoder.config.text_config.use_bidirectional_attention = None
    _check(model, [([4, 5], [(64, 32)]), ([6], [])], num_canvases=1, with_sc=True)


def test_prompt_whose_image_tokens_do_not_match_its_images_is_refused():
    from dgbatch.engine.packing import image_blocks

    v = random_images([(64, 32)])
    with pytest.raises(ValueError, match="do not match"):
        image_blocks([5, 96, 96, 6], v, image_id=96)
