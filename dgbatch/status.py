"""`dgbatch status OUTPUT`: where a running or finished job stands, from its files alone.

Shards and rows come from the plan manifest and the committed data files; failures from the failure
records and the committed rows' `error` column; speed and ETA from `_progress.json` while a driver
writes one, else from the summary (a finished run) or the data files' commit times.
"""

from __future__ import annotations

import calendar
import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from dgbatch.config import StorageSection
from dgbatch.jobfiles import JobFiles, resolve
from dgbatch.progress import fmt_duration

MAX_REASONS = 8


@dataclass
class JobStatus:
    output: str
    state: str  # complete | running | stopped | incomplete | unknown | planning | empty
    note: str  # why we think so (the driver, the files)
    shards_total: int | None
    shards_done: int
    shards_in_flight: int | None
    rows_total: int | None
    rows_done: int
    row_errors: int
    output_tokens: int
    rows_per_s: float | None
    output_tokens_per_s: float | None
    rate_from: str
    eta_s: float | None
    last_commit_age_s: float | None
    failed_shards: list[dict] = field(default_factory=list)  # {shard, reason}
    error_reasons: list[dict] = field(default_factory=list)  # {reason, rows, example}: rows' errors, grouped
    started_at: str | None = None
    ended_at: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _unix(iso: str | None) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))) if iso else None
    except ValueError:
        return None


def reason_kind(reason: str) -> str:
    """A row error with its numbers taken out, so rows that failed the same way group together."""
    return re.sub(r"\d+", "N", reason.splitlines()[0])[:200]


def error_reasons(files: JobFiles) -> list[dict]:
    """Row errors grouped by kind, most common first, each with an example row id and message."""
    import pyarrow.parquet as pq

    stats = files.commit_stats
    kinds: Counter[str] = Counter()
    example: dict[str, tuple[str, str]] = {}
    for sid in files.committed:
        if sid in stats and not stats[sid].get("error_rows"):
            continue  # only the shards that hold error rows are read
        with files.fs.open(files.layout.data(sid), "rb") as fh:
            t = pq.read_table(fh, columns=["id", "error"])
        for rid, err in zip(t.column("id").to_pylist(), t.column("error").to_pylist()):
            if err is not None:
                k = reason_kind(err)
                kinds[k] += 1
                example.setdefault(k, (rid, err[:300]))
    return [{"reason": k, "rows": n, "example_id": example[k][0], "example": example[k][1]}
            for k, n in kinds.most_common(MAX_REASONS)]


def read_status(output: str, storage: StorageSection | None = None, now: float | None = None) -> JobStatus:
    now = now or time.time()
    files = JobFiles(output, storage)
    files.check()
    manifest, summary, progress = files.manifest, files.summary, files.progress
    rows_of = {s["shard_id"]: s["rows"] for s in files.shards}
    committed = files.committed
    stats = files.commit_stats
    done_rows = sum(stats.get(sid, {}).get("rows", rows_of.get(sid, 0)) for sid in committed)
    tokens = sum(stats.get(sid, {}).get("output_tokens", 0) for sid in committed)
    errors = sum(stats.get(sid, {}).get("error_rows", 0) for sid in committed)
    last_commit = max(committed.values()) if committed else None
    failed = files.failed or list((summary or {}).get("failed_shards", []))
    st = JobStatus(
        output=files.url, state="unknown", note="", shards_total=len(files.shards) if manifest else None,
        shards_done=len(committed), shards_in_flight=None, rows_total=manifest.get("num_rows") if manifest else None,
        rows_done=done_rows, row_errors=errors, output_tokens=tokens, rows_per_s=None, output_tokens_per_s=None,
        rate_from="", eta_s=None, last_commit_age_s=None if last_commit is None else round(now - last_commit, 1),
        failed_shards=failed, error_reasons=error_reasons(files),
        started_at=(summary or {}).get("started_at"), ended_at=(summary or {}).get("ended_at"),
    )  # fmt: skip

    alive = False
    if files.success is not None:
        st.state, st.note = "complete", f"every shard committed (_SUCCESS at {files.success.get('completed_at', '?')})"
    elif progress is not None and progress.state == "running":
        alive, why = progress.driver_alive(now)
        st.state, st.note = ("running" if alive else "stopped"), why
    elif progress is not None:  # the driver wrote its last word: finished, failed or interrupted
        st.state = "incomplete" if failed else "stopped"
        st.note = progress.driver_alive(now)[1] + (f"; {len(failed)} failed shard(s)" if failed else "")
    elif manifest is None:
        st.state = "planning" if files.job else "empty"
        st.note = "a job was started here but its plan is not written yet (planning, or it stopped before)"
    else:
        ended = _unix((summary or {}).get("ended_at"))
        if ended is not None and (last_commit is None or last_commit <= ended + 1):
            st.state = "incomplete" if failed else "stopped"
            st.note = f"the last run ended at {summary['ended_at']}" + (f" with {len(failed)} failed shard(s)"
                                                                         if failed else "")
        else:
            age = "" if last_commit is None else f"; last commit {now - last_commit:,.0f}s ago"
            st.note = f"no _progress.json, so whether a driver is still running is not known{age}"

    if progress is not None and alive:
        st.rows_done = max(st.rows_done, progress.rows_done)  # rows finished inside shards count too
        st.shards_in_flight = progress.shards_in_flight
        st.rows_per_s, st.output_tokens_per_s = progress.rows_per_s, progress.output_tokens_per_s
        st.eta_s, st.rate_from = progress.eta_s, "_progress.json"
    elif summary is not None and st.state != "unknown" and summary.get("throughput"):
        tp = summary["throughput"]
        st.rows_per_s, st.output_tokens_per_s = tp.get("rows_per_s"), tp.get("output_tokens_per_s")
        st.rate_from = "_summary.json (the last run, start-up included)"
    else:
        _rate_from_commits(st, files, stats, rows_of, _unix((summary or {}).get("ended_at")))
    if st.state in ("running", "unknown") and st.eta_s is None and st.rows_per_s and st.rows_total is not None:
        st.eta_s = round(max(st.rows_total - st.rows_done, 0) / st.rows_per_s, 1)
    return st


