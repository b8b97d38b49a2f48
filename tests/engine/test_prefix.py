"""Shared prompt encoding: rows that share a prompt or a long prefix encode it once, and their
outputs are those of every prompt computed alone (`engine.share_prefixes` off)."""

from __future__ import annotations

import torch

from dgbatch.checkpoint import resolve_sampling
from dgbatch.config import SamplingSection
from dgbatch.engine import Engine
from dgbatch.engine.memory import memory_model
from dgbatch.engine.prefix import BLOCK, ENTRIES, PrefixCache, common_length
from dgbatch.generation import Request
from dgbatch.toy.tasks import few_shot_prompt, sample_examples, shots_of_length
from tests.engine.helpers import (
    CHECKPOINT,
    random_model,
    random_requests,
    toy_requests,
    trained_checkpoint,
    varied_stop_params,
)

VOCAB = 61


def _run(model, params, reqs, batch, share, pad=0, eos=(1,), **kw):
    engine = Engine(model, params, batch, pad, list(eos), share_prefixes=share, **kw)
    return engine.run(reqs), engine


def _chat(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]


def test_eight_samples_of_each_prompt_encode_it_once_and_give_the_rows_of_prompts_computed_alone():
    model, tok = trained_checkpoint()
    params = resolve_sampling(CHECKPOINT, SamplingSection(seed=0, max_new_tokens=48))
    _, base = toy_requests(tok, 8, 7, "p")
    reqs = [Request(f"{r.row_id}#{k}", r.prompt_ids) for r in base for k in range(8)]  # as the planner lays them
    alone, off = _run(model, params, reqs, 16, False, tok.pad_token_id, [tok.eos_token_id])
    shared, on = _run(model, params, reqs, 16, True, tok.pad_token_id, [tok.eos_token_id])
    assert shared == alone
    assert off.stats.encoded_prompt_tokens == off.stats.prompt_tokens == sum(len(r.prompt_ids) for r in reqs)
    assert on.stats.prompt_tokens == off.stats.prompt_tokens
    assert on.stats.encoded_prompt_tokens * 8 <= on.stats.prompt_tokens, on.stats
    assert on.stats.shared_prefix_rows == len(reqs)


