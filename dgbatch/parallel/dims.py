"""Parallel degrees and their validation against a model's shape, from its config alone.

A replica of `world = tp * ep` ranks. Rank r sits at (ep_rank, tp_rank) = divmod(r, tp):

- attention and the dense MLP are tensor-parallel over the tp ranks of one ep group (each ep group
  holds the same attention/MLP shards and computes the same values);
- the experts are split over the ep groups, and each expert's intermediate dim over the tp ranks,
  so every rank holds 1/world of the expert weights;
- everything else (embeddings, lm_head, norms, router, self-conditioning) is replicated.

`check_model` runs on `config.json` before any weights load, so a bad degree fails in milliseconds
with the numbers named.
"""

from __future__ import annotations

from dataclasses import dataclass


class ParallelConfigError(ValueError):
    """Degrees that do not fit the model or the resources; the message names the numbers."""


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1:
            raise ParallelConfigError(f"parallel.tp_size={self.tp} and parallel.ep_size={self.ep} must be >= 1")

    @property
    def world(self) -> int:
        return self.tp * self.ep

    def coords(self, rank: int) -> tuple[int, int]:
        """(ep_rank, tp_rank) of a global rank."""
        return divmod(rank, self.tp)

    def tp_group_ranks(self, ep_rank: int) -> list[int]:
        return [ep_rank * self.tp + t for t in range(self.tp)]

    def check_model(self, text_config) -> None:
        """Raise ParallelConfigError unless these degrees can shard this model.

        text_config: a `DiffusionGemmaTextConfig` (per-layer KV heads resolved by transformers)."""
        problems = []
        tp, ep = self.tp, self.ep
        heads = text_config.num_attention_heads
        if heads % tp:
            problems.append(f"parallel.tp_size={tp} does not divide num_attention_heads={heads}")
        for layer_type, kv in sorted(kv_heads_by_layer_type(text_config).items()):
            if kv % tp and tp % kv:
                problems.append(
                    f"parallel.tp_size={tp} can neither split nor replicate the {kv} KV heads of the "
                    f"{layer_type} layers: it must divide {kv} or be a multiple of it"
                )
        if text_config.intermediate_size % tp:
            problems.append(f"parallel.tp_size={tp} does not divide intermediate_size={text_config.intermediate_size}")
        experts = getattr(text_config, "num_experts", None)
        if experts:
            if experts % ep:
                problems.append(f"parallel.ep_size={ep} does not divide num_experts={experts}")
            moe = text_config.moe_intermediate_size
            if moe % tp:
                problems.append(
                    f"parallel.tp_size={tp} does not divide moe_intermediate_size={moe} "
                    "(each expert's intermediate dim is split over the tp ranks)"
                )
        elif ep > 1:
            problems.append(f"parallel.ep_size={ep} but the model has no experts (num_experts={experts})")
        if problems:
            raise ParallelConfigError("; ".join(problems))


def kv_heads_by_layer_type(text_config) -> dict[str, int]:
    """KV heads of each layer type ('sliding_attention', 'full_attention'), as the model builds them."""
    out: dict[str, int] = {}
    for i, layer_type in enumerate(text_config.layer_types):
        kv = text_config.per_layer_config[i].num_key_value_heads
        if out.setdefault(layer_type, kv) != kv:
            out[f"{layer_type} (layer {i})"] = kv
    return out


def kv_head_range(q_heads: int, kv_heads: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """[first, end) of the KV heads a tp rank keeps: its own 1/tp when they split evenly, else the
    one KV head its q heads read (replicated over the tp / kv_heads ranks that share it)."""
    if kv_heads % tp == 0:
        n = kv_heads // tp
        return tp_rank * n, (tp_rank + 1) * n
    group = q_heads // kv_heads  # q heads per KV head
    first_q = tp_rank * (q_heads // tp)
    return first_q // group, first_q // group + 1
