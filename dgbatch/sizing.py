"""How many rows a replica runs at once: the one place that decides it, for every backend.

`engine.batch_size` when it is a number; for 'auto', what the engine's memory model
(`dgbatch.engine.memory`) fits on the replica's device with slots sized for the job's longest
prompt (the plan knows it) plus its committed canvases. The reference backend holds more fp32
logits buffers per row than the engine (`reference.LOGITS_BUFFERS`), so it is charged for them.
Before a model is loaded (planning) only the configured number is known; the planner's padding
report assumes `REPORT_BATCH_SIZE` under 'auto'.
"""

from __future__ import annotations

from dgbatch.config import EngineSection
from dgbatch.generation import SamplingParams

REPORT_BATCH_SIZE = 32  # the batch the planning report's padding figure assumes under engine.batch_size=auto
AUTO_MAX_BATCH_SIZE = 256  # the most rows engine.batch_size=auto picks


def planned_batch_size(engine: EngineSection) -> int:
    """The batch size as known before any model loads: the configured one, or the report's assumption."""
    return engine.batch_size if engine.batch_size != "auto" else REPORT_BATCH_SIZE


def batch_size_bound(batch_size: int | str) -> int:
    """The most rows a replica may run at once, known before any model loads (`engine.batch_size`)."""
    return batch_size if isinstance(batch_size, int) else AUTO_MAX_BATCH_SIZE


def slot_capacity(longest_prompt: int, max_new_tokens: int, canvas: int) -> int:
    """Committed tokens a slot must hold: the prompt, then max_new_tokens in whole canvases."""
    return longest_prompt + -(-max_new_tokens // canvas) * canvas


def batch_size(engine: EngineSection, model, params: SamplingParams, longest_prompt: int,
               max_prefill_tokens: int = 8192) -> int:
    """`engine.batch_size`, or for 'auto' the largest power of two (<= AUTO_MAX_BATCH_SIZE) whose estimated
    peak fits in 85% of the free memory of the model's device, slots sized for `longest_prompt`."""
    if engine.batch_size != "auto":
        return engine.batch_size
    from dgbatch.engine.memory import default_batch_size
    from dgbatch.engine.prefix import ENTRIES

    buffers, prefixes = 2, ENTRIES if engine.share_prefixes else 0
    if engine.backend == "reference":
        from dgbatch.reference import LOGITS_BUFFERS

        buffers, prefixes = LOGITS_BUFFERS, 0
    capacity = slot_capacity(longest_prompt, params.max_new_tokens, model.config.canvas_length)
    return default_batch_size(model, capacity, max_batch_size=AUTO_MAX_BATCH_SIZE, max_prefill_tokens=max_prefill_tokens,
                              fp32_logits_buffers=buffers, prefix_entries=prefixes)
