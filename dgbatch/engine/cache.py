"""Per-slot KV storage: a reserved region for the current canvas, then the committed prefix.

Every layer owns one K and one V tensor of shape [slots, kv_heads, C + P, head_dim]:

    [ canvas region (C entries)          | prefix store (P entries)                             ]
      the K/V of the canvas being          full-attention layer: position p at C + p,
      denoised, rewritten in place           P = the slot capacity (prompt + committed canvases)
      at every decoder step                sliding layer: a ring of the last R = W - 1 committed
                                             tokens, position p at C + p % R

The decoder writes the canvas's K/V into the canvas region and attends over the row, so a
denoising step neither concatenates nor copies the cache (transformers' `append_to_cache` copies the
whole [B, H, max_len + C, D] tensor per layer per step under a static cache). With the canvas
first, attending to only the first `C + L` entries (L >= every row's length) is a view, not a copy.

Sliding layers keep W - 1 committed tokens because that is what transformers' `DynamicSlidingWindowLayer`
keeps, hence what its decoder sees; the encoder's window for a new token, (p - W, p], fits in it too.

Each slot has its own length (committed tokens); positions start at 0 at the first prompt token, so
there is no left padding anywhere (RoPE is relative, so this matches transformers' shared offsets).
Which ring entry holds which position is a function of the length alone (`ring_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerSpec:
    sliding: bool
    kv_heads: int
    head_dim: int


def layer_specs(model) -> list[LayerSpec]:
    """One spec per decoder layer, read from the model's own attention modules."""
    specs = []
    for layer in model.model.decoder.layers:
        attn = layer.self_attn
        specs.append(LayerSpec(attn.is_sliding, attn.k_proj.out_features // attn.head_dim, attn.head_dim))
    return specs


def ring_positions(lengths: torch.Tensor, ring: int) -> torch.Tensor:
    """Position held by each ring entry after `lengths` committed tokens; negative means empty.

    lengths: [N] int64 -> [N, ring] int64. Entry j holds the latest position p < length with p % ring == j.
    """
    j = torch.arange(ring, device=lengths.device, dtype=torch.int64)
    last = lengths[:, None] - 1  # [N, 1]
    return last - torch.remainder(last - j[None, :], ring)


class SlotKVCache:
    """KV for `num_slots` rows, every layer, with static shapes (allocated once, written in place)."""

    def __init__(
        self,
        specs: list[LayerSpec],
        num_slots: int,
        capacity: int,
        sliding_window: int,
        canvas: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.specs = specs
        self.num_slots = num_slots
        self.capacity = capacity  # committed tokens a slot can hold (prompt + committed canvases)
        self.window = sliding_window
        self.ring = max(1, min(sliding_window - 1, capacity))  # entries a sliding layer keeps
        self.canvas = canvas
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for s in specs:
            shape = (num_slots, s.kv_heads, canvas + (self.ring if s.sliding else capacity), s.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))
        self.lengths = torch.zeros(num_slots, dtype=torch.int64, device=device)  # [S] committed tokens

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def _prefix_len(self, sliding: bool, max_len: int | None) -> int:
        """Prefix entries a pass reads: the ring, or the first `max_len` (default: all) positions."""
        if sliding:
            return self.ring
        return self.capacity if max_len is None else min(max_len, self.capacity)

    def prefix_size(self, layer: int, max_len: int | None = None) -> int:
        return self._prefix_len(self.specs[layer].sliding, max_len)

    def _prefix_positions(self, lengths: torch.Tensor, sliding: bool, max_len: int | None) -> torch.Tensor:
        """Position of each prefix entry read (negative: empty): [N, prefix]."""
        if sliding:
            return ring_positions(lengths, self.ring)
        j = torch.arange(self._prefix_len(False, max_len), device=lengths.device)
        return torch.where(j[None, :] < lengths[:, None], j[None, :], -1)

    # ---- decoder: the canvas region ---------------------------------------------------------------

    def write_canvas(self, layer: int, n: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put the current canvases' K/V [n, H, C, D] into the reserved region of slots [0, n)."""
        self.keys[layer][:n, :, : self.canvas] = k
        self.values[layer][:n, :, : self.canvas] = v

    def decoder_kv(self, layer: int, n: int, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [n, H, C + prefix, D] of slots [0, n): the canvas region and the prefix read."""
        end = self.canvas + self.prefix_size(layer, max_len)
        return self.keys[layer][:n, :, :end], self.values[layer][:n, :, :end]

    def decoder_mask(self, lengths: torch.Tensor, sliding: bool, max_len: int | None = None) -> torch.Tensor:
        """The canvas attends bidirectionally to itself and the row's committed prefix.

        lengths: [n] -> [n, 1, 1, C + prefix] bool (True = attend; one row for every canvas query).
        """
        prefix = self._prefix_positions(lengths, sliding, max_len) >= 0
        canvas = torch.ones(lengths.shape[0], self.canvas, dtype=torch.bool, device=lengths.device)
        return torch.cat([canvas, prefix], dim=1)[:, None, None, :]

    # ---- encoder: new tokens after each row's prefix -------------------------------------------

    def encoder_kv(
        self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values for new tokens [N, H, T, D] of `rows`: the rows' prefix (a gather, once per
        encoder pass, never per denoising step) followed by the new tokens: [N, H, prefix + T, D]."""
        end = self.canvas + self.prefix_size(layer, max_len)
        return (
            torch.cat([self.keys[layer][rows, :, self.canvas : end], k], dim=2),
            torch.cat([self.values[layer][rows, :, self.canvas : end], v], dim=2),
        )

    def encoder_mask(self, lengths: torch.Tensor, t: int, sliding: bool, max_len: int | None = None) -> torch.Tensor:
        """New token i of a row sits at position lengths + i and attends causally (within the window
        on sliding layers) to the prefix and the new tokens. lengths: [N] -> [N, 1, T, prefix + T] bool."""
        i = torch.arange(t, device=lengths.device)
        q_pos = lengths[:, None] + i[None, :]  # [N, T]
        k_pos = torch.cat([self._prefix_positions(lengths, sliding, max_len), q_pos], dim=1)  # [N, prefix + T]
        ok = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])  # [N, T, prefix + T]
        if sliding:
            ok &= k_pos[:, None, :] > q_pos[:, :, None] - self.window
        return ok[:, None]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch) -> None:
        """Store an encoder pass's new K/V (packed [T, H, D]) where `batch` (an `EncoderBatch`) says:
        every token on full-attention layers; on sliding layers only the tokens that stay in the
        ring (each row's last R), so no entry is written twice. Call `commit_lengths` once per pass."""
        for store, x in ((self.keys[layer], k), (self.values[layer], v)):
            if self.specs[layer].sliding:
                store[batch.ring_slots, :, batch.ring_entries] = x[batch.ring_tokens]
            else:
                store[batch.full_slots, :, batch.full_entries] = x

    def commit_lengths(self, batch) -> None:
        self.lengths[batch.rows] = batch.lengths_after

    def load_prefix(self, src: SlotKVCache, src_slots: torch.Tensor, dst_slots: torch.Tensor,
                    lengths: torch.Tensor, span: int) -> None:
        """Slots `dst_slots` [N] start from the first `lengths` [N] committed tokens of `src`'s slots
        `src_slots` [N] (a `PrefixCache` entry, which holds exactly those): what encoding those tokens
        into `dst_slots` would have stored. `span` >= every length; entries past a row's length are
        masked by it. `src` must lay positions out like this cache (same canvas, same ring)."""
        if (src.canvas, src.ring, src.specs) != (self.canvas, self.ring, self.specs):
            raise ValueError("a prefix can only be loaded from a cache with the same layout (canvas, ring, layers)")
        c = self.canvas
        for layer, spec in enumerate(self.specs):
            end = c + (self.ring if spec.sliding else span)
            for dst, s in ((self.keys[layer], src.keys[layer]), (self.values[layer], src.values[layer])):
                dst[dst_slots, :, c:end] = s[src_slots, :, c:end]
        self.lengths[dst_slots] = lengths

    def move(self, src: int, dst: int) -> None:
        """Copy one slot's KV and length to another slot (compaction; not per step)."""
        for t in self.keys + self.values:
            t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]
