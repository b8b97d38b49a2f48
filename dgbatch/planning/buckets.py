"""Length buckets: rows of similar prompt length share shards, so batches carry little padding."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence


def auto_edges(lengths: Sequence[int], num_buckets: int, multiple: int = 8) -> list[int]:
    """Upper edges that minimise padded prompt positions over a sample of lengths (the last bucket is open).

    Exact dynamic programme over the distinct lengths, rounded up to `multiple` (coarsened further if
    the sample has very many distinct lengths, to keep it to well under a second).
    """
    if not lengths:
        return []
    while len({-(-x // multiple) for x in lengths}) > 400:
        multiple *= 2
    counts = Counter(-(-x // multiple) * multiple for x in lengths)
    vals = sorted(counts)
    pre = [0]
    for v in vals:
        pre.append(pre[-1] + counts[v])
    n, k = len(vals), min(num_buckets, len(vals))
    inf = float("inf")
    # best[j]: least positions for vals[:j+1] in b buckets; cut[b][j]: where the last bucket starts.
    best = [vals[j] * pre[j + 1] for j in range(n)]
    cuts = [[0] * n]
    for _ in range(1, k):
        new, cut = [inf] * n, [0] * n
        for j in range(n):
            for i in range(1, j + 1):
                c = best[i - 1] + vals[j] * (pre[j + 1] - pre[i])
                if c < new[j]:
                    new[j], cut[j] = c, i
        best = new
        cuts.append(cut)
    edges, j = [], n - 1
    for b in range(k - 1, 0, -1):
        i = cuts[b][j]
        if i == 0:
            break
        edges.append(vals[i - 1])
        j = i - 1
    return sorted(edges)


def bucket_of(length: int, edges: Sequence[int]) -> int:
    """Index of the first bucket whose upper edge is >= length; len(edges) is the open last bucket."""
    return bisect.bisect_left(edges, length)


def padded_positions(lengths: Sequence[int], batch_size: int) -> int:
    """Prompt positions computed, padding included, when `lengths` are batched in this order."""
    return sum(max(lengths[s : s + batch_size]) * len(lengths[s : s + batch_size]) for s in range(0, len(lengths), batch_size))


def padding_fraction(lengths: Sequence[int], batch_size: int) -> float:
    """Fraction of computed prompt positions that are padding."""
    total = padded_positions(lengths, batch_size)
    return 1 - sum(lengths) / total if total else 0.0