def test_few_shot_prompts_encode_their_500_token_prefix_once_and_give_the_rows_of_prompts_computed_alone():
    model, tok = trained_checkpoint()
    params = resolve_sampling(CHECKPOINT, SamplingSection(seed=1, max_new_tokens=32))
    shots = shots_of_length(500, 2, lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    reqs = [Request(f"q{i}", _chat(tok, few_shot_prompt(shots, e.prompt))) for i, e in enumerate(sample_examples(24, 9))]
    shared_len = common_length(reqs[0].prompt_ids, reqs[1].prompt_ids)
    assert shared_len >= 500 and max(len(r.prompt_ids) for r in reqs) < 896  # the toy's 1024 positions - 128 new
    alone, off = _run(model, params, reqs, 8, False, tok.pad_token_id, [tok.eos_token_id])
    shared, on = _run(model, params, reqs, 8, True, tok.pad_token_id, [tok.eos_token_id])
    assert shared == alone
    assert on.stats.prompt_encoding_ratio <= 0.2, on.stats
    assert off.stats.prompt_encoding_ratio == 1.0


def test_shared_prefixes_longer_than_the_sliding_window_give_the_same_rows_with_one_entry_or_many():
    """Prefixes far past the window (12) on a random model, identical prompts, prompts that are prefixes of
    others, prompts shorter than a block, suffixes of every length; streamed in two submits, and with a
    single entry (evicted all the time) or the default few, at batch sizes that split groups across refills."""
    model = random_model(vocab=VOCAB, layers=3, sliding_window=12)
    params = varied_stop_params()
    g = torch.Generator().manual_seed(5)
    head = torch.randint(3, VOCAB, (45,), generator=g).tolist()
    other = torch.randint(3, VOCAB, (20,), generator=g).tolist()
    tails = random_requests(10, VOCAB, "t")
    reqs = [Request(f"s{i}#{k}", r.prompt_ids) for i, r in enumerate(tails[:3]) for k in range(3)]
    reqs += [Request(f"h{i}", head + r.prompt_ids[: i * 3]) for i, r in enumerate(tails)]  # h0: the prefix alone
    reqs += [Request(f"o{i}", head[:30] + other + [3 + i]) for i in range(4)]
    reqs += [Request(f"x{i}", [5, 6, 7][: 1 + i % 3]) for i in range(4)]
    alone = {g.row_id: g for g in _run(model, params, reqs, 4, False)[0]}
    for batch, entries in ((4, ENTRIES), (3, 1), (8, 2)):
        engine = Engine(model, params, batch, 0, [1])
        engine.prefixes = PrefixCache(engine.runner, entries=entries)
        engine.submit(reqs[:13], "a")
        out = {}
        steps = 0
        while engine.busy:
            if steps == 2:
                engine.submit(reqs[13:], "b")
            out.update({f.generation.row_id: f.generation for f in engine.step()})
            steps += 1
        assert out == alone, (batch, entries)
        assert engine.stats.shared_prefix_rows > len(reqs) // 2
        assert engine.stats.encoded_prompt_tokens < engine.stats.prompt_tokens * 0.6, engine.stats
        assert engine.prefixes.store.nbytes <= memory_model(model, engine.cache.capacity,
                                                            prefix_entries=entries).prefix_store


def test_after_a_reset_the_rows_run_again_give_the_same_outputs_from_fresh_prefixes():
    model = random_model(vocab=VOCAB, layers=3, sliding_window=12)
    params = varied_stop_params()
    head = list(range(3, 40))
    reqs = [Request(f"r{i}", head + [40 + i % 7] * (i % 5)) for i in range(12)]
    alone = {g.row_id: g for g in _run(model, params, reqs, 4, False)[0]}
    engine = Engine(model, params, 4, 0, [1])
    engine.submit(reqs, "t")
    done = {}
    for _ in range(3):
        done.update({f.generation.row_id: f.generation for f in engine.step()})
    again = engine.run([r for _, _, r in engine.reset()])
    assert {**done, **{g.row_id: g for g in again}} == alone


def test_a_common_prefix_is_shared_in_whole_blocks_unless_it_is_a_whole_prompt():
    cache = PrefixCache(runner=None)
    a = list(range(100))
    assert cache.shareable(a, a) == 100  # identical prompts: all of it
    assert cache.shareable(a[:7], a) == 7  # a prompt that starts another: all of it
    assert cache.shareable(a, a[:7]) == 0  # less than a block of a longer prompt: nothing
    assert cache.shareable(a, a[:40] + [999]) == 40 // BLOCK * BLOCK
    assert cache.shareable(a, None) == 0
    assert [common_length(a, a[:k] + [-1]) for k in (0, 1, 63, 99)] == [0, 1, 63, 99]


def test_with_share_prefixes_off_every_prompt_token_is_encoded():
    model = random_model(vocab=VOCAB, layers=2, sliding_window=12)
    reqs = [Request(f"r{i}", list(range(3, 50))) for i in range(6)]
    _, engine = _run(model, varied_stop_params(), reqs, 4, False)
    assert engine.prefixes is None and engine.stats.shared_prefix_rows == 0
    assert engine.stats.encoded_prompt_tokens == engine.stats.prompt_tokens == 6 * 47


def test_rows_with_images_never_share_and_text_rows_beside_them_do():
    from tests.engine.helpers import random_images, random_vision_model

    model = random_vision_model(vocab=VOCAB)
    image = VOCAB - 1
    vision = random_images([(64, 32)])
    prompt = [5, 6, VOCAB - 3] + [image] * vision.soft_tokens[0] + [VOCAB - 2] + list(range(7, 30))
    text = list(range(3, 50))
    reqs = [Request(f"img#{k}", prompt, vision=vision) for k in range(3)] + [Request(f"txt#{k}", text) for k in range(3)]
    alone = _run(model, varied_stop_params(), reqs, 4, False)[0]
    shared, engine = _run(model, varied_stop_params(), reqs, 4, True)
    assert shared == alone
    assert engine.stats.shared_prefix_rows == 3  # the text rows
    assert engine.stats.encoded_prompt_tokens == 3 * len(prompt) + len(text)
