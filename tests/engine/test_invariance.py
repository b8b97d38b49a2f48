"""A row's output depends on (seed, row id, prompt) only: not on batch size, order, slot or retry."""

from __future__ import annotations

import random

from dgbatch.engine import EngineBackend
from dgbatch.generation import SamplingParams
from tests.engine.helpers import random_model, random_requests, varied_stop_params

PARAMS = varied_stop_params()
VOCAB = 61


def _by_id(gens):
    return {g.row_id: g for g in gens}


def test_batch_size_order_and_retry_do_not_change_outputs():
    model = random_model(vocab=VOCAB, layers=3, sliding_window=12)
    reqs = random_requests(40, VOCAB, "row-")

    small = EngineBackend(model, PARAMS, batch_size=4, pad_id=0, eos_ids=[1])
    big = EngineBackend(model, PARAMS, batch_size=32, pad_id=0, eos_ids=[1])
    out4 = small.generate(reqs)
    out32 = big.generate(reqs)
    shuffled = reqs[:]
    random.Random(3).shuffle(shuffled)
    out_shuffled = big.generate(shuffled)  # same backend again: also a retry on warm slots
    out_retry = EngineBackend(model, PARAMS, batch_size=32, pad_id=0, eos_ids=[1]).generate(reqs)

    assert [g.row_id for g in out32] == [r.row_id for r in reqs]  # request order
    assert [g.row_id for g in out_shuffled] == [r.row_id for r in shuffled]
    assert _by_id(out4) == _by_id(out32) == _by_id(out_shuffled) == _by_id(out_retry)

    # the workload really is mixed: rows stop at different steps and canvases
    forwards = {g.num_decoder_forwards for g in out32}
    reasons = {g.finish_reason for g in out32}
    assert len(forwards) > 5 and reasons == {"eos", "length"}
    # and the batches really differed: 4 slots vs 32 slots
    assert max(small.stats.batch_sizes) == 4 and max(big.stats.batch_sizes) == 32


def test_a_different_seed_changes_outputs():
    model = random_model(vocab=VOCAB, layers=3, sliding_window=12)
    reqs = random_requests(6, VOCAB, "row-")
    a = EngineBackend(model, PARAMS, 8, 0, [1]).generate(reqs)
    other = SamplingParams(**{**PARAMS.__dict__, "seed": 12})
    b = EngineBackend(model, other, 8, 0, [1]).generate(reqs)
    assert [g.token_ids for g in a] != [g.token_ids for g in b]


def test_a_draining_batch_computes_under_one_and_a_half_times_its_rows():
    from dgbatch.engine.loop import batch_size_set

    for batch in (256, 96, 32, 5):
        sizes = batch_size_set(batch)
        assert max(sizes) == batch and min(sizes) == 1 and len(sizes) <= 2 * batch.bit_length()
        for live in range(1, batch + 1):
            n = min(s for s in sizes if s >= live)
            assert n < 1.5 * live + 1, (batch, live, n)
    assert batch_size_set(32, quarters=False) == (1, 2, 4, 8, 16, 32)  # compiled: one graph per size


def test_splitting_the_encoder_work_over_passes_does_not_change_outputs():
    # max_prefill_tokens=40: a refill of 2-59-token prompts takes many encoder-only passes (the longest
    # alone) before the pass shared with the decoder; outputs stay those of one shared pass per step
    model = random_model(vocab=VOCAB, layers=3, sliding_window=12)
    reqs = random_requests(24, VOCAB, "split-")
    one = EngineBackend(model, PARAMS, batch_size=16, pad_id=0, eos_ids=[1])
    split = EngineBackend(model, PARAMS, batch_size=16, pad_id=0, eos_ids=[1], max_prefill_tokens=40)
    assert _by_id(one.generate(reqs)) == _by_id(split.generate(reqs))
    assert split.stats.encoder_calls > 2 * one.stats.encoder_calls


def test_a_rows_own_max_new_tokens_matches_that_budget_for_the_whole_job():
    """Request.max_new_tokens: the engine and the reference give a row exactly what a job whose
    sampling.max_new_tokens is that budget gives it; a budget above the job's is capped at the job's."""
    from dataclasses import replace

    from dgbatch.reference import ReferenceBackend

    model = random_model(vocab=VOCAB, layers=3, sliding_window=12)
    reqs = random_requests(12, VOCAB, "budget-")
    budgets = [5, 20, 33, None, 1000, 16] * 2
    caps = [PARAMS.max_new_tokens if b is None else min(b, PARAMS.max_new_tokens) for b in budgets]
    own = [replace(r, max_new_tokens=b) for r, b in zip(reqs, budgets)]
    # (the reference's draws depend on its batch: each budget's rows form one batch in both runs)
    for make in (lambda p: EngineBackend(model, p, 8, 0, [1]), lambda p: ReferenceBackend(model, p, 8, 0, [1])):
        mixed = make(PARAMS).generate(own)
        for cap in sorted(set(caps)):
            alone = make(replace(PARAMS, max_new_tokens=cap)).generate([r for r, c in zip(reqs, caps) if c == cap])
            assert [g for g, c in zip(mixed, caps) if c == cap] == alone, cap
        assert all(len(g.token_ids) <= c for g, c in zip(mixed, caps))
        assert {g.finish_reason for g, b in zip(mixed, budgets) if b == 5} == {"length"}
