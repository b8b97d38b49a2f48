"""Which shards of a plan are committed: checked, never assumed from a file's name.

One listing of `data/` (names and sizes) and one batched read of the commit markers decide it
(`io/markers.py` says what a marker holds); a data file without a marker is judged by its own footer,
and its marker rebuilt. A data file that fails the check (truncated, replaced, from another plan, or
not dgbatch's) is moved to `OUTPUT/_rejected/` (nothing is deleted) and its shard runs again; a marker
whose data file is gone is removed. The driver calls this before it schedules (resume) and before it
writes `_SUCCESS`, so a job is complete only when every data file checks out.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dgbatch.io import markers
from dgbatch.io.commit import list_names, write_json
from dgbatch.io.layout import Layout

log = logging.getLogger(__name__)


CHUNK = 1024  # markers read and checked at a time: memory stays O(chunk), not O(shards)


@dataclass
class Committed:
    shards: set[str] = field(default_factory=set)  # ids of the shards whose data files check out
    rejected: dict[str, str] = field(default_factory=dict)  # data file name -> why it was moved aside


def _listing(fs, directory: str) -> dict[str, int]:
    """{base name: size} of the visible files directly under `directory` (one listing)."""
    fs.invalidate_cache(directory)
    try:
        entries = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file" and not name.startswith("."):
            out[name] = int(e.get("size") or 0)
    return out


def _read_markers(fs, layout: Layout, shard_ids: list[str], names: set[str]) -> dict[str, dict]:
    """The markers of `shard_ids` among `names` (the listing of _commits/), in one batched read."""
    paths = {layout.commit(s): s for s in shard_ids if f"{s}.json" in names}
    blobs = fs.cat(list(paths), on_error="omit") if paths else {}  # one batched (concurrent on S3) read
    by_path = {fs._strip_protocol(p): b for p, b in blobs.items()}
    out = {}
    for path, sid in paths.items():
        blob = by_path.get(fs._strip_protocol(path))
        try:
            value = json.loads(blob) if blob is not None else None
        except ValueError:
            value = None
        out[sid] = value if isinstance(value, dict) else {}
    return out


def _from_footer(fs, layout: Layout, sid: str, plan_id: str, rows: int, size: int) -> tuple[dict | None, str | None]:
    """(rebuilt marker, None) for a data file without a marker that is this shard's, else (None, why not).
    The shard's filtered/ file (output.drop_filtered), if any, is counted and described with it."""
    import pyarrow as pa

    from dgbatch.shard import stats_of

    try:
        file, table = markers.read_committed(fs.cat_file(layout.data(sid)))
        filtered, tables = None, [table]
        if fs.exists(layout.filtered(sid)):
            filtered, ftable = markers.read_committed(fs.cat_file(layout.filtered(sid)))
            tables.append(ftable)
    except Exception:  # noqa: BLE001 - unreadable is the verdict, whatever pyarrow raises
        return None, markers.problem(None, sid, plan_id, rows, size)
    whole = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else table
    why = markers.problem(None, sid, plan_id, rows, size, markers.footer_meta(table.schema), whole.num_rows)
    if why is not None:
        return None, why
    try:
        stats = stats_of(whole).to_dict()
    except Exception:  # noqa: BLE001
        return None, "it lacks dgbatch's output columns"
    return markers.marker(sid, plan_id, file, stats, filtered), None


def record_rewrite(fs, layout: Layout, sid: str, path: str, data: bytes, rows: int) -> None:
    """A committed file of shard `sid` (its data file, or its filtered/ file) was replaced in place with
    `data` (an eval adds its scores): its marker now describes the new bytes. A crash in between leaves a
    marker that no longer matches, so the shard is checked from scratch (and run again) on the next run."""
    from dataclasses import asdict

    from dgbatch.io.commit import read_json

    m = read_json(fs, layout.commit(sid))
    if isinstance(m, dict) and isinstance(m.get("file"), dict):
        m["filtered" if path == layout.filtered(sid) else "file"] = asdict(markers.DataFile.of_bytes(data, rows))
        write_json(fs, layout.commit(sid), m)


