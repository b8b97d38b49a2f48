"""Replicas on the Ray cluster, behind the handles the scheduler drives (`dgbatch.scheduler`).

- `SingleReplica`: one actor (tp_size = ep_size = 1). Ray restarts it when it dies
  (max_restarts=-1); the handle probes it until it answers again (then `Up`).
- `ReplicaGroup`: tp_size x ep_size rank actors gang-scheduled in one placement group (one bundle
  per rank: replicas.num_cpus CPUs, replicas.num_gpus GPUs, the accelerator type). Ranks are never
  restarted one by one: a process group cannot take a new member, so any failure of the group tears
  it down whole (every actor and the placement group) and the handle starts a new one.

Both bound how long a replica may fail to come up (`replicas.max_start_failures` failed starts in a row,
`replicas.placement_timeout_s` waiting for resources): then it is `Gone` with a job-level reason, which
stops the job (exit 2, one line) when no replica is left. A shard whose storage gave up is `Fatal`.

Each handle knows its kind's protocol (which call is the leader's, what a failure means) and turns
Ray's results into the scheduler's outcomes: a shard that failed on its own (`Retry`: the replica is
fine) against a replica that lost everything it held (`Restarting`, or `Gone` when it will not come
back). Both kinds are threaded actors: the driver keeps several shards in flight on a replica (its
stream runs them through one engine, `dgbatch.stream`) and polls its per-shard row counts.
"""

from __future__ import annotations

import logging
import time

from dgbatch import redact
from dgbatch.capacity import PlacementError, replica_bundle, shortfall
from dgbatch.config import JobConfig
from dgbatch.errors import JobError
from dgbatch.scheduler import Done, Fatal, Gone, Outcome, Restarting, Retry, Rows, Up

log = logging.getLogger("dgbatch")

NAMESPACE = "dgbatch"
MAX_PROBES = 120  # ~2 minutes of 1-second probes that find a restarting replica unavailable before it is given up
PLACEMENT_CHECK_S = 1.0  # how often a replica that is not up is checked for a node (SingleReplica)
WAIT_NOTICE_S = 10.0  # a replica waiting this long for resources says what it waits for
MAX_SHARDS_IN_FLIGHT = 16  # per replica; its actor runs that many shard calls at once, plus control calls
PROGRESS_EVERY_S = 1.0  # how often a replica holding shards is asked for their finished rows


def brief(err: BaseException) -> str:
    """An error in one scrubbed line for logs and failure records: its type and its message's last line."""
    return redact.scrub(f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:500]}")


def _cause(err: BaseException) -> BaseException:
    return getattr(err, "cause", None) or err


class _Calls:
    """The refs a handle waits on: ref -> (kind, shard or rank)."""

    def __init__(self):
        self.refs: dict = {}

    def add(self, ref, kind: str, what=None) -> None:
        self.refs[ref] = (kind, what)

    def ready(self, ready: set) -> list:
        out = [(ref, *self.refs.pop(ref)) for ref in list(self.refs) if ref in ready]
        return out

    def clear(self) -> None:
        self.refs.clear()

    def has(self, kind: str) -> bool:
        return any(k == kind for k, _ in self.refs.values())


class ReplicaStartError(JobError):
    """A replica failed to start replicas.max_start_failures times in a row."""


def start_error(index: int, failures: int, reason: str) -> ReplicaStartError:
    return ReplicaStartError(
        f"replica {index} failed to start {failures} time(s) in a row (replicas.max_start_failures={failures}): "
        f"{reason}. Check model.device, model.path and the replicas' nodes")


