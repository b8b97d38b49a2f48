"""The host-side layout of an encoder pass (`dgbatch.engine.packing`)."""

from __future__ import annotations

import torch

from dgbatch.engine.cache import LayerSpec, SlotKVCache
from dgbatch.engine.packing import group_by_length, pack


def _cache(window: int = 12, capacity: int = 128) -> SlotKVCache:
    specs = [LayerSpec(sliding=True, kv_heads=1, head_dim=4), LayerSpec(sliding=False, kv_heads=1, head_dim=4)]
    return SlotKVCache(specs, num_slots=8, capacity=capacity, sliding_window=window, canvas=16,
                       dtype=torch.float32, device="cpu")


def test_groups_bound_padding_and_size():
    lengths = [16, 16, 16, 25, 31, 54, 3, 16, 40]
    groups = group_by_length(lengths, max_padding=1.5, max_tokens=64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        real, padded = sum(lengths[i] for i in g), max(lengths[i] for i in g) * len(g)
        assert padded <= 1.5 * real or len(g) == 1
        assert padded <= 64 or len(g) == 1


def test_a_pass_packs_tokens_and_targets_each_cache_entry_once():
    cache = _cache(window=12)  # ring of 11 entries
    slots, lengths = [5, 2, 7], [0, 30, 16]
    tokens = [list(range(3, 43)), list(range(50, 66)), list(range(70, 86))]  # a 40-token prompt, two commits
    b = pack(cache, slots, tokens, lengths)
    assert b.num_tokens == 72  # no padding in the packed layout
    assert sorted(b.ids.tolist()) == sorted(t for ts in tokens for t in ts)
    # full-attention layers: every token lands at canvas + its position, in its own slot
    targets = list(zip(b.full_slots.tolist(), b.full_entries.tolist()))
    assert len(set(targets)) == 72
    assert (5, 16 + 39) in targets and (2, 16 + 30) in targets and (7, 16 + 31) in targets
    # sliding layers: only each row's last 11 tokens survive, each to a distinct ring entry
    ring = list(zip(b.ring_slots.tolist(), b.ring_entries.tolist()))
    assert len(ring) == 3 * 11 and len(set(ring)) == len(ring)
    assert all(16 <= e < 16 + 11 for _, e in ring)
    kept = [b.positions[t].item() for t, s in zip(b.ring_tokens.tolist(), b.ring_slots.tolist()) if s == 5]
    assert sorted(kept) == list(range(29, 40))
    assert dict(zip(b.rows.tolist(), b.lengths_after.tolist())) == {5: 40, 2: 46, 7: 32}


def test_groups_round_trip_through_the_padded_layout():
    cache = _cache()
    tokens = [[3] * 5, [4] * 4, [5] * 16, [6] * 16]  # two groups: the prompts (padded), the commits
    b = pack(cache, [0, 1, 2, 3], tokens, [0, 0, 16, 32])
    x = torch.arange(b.num_tokens * 2 * 3, dtype=torch.float32).view(b.num_tokens, 2, 3)
    for g in b.groups:
        padded = g.to_padded(x[g.start : g.end])  # [G, H, width, D]
        assert padded.shape == (g.rows.shape[0], 2, g.width, 3)
        assert torch.equal(g.to_packed(padded), x[g.start : g.end].reshape(g.end - g.start, -1))
    assert any(g.index is None for g in b.groups)  # the two commits need no padding
