"""The driver's one observer of a running job: what the scheduler tells it becomes the progress shown
(`dgbatch.progress`), `OUTPUT/_progress.json` (`dgbatch.progress_file`) and the driver's metrics
(`dgbatch.metrics`), each every few seconds at most."""

from __future__ import annotations

import time
from collections import Counter

from dgbatch.metrics import DriverMetrics
from dgbatch.progress import JobProgress, display
from dgbatch.progress_file import ProgressRecord, ProgressWriter
from dgbatch.scheduler import JobObserver, Scheduler

GAUGES_EVERY_S = 2.0


class JobMonitor(JobObserver):
    """`every_s`: how often the plain progress line is printed and `_progress.json` rewritten."""

    def __init__(self, progress: JobProgress, fs, layout, job_label: str, run_id: str, every_s: float, out=None):
        self.p = progress
        self.run_id = run_id
        self.every_s = every_s
        self.display = display(progress, every_s, out)
        self.writer = ProgressWriter(fs, layout)
        self.metrics = DriverMetrics(job_label)
        self.storage_retries: Counter[str] = Counter()  # by kind, over the shards committed
        self._written = self._gauges = 0.0
        self._closed = False
        self.round(None)

    # ---- the scheduler's calls ----------------------------------------------------------------------

    def done(self, shard: str, stats: dict) -> None:
        self.p.committed(shard, stats)
        self.metrics.committed(stats)
        self.storage_retries.update(stats.get("storage_retries") or {})

    def rows(self, shard: str, finished: int, tokens: int) -> None:
        self.p.running(shard, finished, tokens)

    def retried(self, shard: str, reason: str) -> None:
        self.metrics.retried()

    def failed(self, shard: str, reason: str) -> None:
        self.p.shards_failed += 1
        self.metrics.failed()

    def restarting(self, replica: str, reason: str, gone: bool) -> None:
        self.metrics.restarting(replica)

    def round(self, scheduler: Scheduler | None) -> None:
        now = time.time()
        if scheduler is not None:
            self.p.shards_in_flight = scheduler.in_flight
        self.p.sample(now)
        self.display.update(self.p, now)
        if now - self._written >= self.every_s:
            self._written = now
            self.writer.offer(self.record("running", now))
        if now - self._gauges >= GAUGES_EVERY_S:
            self._gauges = now
            self.metrics.progress(self.p.rows_total, self.p.rows_done, self.p.shards_in_flight, self.p.eta_s())

    # ---- the end ------------------------------------------------------------------------------------

    def record(self, state: str, now: float | None = None) -> ProgressRecord:
        rows_per_s, tokens_per_s = self.p.rates()
        return ProgressRecord(
            rows_done=self.p.rows_done, rows_total=self.p.rows_total, shards_done=self.p.shards_done,
            shards_total=self.p.shards_total, shards_in_flight=self.p.shards_in_flight,
            shards_failed=self.p.shards_failed, output_tokens=self.p.output_tokens, rows_per_s=rows_per_s or 0.0,
            output_tokens_per_s=tokens_per_s or 0.0, eta_s=self.p.eta_s(), state=state, run_id=self.run_id,
            started_at=self.p.started_at, updated_at=time.time() if now is None else now,
        )  # fmt: skip

    def close(self, state: str) -> None:
        """The last line (or the bar's last state), and `_progress.json` with the run's final `state`:
        finished | failed (some shards failed for good) | interrupted. Once: later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self.p.shards_in_flight = 0
        self.p.in_flight.clear()
        self.display.close(self.p)
        self.metrics.progress(self.p.rows_total, self.p.rows_done, 0, None)
        self.writer.close(self.record(state))
