"""The scheduler alone, over fake replica handles (no Ray): queue, shards in flight, retries, lost replicas."""

from __future__ import annotations

from collections import Counter

import pytest

from dgbatch.scheduler import (
    Done,
    Fatal,
    Gone,
    IdenticalFailures,
    JobObserver,
    Restarting,
    Retry,
    Rows,
    Scheduler,
    Up,
)


class FakeReplica:
    """A replica that finishes each shard after `polls` rounds. `script` says, per shard, what its
    attempts on this replica do: 'ok' (committed), 'retry' (the shard fails, the replica is fine),
    'restart' (the replica loses everything it holds and is back two rounds later), 'gone', or 'fatal' (the
    storage gave up on its commit: the job cannot go on). `stuck`: it never comes up (Gone, with a job-level
    reason, after `stuck` rounds)."""

    def __init__(self, name: str, polls: int = 1, script: dict[str, list[str]] | None = None, stuck: int = 0):
        self.name = name
        self.process = None  # no process to wait for
        self.stuck = stuck
        self.polls = polls
        self.script = script or {}
        self.running: dict[tuple[str, int], int] = {}  # (shard, submission) -> rounds left
        self.started = self.announced = self.dead = False
        self.down_for = 0
        self.submitted: list[tuple[str, object]] = []
        self.max_held = 0

    def start(self) -> None:
        self.started = True

    def submit(self, shard: str, job) -> None:
        assert self.announced and not self.down_for and not self.dead, "a shard went to a replica that is not up"
        self.running[(shard, len(self.submitted))] = self.polls
        self.submitted.append((shard, job))
        self.max_held = max(self.max_held, len(self.running))

    def waitables(self) -> list:
        return [self]

    def collect(self, ready: set, now: float) -> list:
        assert self in ready
        if self.dead:
            return []
        if self.stuck:
            self.stuck -= 1
            if not self.stuck:
                self.dead = True
                return [Gone("AssertionError: Torch not compiled with CUDA enabled", StuckError("could not start"))]
            return []
        if self.started and not self.announced:
            self.announced = True
            return [Up()]
        if self.down_for:
            self.down_for -= 1
            return [] if self.down_for else [Up()]
        out = []
        for key in list(self.running):
            shard, seq = key
            self.running[key] -= 1
            if self.running[key] > 0:
                done_rows = self.polls - self.running[key]
                out.append(Rows(shard, done_rows, 10 * done_rows))
                continue
            del self.running[key]
            what = self.script[shard].pop(0) if self.script.get(shard) else "ok"
            if what == "ok":
                out.append(Done(shard, {"rows": 1, "by": self.name, "job": self.submitted[seq][1]}))
            elif what.startswith("retry"):  # "retry" or "retry:<the error>"
                out.append(Retry(shard, what.partition(":")[2] or "ValueError: bad shard"))
            elif what == "fatal":
                out.append(Fatal(StorageDown("storage kept failing"), shard))
            elif what == "restart":
                self.running.clear()
                self.down_for = 2
                return [*out, Restarting("RayActorError: the actor died")]
            else:
                self.running.clear()
                self.dead = True
                return [*out, Gone("RayActorError: gone for good")]
        return out

    def kill(self) -> list:
        self.dead = True
        return []


class StorageDown(Exception):
    pass


class StuckError(Exception):
    pass


class Recorder(JobObserver):
    """Everything the scheduler tells its observer."""

    def __init__(self):
        self.done_count: Counter[str] = Counter()
        self.by: dict[str, str] = {}
        self.of_job: set = set()  # the jobs whose submissions the done shards came from
        self.rows_seen: list[tuple[str, int]] = []
        self.tokens_seen: list[tuple[str, int]] = []
        self.events: list[tuple] = []
        self.in_flight: list[int] = []

    def done(self, shard, stats):
        self.done_count[shard] += 1
        self.by[shard] = stats["by"]
        self.of_job.add(stats["job"])

    def rows(self, shard, finished, tokens):
        self.rows_seen.append((shard, finished))
        self.tokens_seen.append((shard, tokens))

    def retried(self, shard, reason):
        self.events.append(("retried", shard))

    def failed(self, shard, reason):
        self.events.append(("failed", shard))

    def restarting(self, replica, reason, gone):
        self.events.append(("gone" if gone else "restarting", replica))

    def round(self, scheduler):
        self.in_flight.append(scheduler.in_flight)


def run(handles, shards, *, depth=2, max_attempts=3, max_identical=10, job="job-1", scheduler=None, recorder=None):
    rec = recorder or Recorder()
    s = scheduler or Scheduler(handles, max_attempts=max_attempts, max_identical=max_identical)
    if scheduler is None:
        s.start()
    failed = s.run(shards, job, lambda waitables, timeout: waitables, depth=depth, observer=rec, clock=lambda: 0.0)
    assert rec.of_job <= {job}, f"a result of another job's shard was taken for {job}'s"
    return failed, rec.done_count, rec.by, rec.rows_seen, s


