"""`EngineBackend`: the engine behind the pipeline's `Backend` protocol."""

from __future__ import annotations

from collections.abc import Sequence

from dgbatch.engine.loop import Engine, EngineStats
from dgbatch.engine.memory import default_batch_size
from dgbatch.generation import Generation, Request, SamplingParams

# Slot capacity assumed when sizing the batch before any prompt is seen.
DEFAULT_PROMPT_TOKENS = 1024


def auto_batch_size(
    model, params: SamplingParams, *, capacity: int | None = None, max_prefill_tokens: int = 8192,
    fp32_logits_buffers: int = 2,
) -> int:
    """What the memory model fits on the model's device, slots of `capacity` committed tokens (default:
    a DEFAULT_PROMPT_TOKENS prompt and max_new_tokens in whole canvases); `fp32_logits_buffers` per row as
    in `memory_model` (another loop than the engine's may hold more)."""
    canvas = model.config.canvas_length
    capacity = capacity or DEFAULT_PROMPT_TOKENS + -(-params.max_new_tokens // canvas) * canvas
    return default_batch_size(model, capacity, max_prefill_tokens=max_prefill_tokens,
                              fp32_logits_buffers=fp32_logits_buffers)


class EngineBackend:
    """dgbatch's own generation loop for a loaded `DiffusionGemmaForBlockDiffusion` (eval mode, any device).

    Same constructor as `ReferenceBackend`; `batch_size` is the number of slots, or None to size it
    from the device's free memory with the engine's memory model (`dgbatch.engine.memory`). Outputs
    depend only on (params.seed, row id, prompt), not on batch composition, order, slot or call.

    capacity: committed tokens per slot to allocate up front (default: from the longest prompt of
        each call, grown when a later call needs more);
    compile: `torch.compile` the denoising step (static shapes: one graph per decoder batch size);
    max_prefill_tokens: new prompt and commit tokens per model pass (bounds the encoder's activations).
    """

    def __init__(
        self,
        model,
        params: SamplingParams,
        batch_size: int | None,
        pad_id: int,
        eos_ids: Sequence[int],
        *,
        capacity: int | None = None,
        compile: bool = False,
        max_prefill_tokens: int = 8192,
    ):
        if batch_size is None:
            batch_size = auto_batch_size(model, params, capacity=capacity, max_prefill_tokens=max_prefill_tokens)
        self.engine = Engine(
            model,
            params,
            batch_size,
            pad_id,
            eos_ids,
            capacity=capacity,
            compile=compile,
            max_prefill_tokens=max_prefill_tokens,
        )

    @property
    def batch_size(self) -> int:
        return self.engine.num_slots

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        return self.engine.run(requests)
