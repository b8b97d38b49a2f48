"""Peak-memory model of the engine, and the default batch size it implies.

Peak = weights
     + slots x (KV per slot + state per slot)
     + the largest transient of one loop iteration, per decoder row:
         logits:      two fp32 [C, V] buffers (processed logits, then softmax/CDF; the sampler never
                      holds a third) + one [C, V] copy in the model dtype when that is not fp32
                      (the lm_head output, and the cast transformers applies before self-conditioning)
         activations: the decoder's working set: ~8 [C, hidden] hidden-state copies, the dense MLP
                      and the top-k experts' intermediates, and fp32 attention scores [Hq, C, L]
                      (what SDPA's math kernel materialises; fused kernels need less)
     + one prefill chunk: `max_prefill_tokens` tokens of encoder activations and their
       causal attention scores
     + the shared prefixes' store (`prefix.py`): `prefix.ENTRIES` slots' KV (it holds prompts only,
       so a slot's KV is an upper bound).

KV per slot = sum over layers of 2 (K, V) x kv_heads x (P + C) x head_dim x dtype bytes, where
P = the slot capacity (prompt + committed canvases) on full-attention layers and W - 1 on sliding
layers: a sliding layer's KV does not grow with the context.

Under tensor/expert parallelism (`dgbatch.parallel`) the sizes are read from the sharded modules:
KV heads, q heads and intermediate sizes are the rank's; the logits stay whole (the vocabulary is
replicated), so they do not shrink with more ranks.

At real scale the logits dominate: one fp32 [256, 262144] row is 268 MB, so a row costs ~0.54 GB
of sampler buffers against ~0.1 GB of KV for a 4k context; hence the model is used to pick the
batch size rather than a fixed number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dgbatch.engine.cache import layer_specs


@dataclass(frozen=True)
class MemoryModel:
    """Bytes, per component; `peak(b)` is the estimated high-water mark with b slots."""

    weights: int
    kv_per_slot: int
    state_per_slot: int
    logits_per_row: int
    activations_per_row: int
    prefill: int
    prefix_store: int = 0

    def peak(self, batch_size: int) -> int:
        per_row = self.kv_per_slot + self.state_per_slot + self.logits_per_row + self.activations_per_row
        return self.weights + batch_size * per_row + self.prefill + self.prefix_store


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = id(t) if t.device.type == "meta" else t.data_ptr()  # meta tensors have no address
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _local_sizes(model) -> tuple[int, int, int]:
    """(q heads, dense intermediate, expert intermediate) this process computes: the model's own
    modules, so a model sharded by `dgbatch.parallel.parallelize` reports its rank's share."""
    layer = model.model.decoder.layers[0]
    attn = layer.self_attn
    experts = getattr(layer, "experts", None)
    experts = getattr(experts, "experts", experts)  # under ParallelExperts
    moe = experts.intermediate_dim if experts is not None else 0
    return attn.q_proj.out_features // attn.head_dim, layer.mlp.gate_proj.out_features, moe


def memory_model(
    model, capacity: int, max_prefill_tokens: int = 8192, stability_threshold: int = 1, fp32_logits_buffers: int = 2,
    prefix_entries: int = 0,
) -> MemoryModel:
    """The engine's memory model for `model` with slots of `capacity` committed tokens
    (`fp32_logits_buffers`: the sampler's [C, V] buffers per row; another loop may hold more;
    `prefix_entries`: the shared prefixes it keeps, 0 with `share_prefixes` off)."""
    text = model.config.get_text_config()
    canvas, vocab, hidden = model.config.canvas_length, text.vocab_size, text.hidden_size
    dtype = model.model.decoder.embed_tokens.weight.dtype
    nbytes = torch.finfo(dtype).bits // 8
    ring = max(1, min(text.sliding_window - 1, capacity))
    specs = layer_specs(model)
    kv = sum(2 * s.kv_heads * ((ring if s.sliding else capacity) + canvas) * s.head_dim * nbytes for s in specs)
    state = canvas * (hidden * nbytes + 8 * (2 + stability_threshold)) + 64
    logits = canvas * vocab * (4 * fp32_logits_buffers + (0 if dtype == torch.float32 else nbytes))
    heads, inter, moe_inter = _local_sizes(model)
    moe = text.top_k_experts * 2 * moe_inter if getattr(text, "num_experts", None) else 0
    ffn = 2 * inter + moe
    acts = canvas * (8 * hidden + ffn) * nbytes + heads * canvas * (capacity + canvas) * 4
    t = max(1, min(max_prefill_tokens, capacity))
    prefill = max_prefill_tokens * (8 * hidden + ffn) * nbytes + heads * max_prefill_tokens * t * 4
    weights = _unique_bytes(list(model.parameters()) + list(model.buffers()))
    return MemoryModel(weights, kv, state, logits, acts, prefill, prefix_entries * kv)


def available_bytes(device: torch.device) -> int:
    """Memory the engine may still allocate: free device memory on CUDA, available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_batch_size(
    model,
    capacity: int,
    *,
    budget_bytes: int | None = None,
    fraction: float = 0.85,
    max_batch_size: int = 256,
    max_prefill_tokens: int = 8192,
    fp32_logits_buffers: int = 2,
    prefix_entries: int = 0,
) -> int:
    """The largest power of two whose estimated peak (beyond the already loaded weights) fits in
    `fraction` of the budget (default: what the model's device has free). At least 1."""
    mm = memory_model(model, capacity, max_prefill_tokens, fp32_logits_buffers=fp32_logits_buffers,
                      prefix_entries=prefix_entries)
    if budget_bytes is None:
        budget_bytes = available_bytes(next(model.parameters()).device)
    budget = fraction * budget_bytes
    b = 1
    while b * 2 <= max_batch_size and mm.peak(b * 2) - mm.weights <= budget:
        b *= 2
    return b