def shards(n: int) -> list[str]:
    return [f"s{i:02d}" for i in range(n)]


def test_every_shard_is_done_exactly_once_and_a_faster_replica_runs_more():
    fast, slow = FakeReplica("fast", polls=1), FakeReplica("slow", polls=4)
    failed, done, by, _, _ = run([fast, slow], shards(30), depth=3)
    assert failed == {}
    assert done == Counter({s: 1 for s in shards(30)})
    assert Counter(by.values())["fast"] > 2 * Counter(by.values())["slow"] > 0
    assert fast.max_held <= 3 and slow.max_held == 3  # never more than `depth` shards in flight


def test_a_replica_holds_several_shards_at_once_so_its_engine_always_has_a_next_one():
    r = FakeReplica("r", polls=3)
    run([r], shards(6), depth=2)
    assert r.max_held == 2
    assert [s for s, _ in r.submitted] == shards(6)  # in queue order


def test_a_failing_shard_is_retried_then_recorded_and_the_replica_keeps_working():
    r = FakeReplica("r", script={"s01": ["retry", "retry", "retry"], "s02": ["retry", "ok"]})
    failed, done, _, _, s = run([r], shards(4), max_attempts=3)
    assert set(failed) == {"s01"} and "failed 3 attempts; last: ValueError: bad shard" in failed["s01"]
    assert set(done) == {"s00", "s02", "s03"} and s.attempts["s02"] == 1
    assert [x for x, _ in r.submitted].count("s01") == 3


def test_a_restarting_replica_loses_what_it_held_and_gets_it_back_when_it_is_up():
    r = FakeReplica("r", polls=2, script={"s00": ["restart", "ok"]})
    failed, done, _, rows, s = run([r], shards(5), depth=2)
    assert failed == {} and done == Counter({x: 1 for x in shards(5)})
    # s00 and s01 were in flight when it died: each requeued, one attempt counted
    assert s.attempts == Counter({"s00": 1, "s01": 1})
    assert ("s00", 0) in rows  # the lost shard's finished rows are reset for the progress line


def test_a_gone_replicas_shards_go_to_the_others():
    gone, other = FakeReplica("gone", polls=2, script={"s00": ["gone"]}), FakeReplica("other", polls=2)
    failed, done, by, _, _ = run([gone, other], shards(8), depth=2)
    assert failed == {} and done == Counter({x: 1 for x in shards(8)})
    assert by["s00"] == "other"


def test_with_every_replica_gone_the_rest_of_the_queue_fails_with_the_last_error():
    r = FakeReplica("r", script={"s00": ["gone"]})
    failed, done, _, _, _ = run([r], shards(4), depth=1)
    assert not done
    for shard in ("s00", "s01", "s02", "s03"):  # s00 had tries left, but nothing to run it
        assert failed[shard] == "no replica left to run it; last replica error: RayActorError: gone for good"


def test_rows_of_shards_in_flight_are_reported_as_they_finish():
    r = FakeReplica("r", polls=3)
    rec = Recorder()
    run([r], shards(2), depth=2, recorder=rec)
    assert ("s00", 1) in rec.rows_seen and ("s00", 2) in rec.rows_seen and ("s01", 2) in rec.rows_seen
    assert ("s00", 20) in rec.tokens_seen  # with their output tokens


def test_the_observer_hears_of_every_retry_failure_restart_and_round():
    r = FakeReplica("r", polls=2, script={"s00": ["restart", "ok"], "s01": ["retry", "retry", "retry"]})
    rec = Recorder()
    failed, _, _, _, _ = run([r], shards(3), depth=2, max_attempts=3, recorder=rec)
    assert set(failed) == {"s01"}
    assert rec.events.count(("restarting", "r")) == 1
    assert ("failed", "s01") in rec.events and rec.events.count(("failed", "s01")) == 1
    # lost with the restart (s00, s01), then s01's two failed attempts that were requeued
    assert sorted(e for e in rec.events if e[0] == "retried") == [("retried", "s00"), ("retried", "s01"),
                                                                   ("retried", "s01")]
    assert max(rec.in_flight) == 2 and rec.in_flight[-1] == 0


def test_a_second_job_runs_on_the_same_replicas_without_starting_them_again():
    a, b = FakeReplica("a"), FakeReplica("b", polls=2)
    _, done1, _, _, s = run([a, b], shards(6), job="job-1")
    failed, done2, _, _, _ = run([a, b], ["t0", "t1", "t2"], job="job-2", scheduler=s)
    assert failed == {} and set(done1) == set(shards(6)) and set(done2) == {"t0", "t1", "t2"}
    jobs = {shard: job for r in (a, b) for shard, job in r.submitted}
    assert {jobs[x] for x in shards(6)} == {"job-1"} and {jobs[x] for x in ("t0", "t1", "t2")} == {"job-2"}


