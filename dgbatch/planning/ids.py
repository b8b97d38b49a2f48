"""Row ids (`input.id_column`) are set and unique: a null, empty or repeated id is a job-level error.

Checked over millions of rows without gathering them in one process: each planning task checks its
own fragment (nulls, empty ids, repeats within it) and hashes its ids into 16-byte digests, split into
`num_parts(rows)` partitions by digest; one task per partition then looks for a digest that two
fragments share. The driver holds object refs and the few duplicates found, never the ids. Default
ids (FILE:ROW) are unique by construction and skip all of this.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from dgbatch.planning.source import InputError

RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("fragment", "<u4"), ("row", "<u4")])  # 24 bytes per row
ROWS_PER_PART = 1 << 22  # ~100 MB of records per check task
MAX_ID_CHARS = 4096


def num_parts(total_rows: int) -> int:
    return max(1, math.ceil(total_rows / ROWS_PER_PART))


def checked_ids(values: Sequence, label: str, row_start: int, column: str) -> list[str]:
    """A fragment's ids as strings; InputError naming the row on a null, empty, huge or repeated id."""
    ids: list[str] = []
    first_row: dict[str, int] = {}
    for i, v in enumerate(values):
        where = f"input file {label!r} row {row_start + i}"
        if v is None:
            raise InputError(f"{where}: input.id_column {column!r} is null; every row needs an id (or unset "
                             f"input.id_column to use FILE:ROW ids)")
        s = str(v)
        if not s:
            raise InputError(f"{where}: input.id_column {column!r} is an empty string; every row needs an id")
        if len(s) > MAX_ID_CHARS:
            raise InputError(f"{where}: input.id_column {column!r} is {len(s)} characters long; at most "
                             f"{MAX_ID_CHARS}")
        if s in first_row:
            raise InputError(f"input.id_column {column!r} has duplicate values: {s[:80]!r} at {label!r} rows "
                             f"{row_start + first_row[s]} and {row_start + i}; ids must be unique")
        first_row[s] = i
        ids.append(s)
    return ids


def digest_parts(ids: Sequence[str], fragment: int, parts: int) -> list[np.ndarray]:
    """The fragment's id digests as RECORD arrays, one per partition (by digest)."""
    raw = b"".join(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=16).digest() for s in ids)
    words = np.frombuffer(raw, dtype="<u8").reshape(-1, 2) if ids else np.zeros((0, 2), "<u8")
    rec = np.empty(len(ids), RECORD)
    rec["hi"], rec["lo"] = words[:, 0], words[:, 1]
    rec["fragment"], rec["row"] = fragment, np.arange(len(ids), dtype="<u4")
    which = rec["hi"] % parts
    return [rec[which == p] for p in range(parts)]


def duplicates(*chunks: np.ndarray, limit: int = 3) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Up to `limit` pairs of (fragment, row) whose ids hash alike, from one partition's chunks."""
    rec = np.concatenate(chunks) if chunks else np.empty(0, RECORD)
    if len(rec) < 2:
        return []
    rec = rec[np.lexsort((rec["lo"], rec["hi"]))]
    same = np.flatnonzero((rec["hi"][1:] == rec["hi"][:-1]) & (rec["lo"][1:] == rec["lo"][:-1]))[:limit]
    return [((int(rec["fragment"][i]), int(rec["row"][i])), (int(rec["fragment"][i + 1]), int(rec["row"][i + 1])))
            for i in same]
