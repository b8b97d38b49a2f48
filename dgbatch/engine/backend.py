"""`EngineBackend`: the engine behind the pipeline's `Backend` protocol, batch or streaming."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from dgbatch.engine.loop import Engine, EngineStats, Finished
from dgbatch.generation import Generation, Request, SamplingParams


class EngineBackend:
    """dgbatch's own generation loop for a loaded `DiffusionGemmaForBlockDiffusion` (eval mode, any device).

    Same constructor as `ReferenceBackend`; `batch_size` is the number of slots (`dgbatch.sizing`
    decides it for a job). Outputs depend only on (params.seed, row id, prompt), not on batch
    composition, order, slot, call, or what else is streaming through the slots.

    capacity: committed tokens per slot to allocate up front (default: from the longest prompt
        submitted, grown while no row is in a slot);
    compile: `torch.compile` the denoising step (static shapes: one graph per decoder batch size);
    max_prefill_tokens: new prompt and commit tokens per model pass (bounds the encoder's activations);
    share_prefixes: rows that share a prompt or a long prefix encode it once (`dgbatch.engine.prefix`).

    `generate` runs one list to the end; `submit`, `step`, `busy`, `reserve` and `reset` are the engine's stream
    (`dgbatch.engine.loop`): requests enter while others run, finished rows come out as they finish.
    """

    def __init__(
        self,
        model,
        params: SamplingParams,
        batch_size: int,
        pad_id: int,
        eos_ids: Sequence[int],
        *,
        capacity: int | None = None,
        compile: bool = False,
        max_prefill_tokens: int = 8192,
        share_prefixes: bool = True,
    ):
        self.engine = Engine(
            model,
            params,
            batch_size,
            pad_id,
            eos_ids,
            capacity=capacity,
            compile=compile,
            max_prefill_tokens=max_prefill_tokens,
            share_prefixes=share_prefixes,
        )

    @property
    def batch_size(self) -> int:
        return self.engine.num_slots

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        return self.engine.run(requests)

    # ---- the stream ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.engine.busy

    def submit(self, requests: Sequence[Request], tag: Hashable = None) -> None:
        self.engine.submit(requests, tag)

    def step(self) -> list[Finished]:
        return self.engine.step()

    def reserve(self, prompt_tokens: int) -> None:
        self.engine.reserve(prompt_tokens)

    def reset(self) -> list[tuple[Hashable, int, Request]]:
        return self.engine.reset()
