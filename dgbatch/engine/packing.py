"""The layout of one encoder pass, built on the host: new tokens packed without padding.

The encoder's per-token work (norms, projections, MLP, experts) runs on the new tokens of every row
in the pass laid end to end, so it computes no padding. Only attention needs rows: tokens are
grouped by length (padded width at most `max_padding` x the real tokens of a group) and each group
is padded for its SDPA call. Everything the pass needs on the device (token ids, positions, where
each token's K/V goes in the slot cache) is built here from lengths the host already knows and
moved in one copy, so an encoder pass asks the device nothing (no `nonzero`, no host sync).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class AttentionGroup:
    """Rows whose new tokens share one padded SDPA call; tokens [start, end) of the pass."""

    rows: torch.Tensor  # [G] slots
    lengths: torch.Tensor  # [G] committed tokens before this pass
    start: int
    end: int
    width: int  # padded new tokens per row
    index: torch.Tensor | None  # [end - start] each token's place in the [G * width] padded layout; None: no padding
    max_len: int | None  # bound on `lengths` for the prefix read (None: the whole capacity)

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """Packed [end - start, H, D] -> [G, H, width, D] (padding is zeros)."""
        g = self.rows.shape[0]
        if self.index is None:
            return x.view(g, self.width, *x.shape[1:]).transpose(1, 2)
        out = x.new_zeros((g * self.width, *x.shape[1:]))
        out[self.index] = x
        return out.view(g, self.width, *x.shape[1:]).transpose(1, 2)

    def to_packed(self, y: torch.Tensor) -> torch.Tensor:
        """SDPA output [G, H, width, D] -> [end - start, H * D], real tokens only."""
        flat = y.transpose(1, 2).reshape(y.shape[0] * self.width, -1)
        return flat if self.index is None else flat[self.index]


@dataclass
class EncoderBatch:
    """New tokens of some rows (a prompt, or a finished canvas to commit), after their committed prefix."""

    ids: torch.Tensor  # [T] token ids, grouped by `groups`
    positions: torch.Tensor  # [T] absolute positions
    groups: list[AttentionGroup]
    rows: torch.Tensor  # [N] every slot in the pass
    lengths_after: torch.Tensor  # [N] committed tokens once the pass is done
    full_slots: torch.Tensor  # [T] full-attention layers: token t's K/V go to slot full_slots[t] ...
    full_entries: torch.Tensor  # [T] ... at cache entry full_entries[t]
    ring_tokens: torch.Tensor  # [M] sliding layers: the tokens that survive in the ring (a row's last R) ...
    ring_slots: torch.Tensor  # [M] ... go to this slot ...
    ring_entries: torch.Tensor  # [M] ... at this ring entry

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]


def group_by_length(lengths: Sequence[int], max_padding: float, max_tokens: int) -> list[list[int]]:
    """Indices grouped in ascending length: a group's padded size stays within `max_padding` x its
    real tokens and within `max_tokens` (a longer single row forms a group alone)."""
    groups: list[list[int]] = []
    chunk: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        t = lengths[i]  # ascending: t is the padded width if i joins
        padded = t * (len(chunk) + 1)
        if chunk and (padded > max_padding * (real + t) or padded > max_tokens):
            groups.append(chunk)
            chunk, real = [], 0
        chunk.append(i)
        real += t
    if chunk:
        groups.append(chunk)
    return groups


def pack(
    cache,
    slots: Sequence[int],
    tokens: Sequence[Sequence[int]],
    lengths: Sequence[int],
    bound: Callable[[Sequence[int]], int | None] = lambda lengths: None,
    *,
    max_padding: float = 1.5,
    max_tokens: int = 1 << 30,
) -> EncoderBatch:
    """Lay out one encoder pass: row i appends `tokens[i]` to slot `slots[i]` after `lengths[i]`
    committed tokens. `bound(lengths)` gives a group's prefix-read bound (see `SlotKVCache`)."""
    c, ring = cache.canvas, cache.ring
    ids: list[int] = []
    pos: list[int] = []
    full_slots: list[int] = []
    full_entries: list[int] = []
    ring_tokens: list[int] = []
    ring_slots: list[int] = []
    ring_entries: list[int] = []
    pad_index: list[int] = []
    meta = []  # per group: (rows, start, end, width, padded?, max_len)
    order: list[int] = []
    for members in group_by_length([len(t) for t in tokens], max_padding, max_tokens):
        width = max(len(tokens[i]) for i in members)
        start = len(ids)
        for j, i in enumerate(members):
            s, n, new = slots[i], lengths[i], tokens[i]
            first = len(ids)
            ids.extend(new)
            pos.extend(range(n, n + len(new)))
            full_slots.extend([s] * len(new))
            full_entries.extend(range(c + n, c + n + len(new)))
            keep = max(0, len(new) - ring)  # earlier new tokens are overwritten within this pass
            ring_tokens.extend(range(first + keep, first + len(new)))
            ring_slots.extend([s] * (len(new) - keep))
            ring_entries.extend(c + p % ring for p in range(n + keep, n + len(new)))
            pad_index.extend(range(j * width, j * width + len(new)))
        padded = any(len(tokens[i]) != width for i in members)
        meta.append((members, start, len(ids), width, padded, bound([lengths[i] for i in members])))
        order.extend(members)

    # one host -> device copy for every index of the pass
    parts = [ids, pos, [slots[i] for i in order], [lengths[i] for i in order],
             [lengths[i] + len(tokens[i]) for i in order], full_slots, full_entries,
             ring_tokens, ring_slots, ring_entries, pad_index]
    flat = torch.tensor([x for p in parts for x in p], dtype=torch.int64)
    (ids_t, pos_t, rows_t, before_t, after_t, fs_t, fe_t, rt_t, rs_t, re_t, pad_t) = flat.to(
        cache.lengths.device, non_blocking=True).split([len(p) for p in parts])

    groups, r0 = [], 0
    for members, start, end, width, padded, max_len in meta:
        r1 = r0 + len(members)
        groups.append(AttentionGroup(rows_t[r0:r1], before_t[r0:r1], start, end, width,
                                     pad_t[start:end] if padded else None, max_len))
        r0 = r1
    return EncoderBatch(ids_t, pos_t, groups, rows_t, after_t, fs_t, fe_t, rt_t, rs_t, re_t)