def test_a_fatal_outcome_stops_handing_out_shards_and_run_raises_its_error():
    r = FakeReplica("r", polls=1, script={"s02": ["fatal"]})
    with pytest.raises(StorageDown, match="storage kept failing"):
        run([r], shards(10), depth=1)
    assert [x for x, _ in r.submitted] == ["s00", "s01", "s02"]  # nothing after the fatal one


def test_a_stopped_jobs_shards_in_flight_are_waited_out_before_the_next_job_so_none_is_misattributed():
    # job 1 stops on a's fatal shard while b still holds s01 (slow); job 2 has a shard named s01 too
    a, b = FakeReplica("a", polls=1, script={"s00": ["fatal"]}), FakeReplica("b", polls=3)
    s = Scheduler([a, b])
    s.start()
    with pytest.raises(StorageDown):
        run([a, b], shards(6), depth=1, scheduler=s)
    assert any(held for held in s.held)  # b's s01 is still running
    failed, done, _, _, _ = run([a, b], ["s07", "s01"], job="job-2", scheduler=s)  # b gets s01 again
    assert failed == {} and done == Counter({"s01": 1, "s07": 1})
    job2 = [(shard, r.name) for r in (a, b) for shard, job in r.submitted if job == "job-2"]
    assert sorted(x for x, _ in job2) == ["s01", "s07"]
    assert not any(s.held) and s.fatal is None


def test_replicas_that_cannot_start_stop_the_job_with_their_reason_once_none_is_left():
    a, b = FakeReplica("a", stuck=2), FakeReplica("b", stuck=3)
    with pytest.raises(StuckError, match="could not start"):
        run([a, b], shards(4))
    assert not a.submitted and not b.submitted
    # the same pool's next job stops at once with the same reason
    s = Scheduler([a, b])
    s.gone, s.stuck = {0, 1}, StuckError("could not start")
    with pytest.raises(StuckError):
        run([a, b], shards(2), scheduler=s)


def test_a_replica_that_cannot_start_is_dropped_while_another_one_runs_the_job():
    stuck, ok = FakeReplica("stuck", stuck=2), FakeReplica("ok", polls=2)
    failed, done, by, _, _ = run([stuck, ok], shards(6))
    assert failed == {} and set(by.values()) == {"ok"} and done == Counter({x: 1 for x in shards(6)})


def _denied(shard: str, n: int) -> str:
    return f"retry:PermissionError: Access Denied writing s3://bucket/out/{shard}.parquet ({n} rows)"


def test_the_same_error_on_shard_after_shard_stops_the_job_early():
    """Storage the replicas cannot reach fails every shard alike: the job stops after a few of them with that
    error, rather than after 3 attempts of each of the 40 (the ids and numbers in the message differ)."""
    r = FakeReplica("r", script={s: [_denied(s, 7 + i)] * 3 for i, s in enumerate(shards(40))})
    rec = Recorder()
    with pytest.raises(IdenticalFailures) as e:
        run([r], shards(40), max_identical=5, recorder=rec)
    assert "5 different shards failed their first attempt in a row" in str(e.value)
    assert "replicas.max_identical_failures=5" in str(e.value) and "PermissionError: Access Denied" in str(e.value)
    assert len(r.submitted) <= 5 + 2  # the five, and what the replica already held (depth 2)
    assert not [ev for ev in rec.events if ev[0] == "failed"]  # stopped, not recorded as failed shard by shard


def test_a_committed_shard_between_failures_or_another_error_keeps_the_job_going():
    # the even shards commit; the odd ones' retries, at the end, fail in a row: they are not first attempts
    ok_between = {s: [_denied(s, 1)] * 3 for s in shards(20)[1::2]}
    failed, done, *_ = run([FakeReplica("r", script=ok_between)], shards(20), max_identical=3)
    assert set(failed) == set(ok_between) and sum(done.values()) == 10
    errors = ["retry:ValueError: bad row count", "retry:KeyError: 'prompt'"]
    mixed = {s: [errors[i % 2]] * 3 for i, s in enumerate(shards(12))}
    failed, *_ = run([FakeReplica("r", script=mixed)], shards(12), depth=1, max_identical=3)
    assert set(failed) == set(shards(12))  # each failed for good on its own: no two in a row alike
    same = {s: [_denied(s, 1)] * 3 for s in shards(12)}
    failed, *_ = run([FakeReplica("r", script=same)], shards(12), max_identical=0)  # 0: never stops for it
    assert set(failed) == set(shards(12))
