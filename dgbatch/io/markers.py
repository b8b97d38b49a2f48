"""Commit markers: what a committed shard's data file must look like, and the check that it still does.

    OUTPUT/_commits/<shard>.json
    {"shard": "f000000-b00-0000", "plan": "<plan id>",
     "file": {"size": <bytes>, "rows": <rows>, "sha256": "<hex>"},
     "filtered": {"size", "rows", "sha256"} | null,   # filtered/<shard>.parquet (output.drop_filtered)
     "stats": {<ShardStats>}}

The data file's own Parquet footer names the same shard and plan (schema metadata key `dgbatch`), so a
file whose marker was never written (a crash between the two) can still be recognised, and a file that
dgbatch did not write for this plan never is. A data file counts as committed only if its marker (or
footer) names its shard and the current plan, its size is the marker's, and its rows (with the rows
output.drop_filtered moved to filtered/) are the plan's. An eval's scoring rewrites a data file and
then its marker.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq

FOOTER_KEY = b"dgbatch"


@dataclass(frozen=True)
class DataFile:
    size: int
    rows: int
    sha256: str

    @staticmethod
    def of_bytes(data: bytes, rows: int) -> DataFile:
        return DataFile(len(data), rows, hashlib.sha256(data).hexdigest())


def marker(shard_id: str, plan_id: str, file: DataFile, stats: dict, filtered: DataFile | None = None) -> dict:
    return {"shard": shard_id, "plan": plan_id, "file": asdict(file),
            "filtered": asdict(filtered) if filtered is not None else None, "stats": stats}


def filtered_rows(m: dict) -> int:
    """Rows of the shard that output.drop_filtered moved to filtered/ (0 without)."""
    f = m.get("filtered") if isinstance(m, dict) else None
    return int(f.get("rows", 0)) if isinstance(f, dict) else 0


def footer_meta(table_or_schema) -> dict:
    """The `dgbatch` metadata of a data file's schema ({} if absent or unreadable)."""
    raw = (table_or_schema.metadata or {}).get(FOOTER_KEY)
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def read_committed(data: bytes) -> tuple[DataFile, object]:
    """(description, table) of a data file's bytes; raises (pyarrow errors) if they are not whole Parquet."""
    table = pq.read_table(io.BytesIO(data))
    return DataFile.of_bytes(data, table.num_rows), table


def problem(m: dict | None, shard_id: str, plan_id: str, rows: int, size: int, footer: dict | None = None,
            file_rows: int | None = None) -> str | None:
    """Why a listed data file of `size` bytes is not shard `shard_id` of plan `plan_id` with `rows` rows,
    judged by its marker `m` (or, without one, by its `footer` metadata and `file_rows`, which count the
    shard's filtered rows too); None if it is."""
    if m is not None:
        f = m.get("file") if isinstance(m, dict) else None
        if not isinstance(f, dict) or m.get("shard") != shard_id:
            return "its commit marker is not one dgbatch wrote for this shard"
        if m.get("plan") != plan_id:
            return "it was committed for another plan of this output"
        if f.get("size") != size:
            return f"it has {size} bytes, its commit marker says {f.get('size')} (truncated or replaced)"
        if f.get("rows") + filtered_rows(m) != rows:
            return f"its commit marker says {f.get('rows')} rows (+ {filtered_rows(m)} filtered), the plan {rows}"
        return None
    if footer is None:
        return "it has no commit marker and is not a readable Parquet file"
    if footer.get("shard") != shard_id or footer.get("plan") != plan_id:
        return "it has no commit marker and dgbatch did not write it for this shard of this plan"
    if file_rows != rows:
        return f"it holds {file_rows} rows, the plan's shard {rows}"
    return None
