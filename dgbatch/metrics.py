"""Prometheus metrics through `ray.util.metrics`: they appear on each Ray node's metrics endpoint (and
in Ray's Grafana), with the names in `SPECS` (Ray exports them as `ray_<name>`, counters with
`_total`). One list, so the README's table, `infra/grafana/dgbatch.json` and the code agree (a test
checks it).

Each fact is counted where it is known: the driver counts what happens to shards (`DriverMetrics`,
from the scheduler's observer); each replica counts its rows and engine steps (`ReplicaReporter`, a
thread that reads the stream's counters twice per export interval, so the engine loop only adds to a
few counters per row). Labels: `job` (the job's output URL, credentials scrubbed: what `dgbatch
status` takes) and, on a replica's metrics, `replica` (its name, `replica-N-RUNID`).

Ray exports every `metrics_report_interval_ms` (10 s by default) and drops what a process recorded
after its last export when it exits; so a driver on a cluster that outlives it (`ray job submit`, a
`ray.address`) waits one interval before its replicas and itself exit (`ReplicaPool.close`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("dgbatch")



@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus sees (histograms add _bucket, _count and _sum to it)."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


JOB, REPLICA = ("job",), ("job", "replica")
TPF_BOUNDARIES = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
STEPS_BOUNDARIES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)

DRIVER_SPECS = [  # counted by the driver (DriverMetrics)
    Spec("dgbatch_rows", "counter", JOB, "Rows committed (error rows included)"),
    Spec("dgbatch_error_rows", "counter", JOB, "Committed rows that are error records (a bad row, not a crash)"),
    Spec("dgbatch_output_tokens", "counter", JOB, "Output tokens of the committed rows"),
    Spec("dgbatch_shards_done", "counter", JOB, "Shards committed"),
    Spec("dgbatch_shards_failed", "counter", JOB, "Shards that failed for good (after their attempts)"),
    Spec("dgbatch_shards_retried", "counter", JOB, "Shard attempts that failed or were lost and were queued again"),
    Spec("dgbatch_replica_restarts", "counter", REPLICA, "Times a replica lost its shards (died, or its loop broke)"),
    Spec("dgbatch_shards_in_flight", "gauge", JOB, "Shards held by replicas now"),
    Spec("dgbatch_rows_planned", "gauge", JOB, "Rows the job has in all (its plan)"),
    Spec("dgbatch_rows_finished", "gauge", JOB, "Rows finished, those of shards in flight included"),
    Spec("dgbatch_eta_seconds", "gauge", JOB, "Estimated time to the last row, from the last minute's speed"),
    Spec("dgbatch_prompt_padding", "gauge", JOB,
         "Fraction of prompt positions that are padding in the plan's batches (a padded batch backend's cost)"),
]
REPLICA_SPECS = [  # counted by each replica (ReplicaReporter)
    Spec("dgbatch_replica_rows", "counter", REPLICA, "Rows the replica generated"),
    Spec("dgbatch_replica_output_tokens", "counter", REPLICA, "Output tokens the replica generated"),
    Spec("dgbatch_replica_tokens_per_second", "gauge", REPLICA, "The replica's output tokens/s over its last report"),
    Spec("dgbatch_tokens_per_forward", "histogram", REPLICA, "Each row's output tokens per decoder forward",
         TPF_BOUNDARIES),
    Spec("dgbatch_denoising_steps_per_canvas", "histogram", REPLICA, "Denoising steps each canvas took (engine)",
         STEPS_BOUNDARIES),
    Spec("dgbatch_slot_utilization", "gauge", REPLICA,
         "Useful / computed decoder row-forwards over the replica's last report (engine)"),
    Spec("dgbatch_decoder_batch_size", "gauge", REPLICA, "Mean decoder batch size over the replica's last report (engine)"),
]
SPECS = DRIVER_SPECS + REPLICA_SPECS
BY_NAME = {s.name: s for s in SPECS}


def _make(spec: Spec):
    from ray.util import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.help, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.help, tag_keys=spec.labels)
    return metrics.Histogram(spec.name, spec.help, boundaries=list(spec.boundaries), tag_keys=spec.labels)


class _Metrics:
    """The metrics of `names`, made once per process (in a Ray driver or actor)."""

    def __init__(self, names: list[str]):
        self.m = {n: _make(BY_NAME[n]) for n in names}

    def inc(self, name: str, value: float, tags: dict) -> None:
        if value > 0:
            self.m[name].inc(value, tags=tags)

    def set(self, name: str, value: float, tags: dict) -> None:
        self.m[name].set(value, tags=tags)

    def observe(self, name: str, value: float, tags: dict) -> None:
        self.m[name].observe(value, tags=tags)


_DRIVER = [s.name for s in DRIVER_SPECS]
_REPLICA = [s.name for s in REPLICA_SPECS]
_made: dict[str, _Metrics] = {}


def _metrics(kind: str) -> _Metrics:
    if kind not in _made:  # Ray refuses a second metric of the same name in one process
        _made[kind] = _Metrics(_DRIVER if kind == "driver" else _REPLICA)
    return _made[kind]


class DriverMetrics:
    """The driver's metrics for one job (label `job`)."""

    def __init__(self, job: str):
        self.m = _metrics("driver")
        self.tags = {"job": job}

    def committed(self, stats: dict) -> None:
        self.m.inc("dgbatch_rows", stats["rows"], self.tags)
        self.m.inc("dgbatch_error_rows", stats.get("error_rows", 0), self.tags)
        self.m.inc("dgbatch_output_tokens", stats["output_tokens"], self.tags)
        self.m.inc("dgbatch_shards_done", 1, self.tags)

    def retried(self) -> None:
        self.m.inc("dgbatch_shards_retried", 1, self.tags)

    def failed(self) -> None:
        self.m.inc("dgbatch_shards_failed", 1, self.tags)

    def restarting(self, replica: str) -> None:
        self.m.inc("dgbatch_replica_restarts", 1, {**self.tags, "replica": replica})

    def progress(self, rows_planned: int, rows_finished: int, in_flight: int, eta_s: float | None) -> None:
        """The gauges (set again every few seconds: Ray drops a gauge it has not heard of for two intervals)."""
        self.m.set("dgbatch_rows_planned", rows_planned, self.tags)
        self.m.set("dgbatch_rows_finished", rows_finished, self.tags)
        self.m.set("dgbatch_shards_in_flight", in_flight, self.tags)
        if eta_s is not None:
            self.m.set("dgbatch_eta_seconds", eta_s, self.tags)

    def padding(self, fraction: float) -> None:
        self.m.set("dgbatch_prompt_padding", fraction, self.tags)


