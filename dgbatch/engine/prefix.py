"""Shared prompt encoding: a prefix that several rows' prompts share is encoded once.

DiffusionGemma's encoder is causal (and windowed on sliding layers; `use_bidirectional_attention`
other than "vision" is refused by the runner, and "vision" only joins an image's own tokens), so the
K/V of a prompt's first P tokens do not depend on the tokens after them. A `PrefixCache` keeps a few
such prefixes, each in a slot of a `SlotKVCache` of its own that holds exactly what a row's slot
holds once those P tokens are encoded (every position on full-attention layers, the last W - 1 in
the ring on sliding layers: the ring of position p is p % R in both caches). A row whose prompt
starts with an entry's tokens starts from a copy of it (`SlotKVCache.load_prefix`), and the
engine's encoder computes only the rest of its prompt, after that prefix, as it computes a commit.

Which prefixes: the longest one a row shares with its neighbour in the queue (the row admitted just
before it, or the one queued after it) or with an entry already kept: the whole prompt when the
prompts are identical (`sampling.num_samples`: a row's samples are adjacent in its shard) or when
one prompt is a prefix of the other, otherwise the common part rounded down to whole `block`s (a
few-shot block, a system prompt, a template: rows that share it but differ a few tokens later
still meet at the same block boundary). A new entry is built from the longest entry it extends, so
only its new tokens are encoded. Entries are evicted least recently used; they are needed only when
rows are admitted (a row's slot keeps its own copy), so a few suffice while rows that share come
together. Rows with images never share (an image's tokens may attend to each other both ways).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dgbatch.engine.cache import SlotKVCache
from dgbatch.engine.packing import pack

ENTRIES = 4  # prefixes kept per engine: what `memory.py` charges for them
BLOCK = 16  # a common prefix that is not a whole prompt is shared in whole blocks of this many tokens


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Entry:
    tokens: list[int]
    slot: int  # in the store
    base: _Entry | None = None  # the entry it was built from (its tokens are a prefix of these)
    ready: bool = False  # its K/V are in the store


class PrefixCache:
    """Up to `entries` shared prefixes for one engine's slot cache (`admit` is all the engine calls)."""

    def __init__(self, runner, entries: int = ENTRIES, block: int = BLOCK):
        self.runner = runner
        self.num_entries = entries
        self.block = block
        self.store: SlotKVCache | None = None
        self.entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # least recently used first
        self.encoded_tokens = 0  # prompt tokens encoded into entries
        self.built = 0  # entries built
        self.hits = 0  # rows that started from an entry

    def clear(self) -> None:
        """Forget every entry (after a failed step, or when the store is reallocated)."""
        self.entries.clear()

    def shareable(self, prompt: Sequence[int], other: Sequence[int] | None) -> int:
        """How much of `prompt` an entry shared with `other` would cover: all of it if it is a
        prefix of `other`, else the common prefix in whole blocks (0: not worth an entry)."""
        if other is None:
            return 0
        n = common_length(prompt, other)
        return n if n == len(prompt) else n // self.block * self.block

    def _fit(self, cache: SlotKVCache, longest_prompt: int) -> None:
        """A store laid out like `cache` (same ring) that holds prompts up to `longest_prompt` tokens."""
        want = min(cache.capacity, max(cache.ring, -(-longest_prompt // 64) * 64))
        s = self.store
        if s is not None and s.ring == cache.ring and s.canvas == cache.canvas and s.capacity >= want:
            return
        self.clear()
        self.store = self.runner.new_cache(self.num_entries, want)
        if self.store.ring != cache.ring:  # cannot happen: want >= the cache's ring, or equals its capacity
            raise AssertionError(f"prefix store ring {self.store.ring} != slot cache ring {cache.ring}")

    def _match(self, prompt: Sequence[int]) -> _Entry | None:
        """The longest entry whose tokens start `prompt`."""
        best = None
        for e in self.entries.values():
            k = len(e.tokens)
            if k <= len(prompt) and (best is None or k > len(best.tokens)) and prompt[:k] == e.tokens:
                best = e
        return best

    def _new(self, tokens: list[int], pinned: set[int]) -> _Entry | None:
        """A new (not yet built) entry for `tokens`, in a free store slot or the least recently used
        entry's that this admission does not use; None when there is none."""
        used = {e.slot for e in self.entries.values()}
        free = [s for s in range(self.num_entries) if s not in used]
        if not free:
            victim = next((k for k, e in self.entries.items() if e.slot not in pinned), None)
            if victim is None:
                return None
            free = [self.entries.pop(victim).slot]
        base = self._match(tokens)  # shorter than tokens: an entry of these tokens would have matched the row
        if base is not None:
            pinned.add(base.slot)  # read when this entry is built
        entry = _Entry(list(tokens), free[0], base)
        self.entries[tuple(tokens)] = entry
        return entry

    def admit(self, cache: SlotKVCache, slots: Sequence[int], prompts: Sequence[Sequence[int] | None],
              neighbours: Sequence[tuple[Sequence[int] | None, Sequence[int] | None]],
              longest_prompt: int) -> list[int]:
        """Rows just put in `slots` with `prompts` (None: a row that must not share, e.g. one with
        images), and for each the prompts queued just before and after it (None: none, or not to
        share with): build the entries they share, load each row's longest entry into its slot
        (its committed length becomes that entry's). Returns each row's loaded length (0: none)."""
        if not any(p is not None for p in prompts):
            return [0] * len(slots)
        self._fit(cache, longest_prompt)
        pinned: set[int] = set()
        use: list[_Entry | None] = []
        for prompt, (prev, nxt) in zip(prompts, neighbours):
            if prompt is None or len(prompt) > self.store.capacity:
                use.append(None)
                continue
            hit = self._match(prompt)
            if hit is not None:
                pinned.add(hit.slot)  # not evicted for a longer entry: it is what that one extends
            share = max(self.shareable(prompt, prev), self.shareable(prompt, nxt))
            if share > (len(hit.tokens) if hit is not None else 0):
                hit = self._new(list(prompt[:share]), pinned) or hit
            if hit is not None:
                pinned.add(hit.slot)
                self.entries.move_to_end(tuple(hit.tokens))
            use.append(hit)
        self._build([e for e in self.entries.values() if not e.ready])
        rows = [(s, e) for s, e in zip(slots, use) if e is not None]
        if rows:
            dev = cache.lengths.device
            lengths = [len(e.tokens) for _, e in rows]
            cache.load_prefix(self.store, torch.tensor([e.slot for _, e in rows], device=dev),
                              torch.tensor([s for s, _ in rows], device=dev), torch.tensor(lengths, device=dev),
                              max(lengths))
            self.hits += len(rows)
        return [0 if e is None else len(e.tokens) for e in use]

    def _build(self, todo: list[_Entry]) -> None:
        """Encode new entries into the store: each starts from a copy of its base (built first, in
        an earlier wave) and encodes only the tokens after it."""
        dev = self.store.lengths.device
        while todo:
            wave = [e for e in todo if e.base is None or e.base.ready]
            if not wave:  # cannot happen: bases are older entries
                raise AssertionError("prefix entries whose bases are never built")
            based = [e for e in wave if e.base is not None]
            if based:
                lengths = [len(e.base.tokens) for e in based]
                self.store.load_prefix(self.store, torch.tensor([e.base.slot for e in based], device=dev),
                                       torch.tensor([e.slot for e in based], device=dev),
                                       torch.tensor(lengths, device=dev), max(lengths))
            starts = [len(e.base.tokens) if e.base is not None else 0 for e in wave]
            batch = pack(self.store, [e.slot for e in wave], [e.tokens[k:] for e, k in zip(wave, starts)], starts,
                         lambda ls: -(-max(max(ls), 1) // 64) * 64)  # an entry is longer than its base
            self.runner.encode(self.store, batch)
            self.encoded_tokens += batch.num_tokens
            for e in wave:
                e.ready = True
                e.base = None
            todo = [e for e in todo if not e.ready]
