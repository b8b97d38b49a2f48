"""The layout of one encoder pass, built on the host: new tokens packed without padding.

The encoder's per-token work (norms, projections, MLP, experts) runs on the new tokens of every row
in the pass laid end to end, so it computes no padding. Only attention needs rows: tokens are
grouped by length (padded width at most `max_padding` x the real tokens of a group) and each group
is padded for its SDPA call. Everything the pass needs on the device (token ids, positions, where
each token's K/V goes in the slot cache) is built here from lengths the host already knows and
moved in one copy, so an encoder pass asks the device nothing (no `nonzero`, no host sync).

A prompt with images (`VisionInputs`) carries its pixels along: the pass runs the vision tower on
them and puts the soft tokens in place of the image tokens (`ImageBatch`), and an image's tokens
attend to each other both ways (`AttentionGroup.blocks`), as transformers' encoder does for
`use_bidirectional_attention="vision"`.
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
    blocks: torch.Tensor | None = None  # [G, width] image of each padded token (-1: text); None: no images

    def image_mask(self) -> torch.Tensor | None:
        """[G, 1, width, width] bool: new tokens of one image see each other (None: no images here)."""
        if self.blocks is None:
            return None
        b = self.blocks
        return ((b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0))[:, None]

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
class ImageBatch:
    """The images of a pass's prompts, in the order their soft tokens appear in the packed tokens."""

    pixel_values: torch.Tensor  # [N, max_patches, 3 * patch**2]
    position_ids: torch.Tensor  # [N, max_patches, 2]
    token_index: torch.Tensor  # [sum of soft tokens] where each soft token sits in the pass's packed tokens


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
    images: ImageBatch | None = None  # the prompts' images, if any

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
    vision: Sequence | None = None,
    image_id: int | None = None,
) -> EncoderBatch:
    """Lay out one encoder pass: row i appends `tokens[i]` to slot `slots[i]` after `lengths[i]`
    committed tokens. `bound(lengths)` gives a group's prefix-read bound (see `SlotKVCache`).
    vision[i]: row i's `VisionInputs` (or None), whose soft tokens are the runs of `image_id` in tokens[i]."""
    vision = vision if vision is not None and any(v is not None for v in vision) else None
    blocks_of = [image_blocks(t, v, image_id) if vision is not None and v is not None else None
                 for t, v in zip(tokens, vision or [None] * len(tokens))]
    c, ring = cache.canvas, cache.ring
    ids: list[int] = []
    pos: list[int] = []
    full_slots: list[int] = []
    full_entries: list[int] = []
    ring_tokens: list[int] = []
    ring_slots: list[int] = []
    ring_entries: list[int] = []
    pad_index: list[int] = []
    image_index: list[int] = []  # packed position of each soft token
    image_rows: list[int] = []  # rows with images, in packed order
    blocks: list[int] = []  # per group with images: [G * width] image ids of the padded layout
    meta = []  # per group: (rows, start, end, width, padded?, max_len, blocks offset or None)
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
            if blocks_of[i] is not None:
                image_index.extend(first + p for p, b in enumerate(blocks_of[i]) if b >= 0)
                image_rows.append(i)
        padded = any(len(tokens[i]) != width for i in members)
        offset = None
        if any(blocks_of[i] is not None for i in members):
            offset = len(blocks)
            for i in members:
                row = blocks_of[i] or [-1] * len(tokens[i])
                blocks.extend(row + [-1] * (width - len(row)))
        meta.append((members, start, len(ids), width, padded, bound([lengths[i] for i in members]), offset))
        order.extend(members)

    # one host -> device copy for every index of the pass
    parts = [ids, pos, [slots[i] for i in order], [lengths[i] for i in order],
             [lengths[i] + len(tokens[i]) for i in order], full_slots, full_entries,
             ring_tokens, ring_slots, ring_entries, pad_index, image_index, blocks]
    dev = cache.lengths.device
    flat = torch.tensor([x for p in parts for x in p], dtype=torch.int64)
    (ids_t, pos_t, rows_t, before_t, after_t, fs_t, fe_t, rt_t, rs_t, re_t, pad_t, img_t, blk_t) = flat.to(
        dev, non_blocking=True).split([len(p) for p in parts])

    groups, r0 = [], 0
    for members, start, end, width, padded, max_len, offset in meta:
        r1 = r0 + len(members)
        blk = None if offset is None else blk_t[offset : offset + len(members) * width].view(len(members), width)
        groups.append(AttentionGroup(rows_t[r0:r1], before_t[r0:r1], start, end, width,
                                     pad_t[start:end] if padded else None, max_len, blk))
        r0 = r1
    images = None
    if image_rows:
        images = ImageBatch(torch.cat([vision[i].pixel_values for i in image_rows]).to(dev, non_blocking=True),
                            torch.cat([vision[i].position_ids for i in image_rows]).to(dev, non_blocking=True), img_t)
    return EncoderBatch(ids_t, pos_t, groups, rows_t, after_t, fs_t, fe_t, rt_t, rs_t, re_t, images)


def image_blocks(tokens: Sequence[int], vision, image_id: int | None) -> list[int]:
    """Per token of a prompt, which of its images it is a soft token of (0, 1, ...), -1 for text; checks that
    the prompt's runs of image tokens match `vision`'s images one to one."""
    out, runs, prev = [], [], False
    for t in tokens:
        is_image = t == image_id
        if is_image and not prev:
            runs.append(0)
        if is_image:
            runs[-1] += 1
        out.append(len(runs) - 1 if is_image else -1)
        prev = is_image
    if tuple(runs) != tuple(vision.soft_tokens):
        raise ValueError(f"the prompt's image token runs {runs} do not match its images' soft tokens "
                         f"{list(vision.soft_tokens)}")
    return out
