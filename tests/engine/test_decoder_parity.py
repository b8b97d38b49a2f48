"""One decoder forward of the engine equals transformers' on the same canvas and cache (fp32)."""

from __future__ import annotations

import torch

from dgbatch.engine.runner import ModelRunner
from tests.engine.helpers import TransformersOracle, engine_logits, random_model

TOL = 1e-4


def _prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def _check(model, lengths, num_canvases, with_sc, slots=None, max_len=None):
    vocab = model.config.text_config.vocab_size
    prompts = _prompts(vocab, lengths)
    g = torch.Generator().manual_seed(7)
    canvases = [torch.randint(0, vocab, (len(prompts), 16), generator=g) for _ in range(num_canvases)]
    canvas = torch.randint(0, vocab, (len(prompts), 16), generator=g)
    sc = torch.randn(len(prompts), 16, vocab, generator=g) * 3 if with_sc else None

    oracle = TransformersOracle(model, prompts)
    for c in canvases:
        oracle.commit(c)
    ref = oracle.decode(canvas, sc)
    for mode in ("separate", "fused", "unfused"):
        ours = engine_logits(model, prompts, canvases, canvas, sc, slots, max_len, mode)
        diff = (ours - ref).abs().max().item()
        assert diff <= TOL, f"{mode}: max abs logits diff {diff:.2e} > {TOL}"


def test_single_row_prefill_only():
    _check(random_model(), [9], num_canvases=0, with_sc=False)


def test_left_padded_batch_with_self_conditioning():
    _check(random_model(), [5, 11, 3, 8], num_canvases=0, with_sc=True)


def test_context_longer_than_sliding_window():
    # window 12; prompts up to 30 tokens, then three committed canvases: 78 tokens of context
    model = random_model(sliding_window=12)
    _check(model, [30, 7, 19], num_canvases=3, with_sc=True)


def test_window_shorter_than_canvas_and_scattered_slots():
    # a window of 6 is shorter than one canvas (16): the commit itself must apply the window
    model = random_model(sliding_window=6, layers=3)
    _check(model, [4, 13], num_canvases=2, with_sc=True, slots=[3, 1])


def test_reading_a_bounded_prefix_view():
    # the eager engine reads only the first `max_len` >= every length committed entries
    model = random_model(sliding_window=12)
    _check(model, [21, 9], num_canvases=2, with_sc=True, max_len=64)


def test_encoder_and_decoder_share_one_pass_when_tied():
    # transformers ties every encoder layer weight to the decoder's; the runner relies on it to fuse
    assert ModelRunner(random_model()).fused
    assert ModelRunner(random_model(sliding_window=6, layers=3)).fused


def test_untied_weights_run_encoder_and_decoder_apart():
    # a checkpoint whose decoder differs from its encoder must not share one pass: the runner sees it
    model = random_model(sliding_window=12)
    gate = model.model.decoder.layers[1].mlp.gate_proj
    gate.weight = torch.nn.Parameter(gate.weight.detach() * 1.5)
    assert not ModelRunner(model).fused
    _check(model, [21, 9, 14], num_canvases=1, with_sc=True)
