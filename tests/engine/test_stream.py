"""The engine as a stream: requests enter while others run; finished rows come out as they finish."""

from __future__ import annotations

from dgbatch.engine import EngineBackend
from dgbatch.generation import Request
from tests.engine.helpers import random_model, random_requests, varied_stop_params

PARAMS = varied_stop_params()
VOCAB = 61


def _alone(model, reqs, batch=8):
    return {g.row_id: g for g in EngineBackend(model, PARAMS, batch, 0, [1]).generate(reqs)}


def test_a_rows_tokens_do_not_depend_on_which_shards_share_its_batch():
    model = random_model(vocab=VOCAB, layers=3, sliding_window=12)
    reqs = random_requests(36, VOCAB, "s")
    shards = {"a": reqs[:12], "b": reqs[12:20], "c": reqs[20:]}
    engine = EngineBackend(model, PARAMS, 8, 0, [1])
    engine.submit(shards["a"], "a")
    got: dict[str, dict[int, object]] = {k: {} for k in shards}
    steps = 0
    while engine.busy:
        if steps == 3:  # b joins while a's rows denoise; c while both drain
            engine.submit(shards["b"], "b")
        if steps == 9:
            engine.submit(shards["c"], "c")
        for f in engine.step():
            assert f.index not in got[f.tag], "a row finished twice"
            got[f.tag][f.index] = f.generation
        steps += 1
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in shards.items()}
    for tag, rows in shards.items():  # tags and indices point back at the submitted request
        assert [got[tag][i].row_id for i in range(len(rows))] == [r.row_id for r in rows]
    # each shard alone, at another batch size: the same tokens, forwards and finish reasons
    streamed = {g.row_id: g for v in got.values() for g in v.values()}
    for rows in shards.values():
        assert {r.row_id: streamed[r.row_id] for r in rows} == _alone(model, rows, batch=4)
    assert max(engine.stats.batch_sizes) == 8


def test_a_prompt_too_long_for_the_cache_waits_for_empty_slots_and_the_cache_grows():
    model = random_model(vocab=VOCAB, layers=3, sliding_window=12)
    short = [Request(f"short{i}", [5 + i] * 4) for i in range(6)]
    long = [Request("long", [3 + i % (VOCAB - 3) for i in range(150)])]
    engine = EngineBackend(model, PARAMS, 4, 0, [1])
    engine.submit(short, "short")
    out = {}
    first = True
    while engine.busy:
        for f in engine.step():
            out[f.generation.row_id] = f.generation
        if first:
            capacity = engine.engine.cache.capacity
            engine.submit(long, "long")  # needs more than the cache holds while short rows are in it
            first = False
    assert engine.engine.cache.capacity > capacity >= 4
    assert out == {**_alone(model, short), **_alone(model, long)}


def test_reset_returns_the_unfinished_rows_and_running_them_again_gives_their_outputs():
    model = random_model(vocab=VOCAB, layers=3, sliding_window=12)
    reqs = random_requests(20, VOCAB, "r")
    engine = EngineBackend(model, PARAMS, 8, 0, [1])
    engine.submit(reqs, "t")
    done = {}
    for _ in range(4):
        done.update({f.index: f.generation for f in engine.step()})
    dropped = engine.reset()
    assert not engine.busy
    assert sorted(i for _, i, _ in dropped) == sorted(set(range(20)) - set(done))
    assert all(tag == "t" and reqs[i] is r for tag, i, r in dropped)
    again = engine.generate([r for _, _, r in dropped])
    outputs = {**{reqs[i].row_id: g for i, g in done.items()}, **{g.row_id: g for g in again}}
    assert outputs == _alone(model, reqs)


def test_the_steps_each_canvas_took_add_up_to_each_rows_decoder_forwards():
    model = random_model(vocab=VOCAB, layers=3, sliding_window=12)
    reqs = random_requests(20, VOCAB, "s")
    engine = EngineBackend(model, PARAMS, 8, 0, [1])
    gens = engine.generate(reqs)
    hist = engine.stats.canvas_steps
    assert sum(k * n for k, n in hist.items()) == sum(g.num_decoder_forwards for g in gens)
    assert sum(hist.values()) >= len(reqs) and min(hist) >= 1 and max(hist) <= PARAMS.max_denoising_steps
    assert len(hist) > 1, "every canvas took the same number of steps: the histogram tells nothing"
