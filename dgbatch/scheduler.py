"""The scheduler: one queue of shards over a set of replicas, with retries. Nothing here knows Ray.

Each replica is behind a handle (`dgbatch.placement` has the Ray ones) that turns what happened to
it into a few typed outcomes; the scheduler keeps the queue, what each replica holds, and the
attempts per shard:

    Up                     the replica takes shards (started, or back after a restart)
    Done(shard, stats)     the shard is committed
    Retry(shard, error)    that shard's attempt failed; the replica is fine
    Rows(shard, finished, tokens)  rows (and their output tokens) of a shard in flight finished so far
                           (progress, nothing else)
    Restarting(error)      every shard the replica held is lost; it is coming back (an Up follows)
    Gone(error, why)       every shard it held is lost; it will not come back. `why`: a job-level error
                           (it could not start, or not be placed) that stops the job once no replica is left
    Fatal(error, shard)    the job cannot go on (the storage gave up on `shard`'s commit): nothing more
                           is handed out, and `run` raises `error` (a JobError: exit 2, one line)

A replica holds up to `depth` shards at once (two or more: while one drains, the next fills its
engine's free slots). A lost or failed shard goes to the back of the queue until it has failed
`max_attempts` times; then it is recorded as failed. When `max_identical` different shards in a row fail
their first attempt with the same error (their ids and numbers aside) and none is committed in between,
the fault is the job's (storage the replicas cannot reach), not the shards': the job stops with that error
(`IdenticalFailures`) rather than spend every attempt of every shard on it. Shards are handed out as
replicas have room, never pre-assigned, so a faster replica runs more of them.

What happens to a job's shards is told to one `JobObserver` (the driver's progress, `_progress.json`
and metrics hang off it), so nothing here knows how it is shown.

A job that stops (Fatal, a replica that could not start, Ctrl-C) may leave shards in flight on replicas
that other jobs will use (a backfill's pool): the next `run` first waits them out, their results
discarded, so none of them is taken for a shard of the next job with the same id.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dgbatch.errors import JobError

log = logging.getLogger("dgbatch")


class IdenticalFailures(JobError):
    """Different shards kept failing with one error, none committed: what is wrong is the job's."""


def failure_kind(shard: str, reason: str) -> str:
    """What two shards' failures must share to count as the same error: the reason, less the shard's id and
    any number (a path, a row count, a port)."""
    return re.sub(r"\d+", "#", reason.replace(shard, "<shard>"))


@dataclass(frozen=True)
class Up:
    pass


@dataclass(frozen=True)
class Done:
    shard: str
    stats: dict


@dataclass(frozen=True)
class Retry:
    shard: str
    error: str


@dataclass(frozen=True)
class Rows:
    shard: str
    finished: int
    tokens: int = 0


@dataclass(frozen=True)
class Restarting:
    error: str


@dataclass(frozen=True)
class Gone:
    error: str
    why: Exception | None = None


@dataclass(frozen=True)
class Fatal:
    error: Exception
    shard: str | None = None


Outcome = Up | Done | Retry | Rows | Restarting | Gone | Fatal


class ReplicaHandle(Protocol):
    """One replica as the scheduler sees it. `waitables` are what `wait` blocks on (Ray object refs);
    `collect` turns the ready ones, and anything due by `now` (start timeouts, probes), into outcomes.
    `submit` passes the job along with the shard: a replica serves jobs, not one output."""

    name: str
    process: tuple[str, int] | None  # (node id, pid) of the process that commits its shards, once it is up

    def start(self) -> None: ...

    def submit(self, shard: str, job: Any) -> None: ...

    def waitables(self) -> list: ...

    def collect(self, ready: set, now: float) -> list[Outcome]: ...

    def kill(self) -> list: ...  # refs that resolve once Ray has it dead ([] where there are none)


Wait = Callable[[list, float], Iterable]  # (waitables, timeout s) -> the ready ones