class ReplicaReporter:
    """A replica's metrics: every `every_s` (default: twice per Ray export), the rows its stream finished since the last report (per
    job label) and what its engine did (`EngineStats` deltas; the reference backend has none)."""

    def __init__(self, stream, replica: str, every_s: float | None = None):
        self.stream, self.replica = stream, replica
        # twice per export: more often is never seen; a gauge not set for two exports disappears
        self.every_s = every_s or max(export_interval_s() / 2, 0.5)
        self.m = _metrics("replica")
        self._stats = None  # the EngineStats object the baselines below are of (a new backend: a new one)
        self._prev = (0, 0, 0, {})  # decoder calls, computed and useful row-forwards, canvas steps
        self._at = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.report_s = 0.0  # wall time spent reporting (for the overhead benchmark)

    def start(self) -> ReplicaReporter:
        threading.Thread(target=self._loop, name="dgbatch-metrics", daemon=True).start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.report()
            except Exception:  # metrics never break a replica
                log.exception("replica metrics report failed")

    def stop(self) -> None:
        self._stop.set()

    def report(self) -> None:
        """Record what happened since the last report (also called on flush, from another thread)."""
        with self._lock:
            t0 = time.time()
            dt = max(t0 - self._at, 1e-6)
            self._at = t0
            rows = self.stream.take_rows()
            current = self.stream.label
            for label, (n, tokens, tpfs) in rows.items():
                tags = {"job": label, "replica": self.replica}
                self.m.inc("dgbatch_replica_rows", n, tags)
                self.m.inc("dgbatch_replica_output_tokens", tokens, tags)
                for v in tpfs:
                    self.m.observe("dgbatch_tokens_per_forward", v, tags)
            if current or rows:
                tags = {"job": current, "replica": self.replica}
                self.m.set("dgbatch_replica_tokens_per_second", rows.get(current, (0, 0, []))[1] / dt, tags)
                self._engine({"job": current, "replica": self.replica})
            self.report_s += time.time() - t0

    def _engine(self, tags: dict) -> None:
        stats = getattr(self.stream.backend, "stats", None)
        if stats is None or not hasattr(stats, "canvas_steps"):
            return
        if stats is not self._stats:
            self._stats, self._prev = stats, (0, 0, 0, {})
        calls, computed, useful, steps = (stats.decoder_calls, stats.computed_row_forwards,
                                          stats.useful_row_forwards, dict(stats.canvas_steps))
        c0, k0, u0, s0 = self._prev
        self._prev = (calls, computed, useful, steps)
        if calls > c0:
            self.m.set("dgbatch_slot_utilization", (useful - u0) / max(computed - k0, 1), tags)
            self.m.set("dgbatch_decoder_batch_size", (computed - k0) / (calls - c0), tags)
        for k, n in steps.items():
            for _ in range(n - s0.get(k, 0)):
                self.m.observe("dgbatch_denoising_steps_per_canvas", k, tags)


def export_interval_s() -> float:
    """How often this process's metrics reach Ray's metrics agent."""
    try:
        import ray

        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000  # no public accessor
    except Exception:  # noqa: BLE001 - not on a Ray worker, or another Ray
        return 10.0
