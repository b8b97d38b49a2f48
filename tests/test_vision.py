"""The checkpoint's image processing as dgbatch does it (no Ray): token counts known without pixels,
placeholders expanded as Gemma4Processor expands them, and planning that never opens an image."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import torch

from dgbatch.config import InputSection
from dgbatch.toy.images import draw_number, png_bytes
from dgbatch.vision import ImageProcessor, image_tokens


@pytest.fixture(scope="module")
def processor(toy_model_dir):
    return ImageProcessor(toy_model_dir)


def test_soft_token_count_is_known_from_the_image_size_alone(processor):
    from PIL import Image

    t = processor.tokens
    for w, h in [(64, 32), (32, 64), (100, 100), (640, 480), (10, 500), (3000, 17), (1, 1)]:
        got = processor.process([Image.new("RGB", (w, h), "white")]).soft_tokens
        assert got == [t.soft_tokens(h, w)], (w, h)
        assert got[0] <= t.max_soft_tokens


def test_prompts_and_pixels_are_what_gemma4_processor_makes(processor, toy_model_dir, monkeypatch):
    """Gemma4Processor itself cannot be built without torchvision (its video processor); built here with the
    class check skipped and no video processor, its image path is the oracle."""
    from transformers import AutoTokenizer
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg))
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    hf = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=processor.processor,
                         tokenizer=tok, video_processor=None, chat_template=tok.chat_template)
    rng = random.Random(0)
    images = [draw_number(123, rng), draw_number(7, rng, size=(50, 90))]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "read"}, {"type": "image"}]}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ref = hf(text=[text], images=[images], return_tensors="pt")
    ours = processor.process(images)
    ids = processor.expand(tok(text, add_special_tokens=False)["input_ids"], ours.soft_tokens)
    assert ids == ref["input_ids"][0].tolist()
    assert torch.equal(ours.pixel_values, ref["pixel_values"])
    assert torch.equal(ours.position_ids, ref["image_position_ids"])
    from dgbatch.vision import mm_token_type_ids

    assert torch.equal(mm_token_type_ids(torch.tensor([ids]), processor.tokens.image_id), ref["mm_token_type_ids"])


def test_the_checkpoint_config_matches_its_tokenizer(toy_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    t = image_tokens(toy_model_dir)
    assert t.image_id == tok.image_token_id < len(tok)
    assert (t.boi_id, t.eoi_id) == tuple(tok.convert_tokens_to_ids([tok.boi_token, tok.eoi_token]))
    from dgbatch.toy.tokenizer import CHARS, SPECIAL_TOKENS

    # the image tokens were appended: every text id is what it was in the text-only toy
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS + CHARS)))) == SPECIAL_TOKENS + CHARS


def test_planning_counts_each_image_at_its_most_and_never_opens_it(toy_model_dir):
    from dgbatch.checkpoint import load_tokenizer
    from dgbatch.planning.prompts import PromptEncoder

    t = image_tokens(toy_model_dir)
    enc = PromptEncoder(load_tokenizer(toy_model_dir), 1000, image_tokens=t)
    section = InputSection(path="x", prompt_column="prompt", image_column="image")
    img = png_bytes(draw_number(5, random.Random(0)))
    table = pa.table({"prompt": ["read", "count 1-3", "read"], "image": pa.array([img, None, None], pa.binary())})
    ids, errors = enc.encode_column(table, section)
    assert errors == [None, None, None]
    assert ids[0].count(t.image_id) == 1 and enc.planned_length(ids[0]) == len(ids[0]) + t.max_tokens_per_image - 1
    assert enc.planned_length(ids[1]) == len(ids[1]) and ids[2].count(t.image_id) == 0  # null image: a text row
    refs = pa.table({"prompt": ["read"], "image": ["/no/such/file.png"]})  # a missing file is the replica's to find
    assert enc.encode_column(refs, section)[1] == [None]


def test_planning_refuses_http_images_unless_enabled(toy_model_dir):
    from dgbatch.checkpoint import load_tokenizer
    from dgbatch.planning.prompts import PromptEncoder

    enc = PromptEncoder(load_tokenizer(toy_model_dir), 1000, image_tokens=image_tokens(toy_model_dir))
    table = pa.table({"prompt": ["read", "read"], "image": ["https://example.com/a.png", "s3://bucket/a.png"]})
    _, errors = enc.encode_column(table, InputSection(path="x", prompt_column="prompt", image_column="image"))
    assert "input.allow_http_images" in errors[0] and errors[1] is None
    _, errors = enc.encode_column(table, InputSection(path="x", prompt_column="prompt", image_column="image",
                                                      allow_http_images=True))
    assert errors == [None, None]


def test_a_text_only_checkpoint_refuses_image_rows(toy_model_dir):
    from dgbatch.checkpoint import load_tokenizer
    from dgbatch.planning.prompts import PromptEncoder

    enc = PromptEncoder(load_tokenizer(toy_model_dir), 1000, image_tokens=None)
    table = pa.table({"prompt": ["read"], "image": [b"\x89PNG"]})
    _, errors = enc.encode_column(table, InputSection(path="x", prompt_column="prompt", image_column="image"))
    assert "no image processor" in errors[0]


def test_image_column_needs_the_prompt_column():
    with pytest.raises(ValueError, match="input.image_column goes with input.prompt_column"):
        InputSection(path="x", messages_column="m", image_column="image")