def _rate_from_commits(st: JobStatus, files: JobFiles, stats: dict, rows_of: dict, after: float | None) -> None:
    """Rows and tokens per second between this run's first and last commit (the first one's rows are
    left out: they were generated before it, over an unknown time)."""
    times = [(t, sid) for sid, t in files.committed.items() if after is None or t > after + 1]
    if len(times) < 2:
        return
    span = times[-1][0] - times[0][0]
    if span <= 0:
        return
    later = [sid for _, sid in times[1:]]
    st.rows_per_s = round(sum(stats.get(s, {}).get("rows", rows_of.get(s, 0)) for s in later) / span, 3)
    st.output_tokens_per_s = round(sum(stats.get(s, {}).get("output_tokens", 0) for s in later) / span, 3)
    st.rate_from = f"commit times of {len(times)} shards"


def format_status(st: JobStatus) -> str:
    pct = f" ({100 * st.rows_done / st.rows_total:.1f}%)" if st.rows_total else ""
    total = "?" if st.shards_total is None else f"{st.shards_total:,}"
    flight = "" if st.shards_in_flight is None else f", {st.shards_in_flight} in flight"
    speed = ("?" if st.rows_per_s is None else
             f"{st.rows_per_s:,.1f} rows/s, {st.output_tokens_per_s or 0:,.0f} output tok/s (from {st.rate_from})")
    lines = [
        f"job      {st.output}",
        f"state    {st.state}: {st.note}",
        f"shards   {st.shards_done:,}/{total} committed{flight}, {len(st.failed_shards)} failed",
        (f"rows     {st.rows_done:,}/{'?' if st.rows_total is None else f'{st.rows_total:,}'}{pct}, "
        f"{st.row_errors:,} error rows"),
        f"tokens   {st.output_tokens:,} output tokens",
        f"speed    {speed}",
    ]
    if st.state in ("running", "unknown"):
        lines.append(f"ETA      {fmt_duration(st.eta_s)}")
    if st.started_at:
        lines.append(f"last run {st.started_at} .. {st.ended_at or 'running'}")
    if st.last_commit_age_s is not None and st.state != "complete":
        lines.append(f"commit   last one {fmt_duration(st.last_commit_age_s)} ago")
    if st.failed_shards:
        lines.append("failed shards (rerun to retry them):")
        lines += [f"  {f.get('shard')}: {f.get('reason')}" for f in st.failed_shards[:20]]
        if len(st.failed_shards) > 20:
            lines.append(f"  ... and {len(st.failed_shards) - 20} more")
    if st.error_reasons:
        lines.append("error rows by reason:")
        lines += [f"  {r['rows']:>7,}  {r['reason']}  (e.g. {r['example_id']})" for r in st.error_reasons]
    return "\n".join(lines)


def main(target: str, as_json: bool = False) -> int:
    output, storage = resolve(target)
    st = read_status(output, storage)
    print(json.dumps(st.to_dict(), indent=2) if as_json else format_status(st))
    sys.stdout.flush()
    return 0
