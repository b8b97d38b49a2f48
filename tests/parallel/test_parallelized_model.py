"""A sharded toy model computes what the whole one does: 2 ranks on gloo (spawned processes).

TP=2 splits attention heads (KV heads split on sliding layers, replicated on full-attention layers,
which have 1 KV head and no v_proj) and the dense MLP; EP=2 splits the experts. Compared with the
unsharded model: the decoder logits of transformers' own forward on the sharded modules (left-padded
prompts, a DynamicCache) and of the engine's passes (contexts past the sliding window), and the
engine's generations on a fixed sample, which must be identical, and identical on both ranks.
"""

from __future__ import annotations

import pytest
import torch

from dgbatch.checkpoint import resolve_sampling
from dgbatch.config import SamplingSection
from dgbatch.parallel import ParallelDims
from dgbatch.parallel.local import run_local
from tests.engine.helpers import CHECKPOINT, trained_checkpoint
from tests.parallel.ranks import all_results, parallelized_rank, rank_loaded

TOL = 1e-4
NUM_PROMPTS = 48


@pytest.fixture(scope="module")
def params():
    return resolve_sampling(CHECKPOINT, SamplingSection(seed=0, max_new_tokens=48))


@pytest.fixture(scope="module")
def whole(params):
    torch.set_num_threads(1)
    model, _ = trained_checkpoint()
    return {**all_results(model, NUM_PROMPTS, params), "params": sum(p.numel() for p in model.parameters())}


@pytest.mark.parametrize("dims, rank_fn", [(ParallelDims(tp=2), parallelized_rank), (ParallelDims(ep=2), parallelized_rank),
                                           (ParallelDims(tp=2), rank_loaded)], ids=["tp2", "ep2", "tp2-rank-loaded"])
def test_two_ranks_match_one(dims, rank_fn, params, whole):
    """rank_loaded: each rank reads only its slices of the checkpoint instead of loading it whole."""
    ranks = run_local(rank_fn, dims, NUM_PROMPTS, params)
    for r, got in enumerate(ranks):
        for key in ("transformers", "engine"):
            diff = (got[key] - whole[key]).abs().max().item()
            assert diff <= TOL, f"rank {r}: {key} logits differ by {diff:.2e} > {TOL}"
        same = sum(a == b for a, b in zip(got["generations"], whole["generations"]))
        assert same == NUM_PROMPTS, f"rank {r}: only {same}/{NUM_PROMPTS} generations identical to TP=1"
        assert got["params"] < whole["params"]  # each rank holds a slice
    # lockstep: both ranks computed the very same logits and made the very same decisions
    assert torch.equal(ranks[0]["engine"], ranks[1]["engine"])
    assert ranks[0]["generations"] == ranks[1]["generations"]
