"""The memory model matches what the engine allocates, and the sampler keeps <= 2 fp32 logits buffers."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dgbatch.engine.loop import Engine
from dgbatch.engine.memory import default_batch_size, memory_model
from dgbatch.generation import Request, SamplingParams
from tests.engine.helpers import random_model

PARAMS = SamplingParams(
    max_new_tokens=32,
    max_denoising_steps=4,
    entropy_bound=0.5,
    t_min=0.3,
    t_max=0.6,
    stability_threshold=1,
    confidence_threshold=0.01,
    seed=0,
)


class LiveLogitsBuffers(TorchDispatchMode):
    """Counts distinct live fp32 storages shaped [..., V] with n*C*V elements after every op.

    A fused kernel's internal buffers are invisible here; logsumexp allocates one [..., V]
    temporary, so the count of live buffers when it starts is recorded and counted one higher."""

    def __init__(self, numel: int, vocab: int):
        super().__init__()
        self.numel, self.vocab, self.refs, self.peak = numel, vocab, [], 0

    def _live(self) -> int:
        self.refs = [r for r in self.refs if r() is not None]
        return len({r().untyped_storage().data_ptr() for r in self.refs})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.logsumexp:
            self.peak = max(self.peak, self._live() + 1)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.float32
                and t.numel() == self.numel
                and t.shape[-1] == self.vocab
            ):
                self.refs.append(weakref.ref(t))
        self.peak = max(self.peak, self._live())
        return out


def test_denoising_step_holds_at_most_two_fp32_logits_buffers():
    model = random_model(vocab=97)
    engine = Engine(model, PARAMS, batch_size=4, pad_id=0, eos_ids=[1])
    reqs = [Request(str(i), list(range(3, 3 + 5 * (i + 1)))) for i in range(4)]
    engine.submit(reqs)
    engine._ensure_cache()
    engine._refill()
    engine._encode()
    with torch.inference_mode(), LiveLogitsBuffers(4 * 16 * 97, 97) as mode:
        engine._denoise(4)
    assert mode.peak == 2, mode.peak


def test_kv_per_slot_matches_the_allocated_cache():
    model = random_model(sliding_window=12)
    engine = Engine(model, PARAMS, batch_size=8, pad_id=0, eos_ids=[1])
    engine.submit([Request("a", list(range(3, 40)))])
    engine._ensure_cache()
    mm = memory_model(model, engine.cache.capacity)
    assert mm.kv_per_slot * 8 == engine.cache.nbytes


def test_default_batch_size_follows_the_budget():
    model = random_model()
    mm = memory_model(model, 256)
    sizes = [default_batch_size(model, 256, budget_bytes=b, fraction=1.0) for b in (0, 10**6, 10**7, 10**8, 10**9)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] > sizes[1]
    for b, budget in zip(sizes[1:], (10**6, 10**7, 10**8, 10**9)):
        assert b == 1 or mm.peak(b) - mm.weights <= budget
    # the sampler's two fp32 [C, V] buffers are part of every row's cost
    assert mm.logits_per_row == 2 * 16 * model.config.text_config.vocab_size * 4


def test_job_batch_size_auto_is_the_memory_models_choice_for_the_jobs_longest_prompt(monkeypatch):
    from dgbatch.config import load_config
    from dgbatch.engine import memory
    from dgbatch.engine.prefix import ENTRIES
    from dgbatch.sizing import batch_size

    model = random_model()
    longest = 300  # the plan's longest prompt, not an assumed 1,024 tokens
    capacity = longest + 2 * 16  # then PARAMS' 32 new tokens: two canvases of 16
    mm = memory_model(model, capacity, prefix_entries=ENTRIES)  # engine.share_prefixes is on by default
    budget = int((mm.peak(64) - mm.weights) / 0.85) + 1  # room for 64 engine rows, not 128
    monkeypatch.setattr(memory, "available_bytes", lambda device: budget)
    base = {"model": {"path": "m"}, "input": {"path": "i"}, "output": {"path": "o"}}
    cfg = load_config(None, [], base=base)
    assert cfg.engine.batch_size == "auto"
    engine = batch_size(cfg.engine, model, PARAMS, longest)
    assert engine == default_batch_size(model, capacity, budget_bytes=budget, prefix_entries=ENTRIES) == 64
    # a job with longer prompts needs bigger slots: fewer of them fit the same memory
    assert batch_size(cfg.engine, model, PARAMS, 4 * longest) < 64
    reference = batch_size(load_config(None, ["engine.backend=reference"], base=base).engine, model, PARAMS, longest)
    # generate holds more logits-sized buffers per row: 64 of its rows do not fit
    assert reference == default_batch_size(model, capacity, budget_bytes=budget, fp32_logits_buffers=5) == 32
    assert batch_size(load_config(None, ["engine.batch_size=24"], base=base).engine, model, PARAMS, longest) == 24