def init_error(err: BaseException) -> str:
    """What a replica's __init__ raised, in one scrubbed line (Ray wraps it in ActorDiedError's text)."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return redact.scrub(lines[-1].strip()[:500])


class Waiting:
    """How long a replica that is not up has waited for a node with its resources (none: it has one, or it is
    not known), and the notice and the timeout that bound that wait."""

    def __init__(self, ray, index: int, cfg: JobConfig):
        self.ray, self.index, self.cfg = ray, index, cfg
        self.since: float | None = None
        self.noticed = False

    def placed(self, now: float) -> None:
        self.since, self.noticed = None, False

    def unplaced(self, now: float) -> list[Outcome]:
        """Not placed, seen at `now`: a notice after WAIT_NOTICE_S, `Gone` after replicas.placement_timeout_s."""
        self.since = now if self.since is None else self.since
        waited, limit = now - self.since, self.cfg.replicas.placement_timeout_s
        if waited >= limit:
            why = PlacementError(f"replica {self.index} was not placed in {limit:g} s (replicas.placement_timeout_s): "
                                 f"{shortfall(self.ray, self.cfg)}")
            return [Gone(f"not placed in {limit:g} s", why)]
        if waited >= WAIT_NOTICE_S and not self.noticed:
            self.noticed = True
            log.warning("replica %d waits for resources: %s; giving up %g s after it began (replicas."
                        "placement_timeout_s)", self.index, shortfall(self.ray, self.cfg), limit)
        return []


class SingleReplica:
    """One `Replica` actor, created (and loading its model) at once. One whose __init__ raised is dead for good
    (Ray does not restart it): a new actor is made, up to replicas.max_start_failures starts in a row."""

    def __init__(self, ray, index: int, run_id: str, cfg: JobConfig):
        from dgbatch.replica import Replica

        self.ray, self.index, self.run_id, self.cfg = ray, index, run_id, cfg
        self.cls = ray.remote(Replica)
        self.starts = 0
        self.calls = _Calls()
        self.up = False
        self.probe_at: float | None = None
        self.probe_failures = 0  # probes in a row that found it unavailable
        self.start_failures = 0  # starts in a row that failed
        self.waiting = Waiting(ray, index, cfg)
        self.check_at = 0.0
        self.progress_at = 0.0
        self.timings: dict | None = None
        self.process: tuple[str, int] | None = None
        self._create()

    @property
    def name(self) -> str:
        return f"replica-{self.index}-{self.run_id}" if self.starts <= 1 else (
            f"replica-{self.index}-s{self.starts}-{self.run_id}")

    def _create(self) -> None:
        r = self.cfg.replicas
        self.starts += 1
        self.actor = self.cls.options(
            name=self.name, num_cpus=r.num_cpus, num_gpus=r.num_gpus, accelerator_type=r.accelerator_type,
            max_restarts=-1, max_task_retries=0, namespace=NAMESPACE, max_concurrency=MAX_SHARDS_IN_FLIGHT + 4,
            scheduling_strategy="SPREAD",  # a node lost takes as few replicas with it as can be
        ).remote(self.cfg)  # fmt: skip

    def start(self) -> None:
        self.calls.add(self.actor.ready.remote(), "ready")

    def submit(self, shard: str, job) -> None:
        self.calls.add(self.actor.run_shard.remote(shard, job), "shard", shard)

    def waitables(self) -> list:
        return list(self.calls.refs)

    def collect(self, ready: set, now: float) -> list[Outcome]:
        out: list[Outcome] = []
        lost: list[Outcome] | None = None  # after a loss the other calls in flight died with it
        for ref, kind, shard in self.calls.ready(ready):
            try:
                value = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError) as e:
                if lost is None:
                    lost = self._lost(e, now, kind)
                continue
            except self.ray.exceptions.RayTaskError as e:
                fatal = _storage_gave_up(e, shard)
                if fatal is not None:
                    out.append(fatal)
                elif kind == "shard" and not _is_broken(e):
                    out.append(Retry(shard, brief(_cause(e))))
                elif lost is None:
                    self.ray.kill(self.actor, no_restart=False)  # its loop died: Ray brings it back fresh
                    lost = self._lost(e, now, kind)
                continue
            if kind == "shard":
                out.append(Done(shard, value))  # committed, whatever happened to the actor since
            elif kind in ("ready", "probe") and lost is None:
                self.up, self.probe_failures, self.start_failures = True, 0, 0
                self.waiting.placed(now)
                self.timings = self.timings or value
                self.process = (value["node_id"], value["pid"])  # a restarted actor is a new process
                out.append(Up())
            elif kind == "progress" and lost is None:
                out += [Rows(s, rows, tokens) for s, (rows, tokens) in value.items()]
        if lost is not None:
            return out + lost
        if not self.up and now >= self.check_at:
            self.check_at = now + PLACEMENT_CHECK_S
            if self._placed() is False:
                gone = self.waiting.unplaced(now)
                if gone:
                    self.kill()
                    return out + gone
            else:
                self.waiting.placed(now)
        if self.probe_at is not None and self.probe_at <= now:
            self.probe_at = None
            self.calls.add(self.actor.ready.remote(), "probe")
        if self.calls.has("shard") and not self.calls.has("progress") and now >= self.progress_at:
            self.progress_at = now + PROGRESS_EVERY_S
            self.calls.add(self.actor.progress.remote(), "progress")
        return out

    def _lost(self, err: BaseException, now: float, kind: str) -> list[Outcome]:
        """The actor died or is restarting: everything in flight is lost. One that died while starting (its
        ready call or probe failed) counts a failed start; otherwise it is probed until it is back."""
        self.calls.clear()
        self.up = False
        starting = kind in ("ready", "probe")
        out = [] if kind == "probe" else [Restarting(brief(err))]
        if starting and not isinstance(err, self.ray.exceptions.ActorUnavailableError):
            self.start_failures += 1
            reason = init_error(err)
            n = self.cfg.replicas.max_start_failures
            if self.start_failures >= n:
                log.error("replica %d failed to start %d time(s) in a row; dropping it (last: %s)", self.index, n,
                          reason)
                self.kill()
                return [*out, Gone(reason, start_error(self.index, n, reason))]
            if getattr(err, "actor_init_failed", False):  # dead for good: Ray does not restart it
                log.warning("replica %d failed to start (%s); starting a new one (%d of %d failed)", self.index,
                            reason, self.start_failures, n)
                self._create()
                self.start()
                return out
        else:
            self.probe_failures += kind == "probe"
        if self.probe_failures >= MAX_PROBES:
            log.error("replica %d did not come back after %d probes; dropping it", self.index, MAX_PROBES)
            self.probe_at = None
            return [*out, Gone(brief(err))]
        self.probe_at = now + 1.0
        return out

    def _placed(self) -> bool | None:
        """Whether Ray has found the actor a node (its address is set), None where that cannot be read."""
        try:
            from ray._private.state import state  # no public API without the dashboard (local Ray has none)

            info = state.actor_table(self.actor._actor_id.hex())
        except Exception:  # noqa: BLE001 - unknown: then only the start failures bound the wait
            return None
        if not isinstance(info, dict) or info.get("State") in (None, "DEAD"):
            return None
        return bool((info.get("Address") or {}).get("IPAddress"))

    def stats(self):
        return self.actor.stats.remote()

    def flush_metrics(self):
        return self.actor.flush_metrics.remote()

    def kill(self) -> list:
        """Kill the replica; refs that resolve (to an error) once Ray has it dead (its process may still run)."""
        self.ray.kill(self.actor)
        return [self.actor.stats.remote()]

    def describe(self) -> str:
        return self.name


def _storage_gave_up(err: BaseException, shard: str | None) -> Fatal | None:
    """A shard whose storage kept failing after its retries (StorageUnavailable) stops the job: no more shards
    are generated into commits that cannot happen."""
    from dgbatch.io.fs import StorageUnavailable

    cause = _cause(err)
    return Fatal(cause, shard) if isinstance(cause, StorageUnavailable) else None


def _is_broken(err: BaseException) -> bool:
    from dgbatch.stream import StreamBroken

    return isinstance(_cause(err), StreamBroken)


class ReplicaGroup:
    """tp_size x ep_size `ReplicaRank` actors in one placement group; rank 0 leads (takes the shards)."""

    def __init__(self, ray, index: int, run_id: str, cfg: JobConfig):
        from dgbatch.replica import ReplicaRank

        self.ray, self.index, self.run_id, self.cfg = ray, index, run_id, cfg
        self.world = cfg.parallel.world_size
        self.cls = ray.remote(ReplicaRank)
        self.generation = 0
        self.actors: list = []
        self.pg = None
        self.calls = _Calls()
        self.setups_left = 0
        self.started_at = 0.0
        self.start_failures = 0  # consecutive starts that failed
        self.placed = False
        self.waiting = Waiting(ray, index, cfg)
        self.progress_at = 0.0
        self.timings: dict | None = None
        self.process: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        return f"replica-{self.index}-g{self.generation}-{self.run_id}"

    def bundle(self) -> dict[str, float]:
        return replica_bundle(self.cfg.replicas)

    def start(self) -> None:
        """A new placement group and rank actors; every rank's setup (join, load, shard the model) starts."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.generation += 1
        r = self.cfg.replicas
        self.pg = placement_group([self.bundle()] * self.world, strategy=self.cfg.parallel.placement_strategy,
                                  name=self.name)
        self.actors = [
            self.cls.options(
                name=f"{self.name}-rank{rank}", namespace=NAMESPACE, num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                max_restarts=0, max_task_retries=0, max_concurrency=MAX_SHARDS_IN_FLIGHT + 4 if rank == 0 else 2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(self.cfg, rank)
            for rank in range(self.world)
        ]  # fmt: skip
        address = self.actors[0].rendezvous.remote()  # resolved by Ray before any setup runs
        for rank, a in enumerate(self.actors):
            self.calls.add(a.setup.remote(address), "setup", rank)
        self.setups_left = self.world
        self.started_at = time.time()
        self.placed = False
        self.calls.add(self.pg.ready(), "placed")

    def submit(self, shard: str, job) -> None:
        self.calls.add(self.actors[0].run_shard.remote(shard, job), "shard", shard)

    def waitables(self) -> list:
        return list(self.calls.refs)

    def collect(self, ready: set, now: float) -> list[Outcome]:
        out: list[Outcome] = []
        for ref, kind, what in self.calls.ready(ready):
            try:
                value = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError,
                    self.ray.exceptions.RayTaskError) as e:
                fatal = _storage_gave_up(e, what if kind == "shard" else None)
                if fatal is not None:
                    out.append(fatal)
                    continue
                if kind == "shard" and isinstance(e, self.ray.exceptions.RayTaskError) and not _is_broken(e):
                    out.append(Retry(what, brief(_cause(e))))  # read or commit failed: every rank is still in step
                    continue
                if kind == "progress":
                    continue  # the shard calls say what happened
                return out + self._tear_down(e, starting=kind in ("setup", "placed"))
            if kind == "placed":
                self.placed = True
                self.waiting.placed(now)
            elif kind == "setup":
                self.setups_left -= 1
                if what == 0:
                    self.timings = value
                    self.process = (value["node_id"], value["pid"])  # the leader commits the group's shards
                if not self.setups_left:  # every rank is up: followers enter the lockstep loop
                    for rank, a in enumerate(self.actors[1:], start=1):
                        self.calls.add(a.follow.remote(), "follow", rank)
                    self.start_failures = 0
                    out.append(Up())
            elif kind == "follow":  # a follower left the loop: the group is out of step
                return out + self._tear_down(RuntimeError(f"rank {what} stopped following its leader"))
            elif kind == "shard":
                out.append(Done(what, value))
            elif kind == "progress":
                out += [Rows(s, rows, tokens) for s, (rows, tokens) in value.items()]
        if self.setups_left and not self.placed:
            gone = self.waiting.unplaced(now)
            if gone:
                self.kill()
                return out + gone
        if self.setups_left and now - self.started_at > self.cfg.parallel.startup_timeout_s:
            return out + self._tear_down(TimeoutError(
                f"replica group {self.index} ({self.describe()}) was not up {self.cfg.parallel.startup_timeout_s:g} s "
                "after it was created: not enough resources for its placement group, or a slow model load "
                "(parallel.startup_timeout_s)"), starting=True)
        if self.calls.has("shard") and not self.calls.has("progress") and now >= self.progress_at:
            self.progress_at = now + PROGRESS_EVERY_S
            self.calls.add(self.actors[0].progress.remote(), "progress")
        return out

    def _tear_down(self, err: BaseException, starting: bool = False) -> list[Outcome]:
        """The group failed: kill every rank and the placement group, start a new one (or give up)."""
        self.kill()
        reason = brief(_cause(err))
        self.start_failures = self.start_failures + 1 if starting else 0
        n = self.cfg.replicas.max_start_failures
        if self.start_failures >= n:
            log.error("replica group %d failed to start %d times in a row; dropping it (last: %s)", self.index, n,
                      reason)
            return [Gone(reason, start_error(self.index, n, reason))]
        log.warning("replica group %d torn down (%s); starting a new one", self.index, reason)
        self.start()
        return [Restarting(reason)]

    def stats(self):
        return self.actors[0].stats.remote() if self.actors else None

    def flush_metrics(self):
        return self.actors[0].flush_metrics.remote() if self.actors and not self.setups_left else None

    def kill(self) -> list:
        """Kill every rank and free the placement group; refs that resolve (to errors) once Ray has them dead."""
        from ray.util.placement_group import remove_placement_group

        self.calls.clear()
        self.setups_left = 0
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        gone = [a.stats.remote() for a in self.actors]
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.actors, self.pg = [], None
        return gone

    def describe(self) -> str:
        return (f"{self.world} ranks x {self.bundle()} ({self.cfg.parallel.placement_strategy}, "
                f"tp_size={self.cfg.parallel.tp_size}, ep_size={self.cfg.parallel.ep_size})")


def make_replicas(ray, cfg: JobConfig, run_id: str) -> list:
    cls = ReplicaGroup if cfg.parallel.world_size > 1 else SingleReplica
    return [cls(ray, i, run_id, cfg) for i in range(cfg.replicas.num_replicas)]