def _reject(fs, layout: Layout, name: str, why: str) -> None:
    """Move data/<name> to _rejected/<name>.<UTC time>.rejected (out of every reader's `*.parquet` glob),
    with the reason beside it in <same>.json."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = layout.rejected(f"{name}.{stamp}.rejected")
    fs.makedirs(layout.rejected(), exist_ok=True)
    fs.mv(layout.data(name), dest)
    write_json(fs, dest + ".json", {"file": f"data/{name}", "moved_to": dest.rsplit("/", 1)[-1], "reason": why,
                                    "at": stamp})


def rejections(fs, layout: Layout) -> list[dict]:
    """Every data file ever moved aside from this output, with why (from _rejected/*.json)."""
    paths = [layout.rejected(n) for n in list_names(fs, layout.rejected(), ".json")]
    blobs = fs.cat(paths, on_error="omit") if paths else {}
    out = []
    for blob in blobs.values():
        try:
            out.append(json.loads(blob))
        except ValueError:
            continue
    return sorted(out, key=lambda r: (str(r.get("at")), str(r.get("file"))))


def verify(fs, layout: Layout, plan_id: str, shard_rows: dict[str, int], repair: bool = True,
           visit: Callable[[str, dict], None] | None = None) -> Committed:
    """The committed shards of the plan `plan_id` ({shard id: rows}); `visit(shard, marker)` is called for
    each. With `repair`, failing data files are moved aside, stale markers removed and missing ones
    rebuilt (a storage that refuses a repair is logged: the verdict stands either way)."""
    listed = _listing(fs, layout.data())
    marker_names = set(list_names(fs, layout.commit(), ".json"))
    fix = _Repairs(repair)
    out = Committed()
    ids = list(shard_rows)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        have_marker = _read_markers(fs, layout, chunk, marker_names)
        for sid in chunk:
            _check_one(fs, layout, plan_id, sid, shard_rows[sid], listed, have_marker.get(sid), fix, out, visit)
    planned = {f"{sid}.parquet" for sid in shard_rows}
    for name in sorted(set(listed) - planned):
        out.rejected[name] = "it is not a shard of this job's plan"
        fix(_reject, fs, layout, name, out.rejected[name])
    for name, why in out.rejected.items():
        log.warning("data/%s is not trusted (%s)%s", name, why, "; moved to _rejected/" if repair else "")
    return out


def _check_one(fs, layout: Layout, plan_id: str, sid: str, rows: int, listed: dict[str, int], stored: dict | None,
               fix, out: Committed, visit) -> None:
    if f"{sid}.parquet" not in listed:
        if stored is not None:  # its data file is gone: the shard is not committed
            fix(fs.rm, layout.commit(sid))
        return
    size = listed[f"{sid}.parquet"]
    if stored is not None and isinstance(stored.get("file"), dict):
        m, why = stored, markers.problem(stored, sid, plan_id, rows, size)
    else:  # no marker (a crash between data and marker), or one unreadable or of an older format
        m, why = _from_footer(fs, layout, sid, plan_id, rows, size)
    if why is None:
        if stored is not m:
            fix(write_json, fs, layout.commit(sid), m)
        out.shards.add(sid)
        if visit is not None:
            visit(sid, m)
        return
    out.rejected[f"{sid}.parquet"] = why
    fix(_reject, fs, layout, f"{sid}.parquet", why)
    if stored is not None:
        fix(fs.rm, layout.commit(sid))


class _Repairs:
    """Run repair steps unless repair is off; a storage error is logged once, not raised."""

    def __init__(self, enabled: bool):
        self.enabled, self.failed = enabled, False

    def __call__(self, fn, *args) -> None:
        if not self.enabled:
            return
        try:
            fn(*args)
        except OSError as e:
            if not self.failed:
                log.error("could not repair the output's commit records (%s); they are rechecked on the next run",
                          e.strerror or e)
            self.failed = True
