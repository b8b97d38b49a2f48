"""The reference backend: transformers' own `model.generate`, batch by batch.

It is the yardstick the engine is held to, so it calls `generate` as a user would and derives
nothing it does not have to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dgbatch.generation import Generation, Request, SamplingParams, cut_output, max_new_tokens, row_seed

# fp32 [C, V] buffers per row that `generate` holds at once (raw and processed logits, probabilities,
# the sampler's log-probabilities and entropy terms; an estimate), against the engine's two: what
# `engine.batch_size: auto` charges the reference backend per row.
LOGITS_BUFFERS = 5


class ReferenceBackend:
    def __init__(self, model, params: SamplingParams, batch_size: int, pad_id: int, eos_ids: list[int]):
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        self.model = model
        self.params = params
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.eos_ids = set(eos_ids)
        self.generate_kwargs = {
            "max_new_tokens": params.max_new_tokens,
            "max_denoising_steps": params.max_denoising_steps,
            "sampler_config": EntropyBoundSamplerConfig(entropy_bound=float(params.entropy_bound)),
            "t_min": float(params.t_min),
            "t_max": float(params.t_max),
            "stability_threshold": params.stability_threshold,
            "confidence_threshold": float(params.confidence_threshold),
            "pad_token_id": pad_id,
            "eos_token_id": list(eos_ids),
            "return_dict_in_generate": True,
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        # Rows with their own max_new_tokens share a batch only with rows of the same budget (one
        # `generate` call takes one max_new_tokens); similar lengths share a batch (less padding). The
        # order is deterministic so a retry reproduces.
        budget = [max_new_tokens(r, self.params) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (budget[i], len(requests[i].prompt_ids), i))
        out: list[Generation | None] = [None] * len(requests)
        start = 0
        while start < len(order):
            same = [i for i in order[start : start + self.batch_size] if budget[i] == budget[order[start]]]
            for i, gen in zip(same, self._generate_batch([requests[i] for i in same], budget[same[0]])):
                out[i] = gen
            start += len(same)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, batch: list[Request], max_new: int) -> list[Generation]:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        # generate draws from the global RNG; seed it from the batch's rows so a retried shard reproduces.
        torch.manual_seed(row_seed(self.params.seed, "\x1e".join(r.row_id for r in batch)))
        kwargs = {**self.generate_kwargs, "max_new_tokens": max_new}
        out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), **self._images(batch, ids),
                                  **kwargs)
        new = out.sequences[:, width:].cpu().tolist()
        tpf = out.tokens_per_forward.cpu().tolist()
        return [self._row(r, toks, t, max_new) for r, toks, t in zip(batch, new, tpf)]

    def _images(self, batch: list[Request], ids: torch.Tensor) -> dict:
        """generate's image inputs, as the processor returns them: pixels in row order, mm_token_type_ids."""
        rows = [r.vision for r in batch if r.vision is not None]
        if not rows:
            return {}
        dev = self.device
        return {
            "pixel_values": torch.cat([v.pixel_values for v in rows]).to(dev, self.model.dtype),
            "image_position_ids": torch.cat([v.position_ids for v in rows]).to(dev),
            "mm_token_type_ids": (ids == self.model.config.image_token_id).long().to(dev),
        }

    def _row(self, req: Request, new: list[int], tpf: float, max_new: int | None = None) -> Generation:
        max_new = self.params.max_new_tokens if max_new is None else max_new
        valid = sum(t != self.pad_id for t in new)
        token_ids, reason = cut_output(new, max_new, self.pad_id, self.eos_ids)
        # transformers reports tokens/forward = valid tokens / this row's decoder forwards.
        forwards = round(valid / tpf) if tpf > 0 else 0
        return Generation(
            row_id=req.row_id,
            token_ids=token_ids,
            finish_reason=reason,
            num_decoder_forwards=forwards,
            tokens_per_forward=float(tpf),
        )
