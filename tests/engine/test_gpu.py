"""GPU-only check: the peak-memory model on a device (the compiled step is in test_compile.py)."""

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