class JobObserver:
    """What the scheduler tells about one job's shards as it runs them; every method does nothing here,
    so an observer overrides what it needs. Called on the scheduler's thread: keep them quick."""

    def done(self, shard: str, stats: dict) -> None:
        """The shard is committed (`stats`: its commit's `ShardStats` dict)."""

    def rows(self, shard: str, finished: int, tokens: int) -> None:
        """Rows (and their output tokens) of a shard in flight finished so far; 0, 0: it was lost."""

    def retried(self, shard: str, reason: str) -> None:
        """An attempt at the shard failed (or was lost with its replica); it is queued again."""

    def failed(self, shard: str, reason: str) -> None:
        """The shard failed for good (its attempts are used up, or no replica is left)."""

    def restarting(self, replica: str, reason: str, gone: bool) -> None:
        """A replica lost what it held: it is coming back (`gone`: it is not)."""

    def round(self, scheduler: Scheduler) -> None:
        """After each round of the loop (about once a second or sooner): its queue and shards in flight."""


class Scheduler:
    """Shards over `handles`, one job at a time (`run`); the handles' state (up, gone) outlives a job,
    so several jobs can run one after another on the same replicas."""

    def __init__(self, handles: Sequence[ReplicaHandle], *, max_attempts: int = 3, max_identical: int = 10):
        self.handles = list(handles)
        self.max_attempts = max_attempts
        self.max_identical = max_identical  # 0: never stop for identical failures
        self.up: set[int] = set()
        self.gone: set[int] = set()
        self.last_error = ""
        self.stuck: Exception | None = None  # why the last replica gone could not start (Gone.why)
        self._job(deque(), None, 2, None)

    def _job(self, queue: deque, job, depth: int, observer: JobObserver | None) -> None:
        self.queue: deque[str] = queue
        self.job = job
        self.depth = depth
        self.observer = observer or JobObserver()
        self.held: list[set[str]] = [set() for _ in self.handles]  # shards in flight, per replica
        self.attempts: Counter[str] = Counter()
        self.failed: dict[str, str] = {}
        self.streak: tuple[str, set[str]] = ("", set())  # the last first-attempt failures' kind, their shards
        self.fatal: Exception | None = None  # what stopped this job
        self.stopped = False  # nothing more is handed out or requeued

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(self.held)

    @property
    def in_flight(self) -> int:
        """Shards held by replicas now."""
        return sum(len(h) for h in self.held)

    def start(self) -> None:
        for h in self.handles:
            h.start()

    def assign(self) -> None:
        """Hand queued shards to replicas that are up and have room, the emptiest first."""
        while self.queue and not self.stopped:
            room = [i for i in self.up if len(self.held[i]) < self.depth]
            if not room:
                return
            i = min(room, key=lambda j: (len(self.held[j]), j))
            shard = self.queue.popleft()
            self.held[i].add(shard)
            self.handles[i].submit(shard, self.job)

    def apply(self, i: int, outcome: Outcome) -> None:
        """What one outcome of replica `i` changes."""
        if isinstance(outcome, Up):
            self.up.add(i)
        elif isinstance(outcome, Done):
            if outcome.shard in self.held[i]:
                self.held[i].discard(outcome.shard)
                self.streak = ("", set())
                self.observer.done(outcome.shard, outcome.stats)
        elif isinstance(outcome, Retry):
            if outcome.shard in self.held[i]:
                self.held[i].discard(outcome.shard)
                first = not self.attempts[outcome.shard]
                self._retry_or_fail(outcome.shard, outcome.error)
                if first:
                    self._stop_if_identical(outcome.shard, outcome.error)
        elif isinstance(outcome, Rows):
            if outcome.shard in self.held[i]:
                self.observer.rows(outcome.shard, outcome.finished, outcome.tokens)
        elif isinstance(outcome, Fatal):
            if outcome.shard in self.held[i]:
                self.held[i].discard(outcome.shard)
                self.observer.rows(outcome.shard, 0, 0)
            self._stop(outcome.error)
        elif isinstance(outcome, (Restarting, Gone)):
            self.last_error = outcome.error
            self.up.discard(i)
            if isinstance(outcome, Gone):
                self.gone.add(i)
                self.stuck = outcome.why
                log.error("replica %s is gone (%s)", self.handles[i].name, outcome.error)
            self.observer.restarting(self.handles[i].name, outcome.error, isinstance(outcome, Gone))
            lost, self.held[i] = sorted(self.held[i]), set()
            for shard in lost:
                self.observer.rows(shard, 0, 0)
                self._retry_or_fail(shard, outcome.error)
        self._fail_if_no_replica()

    def _stop(self, error: Exception) -> None:
        """The job cannot go on: hand out nothing more; `run` raises `error` (the first one)."""
        if self.fatal is None and not self.stopped:
            log.error("stopping the job: %s", error)
            self.fatal = error
        self.stopped = True
        self.queue.clear()

    def _fail_if_no_replica(self) -> None:
        if len(self.gone) == len(self.handles) and self.stuck is not None:
            self._stop(self.stuck)  # no replica could start: one line says why, rather than each shard
        if len(self.gone) == len(self.handles) and self.queue:
            for shard in self.queue:
                self.failed[shard] = f"no replica left to run it; last replica error: {self.last_error}"
                self.observer.failed(shard, self.failed[shard])
            self.queue.clear()

    def _stop_if_identical(self, shard: str, reason: str) -> None:
        kind = failure_kind(shard, reason)
        if kind != self.streak[0]:
            self.streak = (kind, set())
        self.streak[1].add(shard)
        if self.max_identical and len(self.streak[1]) >= self.max_identical:
            self._stop(IdenticalFailures(
                f"{len(self.streak[1])} different shards failed their first attempt in a row with the same error, "
                f"and none was committed in between (replicas.max_identical_failures={self.max_identical}): {reason}. "
                "That is a fault of the job, not of its shards (storage the replicas' nodes cannot reach or lack credentials for, a "
                "model setting that fails every batch): fix it and run again; committed shards are kept"))

    def _retry_or_fail(self, shard: str, reason: str) -> None:
        if self.stopped:
            return
        self.attempts[shard] += 1
        if self.attempts[shard] >= self.max_attempts:
            self.failed[shard] = f"failed {self.attempts[shard]} attempts; last: {reason}"
            log.error("shard %s failed for good: %s", shard, reason)
            self.observer.failed(shard, self.failed[shard])
        else:
            log.warning("shard %s attempt %d failed (%s); requeued", shard, self.attempts[shard], reason)
            self.queue.append(shard)
            self.observer.retried(shard, reason)

    def poll(self, wait: Wait, timeout: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        """One round: hand out shards, wait (at most `timeout`) for something to happen, apply it."""
        self.assign()
        pending = [w for i, h in enumerate(self.handles) if i not in self.gone for w in h.waitables()]
        ready = set(wait(pending, timeout)) if pending else set()
        now = clock()
        for i, h in enumerate(self.handles):
            if i not in self.gone:
                for outcome in h.collect(ready, now):
                    self.apply(i, outcome)

    def run(self, shards: Sequence[str], job: Any, wait: Wait, *, depth: int = 2,
            observer: JobObserver | None = None, timeout: float = 1.0,
            clock: Callable[[], float] = time.time) -> dict[str, str]:
        """Run one job's shards until each is done or failed for good; returns the failed ones (id ->
        reason), telling `observer` what happens, or raises the error that stopped it (Fatal, or no replica
        could start). A replica holds up to `depth` shards at once. The handles must have been started."""
        self._drain(wait, timeout, clock)
        self._job(deque(shards), job, depth, observer)
        self._fail_if_no_replica()
        while self.busy and not self.stopped:
            self.poll(wait, timeout, clock)
            self.observer.round(self)
        if self.fatal is not None:
            raise self.fatal
        return self.failed

    def _drain(self, wait: Wait, timeout: float, clock: Callable[[], float]) -> None:
        """Wait out the shards a stopped job left in flight (bounded by what the handles bound: a shard's
        generation, storage retries, a replica's restart), discarding their results."""
        if not any(self.held):
            return
        log.info("waiting for %d shard(s) of the stopped job still in flight", sum(map(len, self.held)))
        self.stopped, self.queue = True, deque()
        self.observer = JobObserver()  # the stopped job's observer hears no more
        while any(self.held):
            self.poll(wait, timeout, clock)
