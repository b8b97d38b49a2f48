"""GPU-only checks: compiled decoder step (CUDA graphs) and the peak-memory model on a device."""

from __future__ import annotations

import pytest
import torch

from dgbatch.engine import EngineBackend
from dgbatch.engine.memory import memory_model
from dgbatch.generation import SamplingParams
from tests.engine.helpers import random_model, random_requests

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PARAMS = SamplingParams(
    max_new_tokens=48,
    max_denoising_steps=6,
    entropy_bound=0.5,
    t_min=0.3,
    t_max=0.6,
    stability_threshold=0,
    confidence_threshold=4.03,
    seed=5,
)


def test_compiled_step_matches_eager_and_does_not_recompile():
    model = random_model(vocab=61, layers=3).cuda()
    reqs = random_requests(24, 61)
    eager = EngineBackend(model, PARAMS, 8, 0, [1]).generate(reqs)
    compiled = EngineBackend(model, PARAMS, 8, 0, [1], compile=True)
    first = compiled.generate(reqs)
    from torch._dynamo.utils import counters

    before = dict(counters["stats"])
    again = compiled.generate(reqs)
    assert again == first
    assert counters["stats"].get("unique_graphs", 0) == before.get("unique_graphs", 0)  # no new graphs
    same = sum(a.token_ids == b.token_ids for a, b in zip(first, eager))
    assert same >= 0.9 * len(reqs)  # fused kernels may round differently, rarely flipping a sample


def test_peak_memory_stays_within_the_model():
    vocab = 4096  # large enough that the sampler's [B, C, V] buffers dominate
    model = random_model(vocab=vocab, layers=3).cuda()
    backend = EngineBackend(model, PARAMS, 32, 0, [1])
    reqs = random_requests(64, vocab)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    backend.generate(reqs)
    peak = torch.cuda.max_memory_allocated()
    mm = memory_model(model, backend.engine.cache.capacity)
    assert peak <= 1.1 * mm.peak(32), (peak, mm)
