"""GPU-only check: the peak-memory model on a device (the compiled step is in test_compile.py)."""

from __future__ import annotations

import pytest
import torch

from dgbatch.engine import EngineBackend
from dgbatch.engine.memory import memory_model
from tests.engine.helpers import random_model, random_requests, varied_stop_params

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PARAMS = varied_stop_params(max_new_tokens=48, seed=5)


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
