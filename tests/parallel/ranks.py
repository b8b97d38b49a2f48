"""What each rank runs in the multi-process tests (module level, so spawned processes import it)."""

from __future__ import annotations

import torch

from dgbatch.engine import EngineBackend
from dgbatch.engine.packing import pack
from dgbatch.engine.runner import ModelRunner
from dgbatch.parallel import Mesh, parallelize
from dgbatch.parallel.load import load_parallelized
from tests.engine.helpers import TransformersOracle, random_requests, toy_requests, trained_checkpoint

# Left-padded prompts of 5-58 tokens, then three committed canvases: contexts up to 106 tokens, past
# the toy's sliding window of 48.
LENGTHS = [58, 5, 33, 47, 12]
NUM_CANVASES = 3


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    canvases = [torch.randint(0, vocab, (len(prompts), 16), generator=g) for _ in range(NUM_CANVASES)]
    canvas = torch.randint(0, vocab, (len(prompts), 16), generator=g)
    sc = torch.randn(len(prompts), 16, vocab, generator=g) * 3
    return prompts, canvases, canvas, sc


@torch.inference_mode()
def transformers_logits(model) -> torch.Tensor:
    """transformers' own encoder/decoder forward (DynamicCache, left padding) on the sharded modules."""
    prompts, canvases, canvas, sc = _inputs(model.config.text_config.vocab_size)
    oracle = TransformersOracle(model, prompts)
    for c in canvases:
        oracle.commit(c)
    return oracle.decode(canvas, sc)


@torch.inference_mode()
def engine_logits(model) -> torch.Tensor:
    """The engine's passes (slot cache, per-row positions) on the same inputs; the last commit shares
    the decoder's pass, as in the engine's loop."""
    prompts, canvases, canvas, sc = _inputs(model.config.text_config.vocab_size)
    runner = ModelRunner(model)
    assert runner.fused, "sharding keeps the encoder's weights tied to the decoder's"
    n = len(prompts)
    cache = runner.new_cache(num_slots=n, capacity=max(LENGTHS) + 16 * NUM_CANVASES)
    slots, lengths = list(range(n)), [0] * n
    batches = []
    for tokens in [list(prompts)] + [c.tolist() for c in canvases]:
        batches.append(pack(cache, slots, tokens, lengths))
        lengths = [length + len(t) for length, t in zip(lengths, tokens)]
    for batch in batches[:-1]:
        runner.encode(cache, batch)
    soft = runner.soft_embedding(sc.softmax(-1, dtype=torch.float32))
    return runner.forward(cache, n, canvas, soft, batches[-1])


def generations(model, num_prompts: int, params, batch_size: int = 8) -> list[tuple]:
    """EngineBackend over seeded toy-task prompts and random prompts: (row id, tokens, forwards) per row."""
    from transformers import AutoTokenizer

    from tests.engine.helpers import CHECKPOINT

    tok = AutoTokenizer.from_pretrained(str(CHECKPOINT))
    _, reqs = toy_requests(tok, num_prompts // 2, 17, "t")
    reqs += random_requests(num_prompts - len(reqs), model.config.text_config.vocab_size, prefix="x")
    gens = EngineBackend(model, params, batch_size, tok.pad_token_id, [tok.eos_token_id]).generate(reqs)
    return [(g.row_id, g.token_ids, g.num_decoder_forwards, g.finish_reason) for g in gens]


def all_results(model, num_prompts: int, params) -> dict:
    return {
        "transformers": transformers_logits(model),
        "engine": engine_logits(model),
        "generations": generations(model, num_prompts, params),
    }


def parallelized_rank(mesh: Mesh, num_prompts: int, params) -> dict:
    model, _ = trained_checkpoint()
    parallelize(model, mesh)
    return {**all_results(model, num_prompts, params), "params": sum(p.numel() for p in model.parameters())}


def rank_loaded(mesh: Mesh, num_prompts: int, params) -> dict:
    """As `parallelized_rank`, the rank reading only its own slices of the checkpoint (per-rank loading)."""
    from tests.engine.helpers import CHECKPOINT

    model = load_parallelized(CHECKPOINT, torch.float32, "cpu", mesh)
    return {**all_results(model, num_prompts, params), "params": sum(p.numel() for p in model.parameters())}
