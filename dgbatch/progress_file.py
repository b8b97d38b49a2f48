"""`OUTPUT/_progress.json`: what a running driver rewrites every few seconds, and `dgbatch status` reads.

Anyone with read access to the output sees where a job stands without its logs. The file is replaced
atomically (`io.commit.write_json`), so a reader sees one whole snapshot. Schema (version 1):

    {"schema": 1, "state": "running" | "finished" | "interrupted" | "failed",
     "updated_at": "2026-12-01T12:00:05Z", "updated_at_unix": 1796126405.2,
     "started_at": "2026-12-01T11:58:00Z", "started_at_unix": 1796126280.0,
     "driver": {"host": "node-1", "pid": 4242, "run_id": "979e0048"},
     "rows": {"done": 5120, "total": 96000},              # done counts rows finished inside shards too
     "shards": {"done": 4, "in_flight": 2, "failed": 0, "total": 94},
     "output_tokens": 151000,                              # generated in this run
     "rows_per_s": 41.0, "output_tokens_per_s": 1210.0,    # this run, recent rate
     "eta_s": 2216.0}                                      # null while unknown

A driver that stops cleanly writes a last snapshot with its final state; one that is killed leaves an
old "running" one, which readers judge by its age (`STALE_AFTER_S`) and, on the same host, its pid.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

SCHEMA = 1
STALE_AFTER_S = 30.0  # a driver rewrites the file every few seconds: older than this, none is writing


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class ProgressRecord:
    rows_done: int
    rows_total: int
    shards_done: int
    shards_total: int
    shards_in_flight: int = 0
    shards_failed: int = 0
    output_tokens: int = 0
    rows_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    eta_s: float | None = None
    state: str = "running"
    run_id: str = ""
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "state": self.state,
            "updated_at": _iso(self.updated_at), "updated_at_unix": round(self.updated_at, 3),
            "started_at": _iso(self.started_at), "started_at_unix": round(self.started_at, 3),
            "driver": {"host": self.host, "pid": self.pid, "run_id": self.run_id},
            "rows": {"done": self.rows_done, "total": self.rows_total},
            "shards": {"done": self.shards_done, "in_flight": self.shards_in_flight, "failed": self.shards_failed,
                       "total": self.shards_total},
            "output_tokens": self.output_tokens,
            "rows_per_s": round(self.rows_per_s, 3), "output_tokens_per_s": round(self.output_tokens_per_s, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
        }  # fmt: skip

    @staticmethod
    def from_dict(d: dict) -> ProgressRecord:
        """Tolerant of missing fields (a newer or older writer): they read as their defaults."""
        rows, shards, driver = d.get("rows") or {}, d.get("shards") or {}, d.get("driver") or {}
        return ProgressRecord(
            rows_done=int(rows.get("done", 0)), rows_total=int(rows.get("total", 0)),
            shards_done=int(shards.get("done", 0)), shards_total=int(shards.get("total", 0)),
            shards_in_flight=int(shards.get("in_flight", 0)), shards_failed=int(shards.get("failed", 0)),
            output_tokens=int(d.get("output_tokens", 0)), rows_per_s=float(d.get("rows_per_s") or 0.0),
            output_tokens_per_s=float(d.get("output_tokens_per_s") or 0.0), eta_s=d.get("eta_s"),
            state=str(d.get("state", "running")), run_id=str(driver.get("run_id", "")),
            started_at=float(d.get("started_at_unix") or 0.0), updated_at=float(d.get("updated_at_unix") or 0.0),
            host=str(driver.get("host", "")), pid=int(driver.get("pid") or 0),
        )  # fmt: skip

    def write(self, fs, layout) -> None:
        from dgbatch.io.commit import write_json

        write_json(fs, layout.progress, self.to_dict())

    def age_s(self, now: float | None = None) -> float:
        return (now or time.time()) - self.updated_at

    def driver_alive(self, now: float | None = None) -> tuple[bool, str]:
        """(is a driver still writing, why we think so)."""
        age = self.age_s(now)
        who = f"{self.host} pid {self.pid}"
        if self.state != "running":
            return False, f"the driver ({who}) ended the run: {self.state}, {age:,.0f}s ago"
        if self.host == socket.gethostname() and self.pid > 0:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False, f"the driver ({who}) is gone: no such process on this host"
            except PermissionError:
                pass  # exists, owned by someone else
        if age > STALE_AFTER_S:
            return False, f"no update from the driver ({who}) for {age:,.0f}s: it stopped or cannot write"
        return True, f"the driver ({who}) updated {age:,.0f}s ago"


class ProgressWriter:
    """Rewrites `_progress.json` off the caller's thread: `offer` a record at any time (only the newest
    waiting one is written, so a slow store never holds the driver up); `close` writes the last one
    synchronously. A failed write is logged once and never stops the job."""

    def __init__(self, fs, layout):
        import threading

        self.fs, self.layout = fs, layout
        self._pending: ProgressRecord | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name="dgbatch-progress-file", daemon=True)
        self._thread.start()

    def offer(self, record: ProgressRecord) -> None:
        with self._cond:
            self._pending = record
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                record, self._pending = self._pending, None
            self._write(record)

    def _write(self, record: ProgressRecord) -> None:
        try:
            record.write(self.fs, self.layout)
        except Exception as e:  # noqa: BLE001 - progress is for people watching; the job goes on
            if not self._warned:
                self._warned = True
                import logging

                logging.getLogger("dgbatch").warning("cannot write %s (%s: %s); the job goes on", self.layout.progress,
                                                     type(e).__name__, str(e)[:200])

    def close(self, last: ProgressRecord) -> None:
        """Stop the writer thread, then write `last` (the final state)."""
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify()
        self._thread.join(timeout=30)
        self._write(last)
