"""A replica's shards through one engine, continuously: continuous batching across shards.

    caller threads (one per shard the driver handed over)      the loop thread (owns the engine)
    ------------------------------------------------------      ---------------------------------
    read the shard (Arrow), its rows' images -> requests ->     take the inbox, submit to the engine
                                                                step; finished rows -> their shard
    wait for the shard's last row                   <-------    a shard's last row: wake its caller
    build the output table, commit it exactly once              (goes on stepping the other shards)

The loop thread never reads, writes or waits for the driver: while one shard's last rows drain, the
next shard's rows (read meanwhile by their own caller thread) fill the free slots, and a shard is
committed as soon as its last row is done, beside the engine. The driver keeps two or more shards
in flight per replica so there always is a next one.

A parallel replica runs this loop on every rank in lockstep (`MeshLockstep`): each iteration the
leader broadcasts one `Tick` (the job to configure for, the requests to admit) and every rank
applies it and steps, so every rank sees the same requests in the same order and takes the same
decisions; when shards finish, the ranks compare digests of their rows before the leader commits.

Bad rows: a failed step drops the engine's unfinished rows and runs them again in halves, down to
single rows, so one bad row becomes that row's error record and every other row its output (a
row's output does not depend on what shares its batch). A parallel replica cannot (its ranks must
stay in step): a failed step breaks it, and the driver rebuilds it and requeues its shards.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import pickle
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dgbatch.generation import Backend, Generation, Request, SamplingParams
from dgbatch.shard import JobContext, Result, ShardFiles, output_table

log = logging.getLogger(__name__)


class StreamBroken(RuntimeError):
    """The replica's loop failed outside a row (or its ranks fell out of step): its in-flight shards
    are lost and the replica must be rebuilt."""


class LockstepError(StreamBroken):
    """The ranks of a replica produced different generations: they are out of step."""


class StreamingBackend(Protocol):
    """What the loop drives (`EngineBackend`, or `BatchStream` around a batch backend)."""

    @property
    def busy(self) -> bool: ...

    def submit(self, requests: Sequence[Request], tag: Hashable = None) -> None: ...

    def step(self) -> list: ...  # [(tag, index, Generation)]

    def reset(self) -> list[tuple[Hashable, int, Request]]: ...

    def generate(self, requests: Sequence[Request]) -> list[Generation]: ...


class BatchStream:
    """A batch backend (transformers' `generate`) as a stream: each step generates one submitted list
    whole, exactly as one `generate` call on it would (the reference's outputs depend on its batches)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.batch_size = getattr(backend, "batch_size", None)
        self.queue: list[tuple[Hashable, list[Request]]] = []

    @property
    def busy(self) -> bool:
        return bool(self.queue)

    def submit(self, requests: Sequence[Request], tag: Hashable = None) -> None:
        self.queue.append((tag, list(requests)))

    def step(self) -> list:
        tag, requests = self.queue[0]
        gens = self.backend.generate(requests)
        self.queue.pop(0)
        return [(tag, i, g) for i, g in enumerate(gens)]

    def reset(self) -> list[tuple[Hashable, int, Request]]:
        dropped = [(tag, i, r) for tag, reqs in self.queue for i, r in enumerate(reqs)]
        self.queue.clear()
        return dropped

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        return self.backend.generate(requests)


class BackendFactory(Protocol):
    """How a replica builds its streaming backend for a job (`dgbatch.replica` has the real one)."""

    def batch_size(self, params: SamplingParams, longest_prompt: int) -> int: ...

    def build(self, params: SamplingParams, batch_size: int) -> StreamingBackend: ...


# ---- lockstep -------------------------------------------------------------------------------------


@dataclass
class Tick:
    """One loop iteration's decisions, made by the leader and applied by every rank."""

    configure: tuple[SamplingParams, int] | None = None  # (params, longest prompt) of the job to come
    admit: list[tuple[Hashable, list[Request]]] = field(default_factory=list)
    stop: bool = False


class Solo:
    """One process: nothing to agree on."""

    ranks = 1
    is_leader = True

    def exchange(self, tick: Tick | None) -> Tick:
        return tick  # type: ignore[return-value]

    def agree_min(self, value: int) -> int:
        return value

    def check(self, digests: list[tuple[Hashable, str]]) -> None:
        pass


class MeshLockstep:
    """The ranks of a parallel replica (`dgbatch.parallel.Mesh`): the leader's tick on every rank."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.ranks = mesh.dims.world
        self.is_leader = mesh.is_leader

    def exchange(self, tick: Tick | None) -> Tick:
        return self.mesh.broadcast_object(tick)

    def agree_min(self, value: int) -> int:
        return min(self.mesh.gather_objects(value))

    def check(self, digests: list[tuple[Hashable, str]]) -> None:
        by_rank = self.mesh.gather_objects(digests)
        if any(d != by_rank[0] for d in by_rank):
            raise LockstepError(f"ranks of this replica generated different outputs (digests by rank: {by_rank})")


def generations_digest(gens: Sequence[Result]) -> str:
    """What must agree across ranks: every row's tokens, forwards and finish reason."""
    rows = [(g.row_id, g.token_ids, g.num_decoder_forwards, g.finish_reason) if isinstance(g, Generation)
            else repr(g) for g in gens]
    return hashlib.sha256(pickle.dumps(rows)).hexdigest()


# ---- the stream -----------------------------------------------------------------------------------


def _prompt_counts(backend) -> tuple[int, int]:
    """(prompt tokens admitted, prompt tokens encoded) so far by the engine's stats; (0, 0) for a backend
    without them (the reference encodes every prompt, padded)."""
    stats = getattr(backend, "stats", None)
    return getattr(stats, "prompt_tokens", 0), getattr(stats, "encoded_prompt_tokens", 0)


class _Ticket:
    """One shard's rows inside the loop: their results as they finish, and who waits for them."""

    def __init__(self, shard_id: str, size: int, extra_rows: int, label: str = ""):
        self.shard_id = shard_id
        self.label = label  # the job's metrics label (`JobContext.label`)
        self.results: list[Result | None] = [None] * size
        self.missing = size
        self.extra_rows = extra_rows  # rows the planner already made error records: done from the start
        self.tokens = 0  # output tokens of the rows finished so far
        self.done = threading.Event()
        self.error: BaseException | None = None

    def add(self, index: int, result: Result) -> bool:
        """Record one row; True when it was the shard's last."""
        if self.results[index] is None:
            self.results[index] = result
            self.missing -= 1
        return self.missing == 0

    @property
    def finished_rows(self) -> int:
        return len(self.results) - self.missing + self.extra_rows


@dataclass
class StreamStats:
    """What the loop did, for logs and benchmarks (times are time.time(), seconds)."""

    started_at: float = field(default_factory=time.time)
    first_step_at: float | None = None
    first_row_at: float | None = None
    last_row_at: float | None = None
    steps: int = 0
    step_s: float = 0.0  # wall time inside the backend's steps
    step_cpu_s: float = 0.0  # CPU time of the loop thread inside them
    idle_s: float = 0.0  # wall time without engine work between two steps (waiting for rows to come)
    cpu_at_first_step: float | None = None  # the process's CPU time (every thread) then, and at the last row
    cpu_at_last_row: float | None = None
    rows: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0  # engine: tokens of the prompts admitted ...
    encoded_prompt_tokens: int = 0  # ... and those its encoder computed (fewer where rows share a prefix)
    shards: int = 0
    batch_size: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class RowMeter:
    """Rows as they finish, per job label, until someone takes them (the replica's metrics reporter):
    a few additions per row on the loop thread, the rest off it."""

    def __init__(self):
        self._rows: dict[str, list] = {}  # label -> [rows, output tokens, [tokens_per_forward ...]]

    def add(self, label: str, tokens: int, tpf: float) -> None:
        m = self._rows.get(label)
        if m is None:
            m = self._rows[label] = [0, 0, []]
        m[0] += 1
        m[1] += tokens
        m[2].append(tpf)

    def take(self) -> dict[str, tuple[int, int, list[float]]]:
        """What was added since the last call: label -> (rows, output tokens, tokens_per_forward values)."""
        out, self._rows = self._rows, {}
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}


class ShardStream:
    """Runs shards through one streaming backend on a loop thread (`start`), committing each on its
    caller's thread (`run_shard`, from any number of threads at once). A follower rank of a parallel
    replica calls `follow` instead, which returns when the leader stops."""

    def __init__(self, factory: BackendFactory, tokenizer, eos_ids: Sequence[int], *, lockstep=None,
                 isolate_rows: bool = True, heartbeat_s: float = 5.0, model_dir=None):
        self.factory = factory
        self.model_dir = model_dir  # the replica's checkpoint: its image processor, for rows with images
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.lockstep = lockstep or Solo()
        self.isolate_rows = isolate_rows
        self.heartbeat_s = heartbeat_s
        self.backend: StreamingBackend | None = None
        self.configured: tuple | None = None  # (params, longest prompt) the backend was set up for
        self.built: tuple | None = None  # (params, batch size) of the backend
        self.tickets: dict[Hashable, _Ticket] = {}
        self.inbox: list[tuple[JobContext, Hashable, list[Request]]] = []
        self.cond = threading.Condition()
        self.broken: BaseException | None = None
        self.stopping = False
        self.stats = StreamStats()
        self.meter = RowMeter()  # guarded by cond
        self.label = ""  # the metrics label of the job the backend was last configured for
        self._files: dict[tuple, ShardFiles] = {}
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._last_step_end: float | None = None

    # ---- caller side (any thread) ------------------------------------------------------------------

    def start(self) -> ShardStream:
        """Start the loop thread (the leader's, or a single replica's)."""
        self._thread = threading.Thread(target=self._lead_guarded, name="dgbatch-engine-loop", daemon=True)
        self._thread.start()
        return self

    def run_shard(self, shard_id: str, job: JobContext) -> dict:
        """Run and commit one shard of `job`; returns its stats (of the committed file, whoever wrote it).
        Raises StreamBroken when the loop failed (the replica must be rebuilt)."""
        files = self._files_of(job)
        done = files.committed(shard_id)  # committed by an earlier attempt
        if done is not None:
            return done
        shard = files.read(shard_id)
        rows = files.requests(shard)  # on this thread: a row's images are read and processed here
        requests = rows.requests
        ticket = _Ticket(shard_id, len(requests), shard.num_rows - len(requests), job.label)
        tag = (shard_id, next(self._seq))
        with self.cond:
            if self.broken is not None:
                raise StreamBroken(f"the replica's loop failed earlier: {self.broken!r}")
            self.tickets[tag] = ticket
            if requests:
                self.inbox.append((job, tag, requests))
                self.cond.notify_all()
            else:
                ticket.done.set()
        try:
            ticket.done.wait()
        finally:
            with self.cond:
                self.tickets.pop(tag, None)
        if ticket.error is not None:
            raise StreamBroken(f"the replica's loop failed: {type(ticket.error).__name__}: {ticket.error}") \
                from ticket.error
        table, stats = output_table(shard, rows, ticket.results, self.tokenizer, self.eos_ids, files.drop_input_id,
                                    files.output_filter)
        return files.commit(shard_id, table, stats)

    def progress(self) -> dict[str, tuple[int, int]]:
        """(rows finished so far (generated, or error records from planning), their output tokens) of
        each shard in flight."""
        with self.cond:
            return {t.shard_id: (t.finished_rows, t.tokens) for t in self.tickets.values()}

    def take_rows(self) -> dict[str, tuple[int, int, list[float]]]:
        """Rows generated since the last call, per job label (`RowMeter.take`)."""
        with self.cond:
            return self.meter.take()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _files_of(self, job: JobContext) -> ShardFiles:
        with self.cond:
            if job.key not in self._files:
                if len(self._files) >= 8:  # a long-lived pool serves job after job: keep the latest few
                    self._files.pop(next(iter(self._files)))
                self._files[job.key] = ShardFiles.of(job, self.model_dir)
            return self._files[job.key]

    # ---- the loop ------------------------------------------------------------------------------------

    def _lead_guarded(self) -> None:
        try:
            self._lead()
        except BaseException as e:  # every waiter must learn it, then the driver
            log.exception("the replica's loop failed; its shards in flight are lost")
            with self.cond:
                self.broken = e
                for t in self.tickets.values():
                    t.error = e
                    t.done.set()

    def _lead(self) -> None:
        import torch

        with torch.inference_mode():  # thread-local: the loop's own
            while True:
                tick = self._next_tick()
                self.lockstep.exchange(tick)
                self._apply(tick)
                if tick.stop:
                    return
                self._advance()

    def follow(self) -> None:
        """A follower rank: apply the leader's ticks until it stops (raises if this rank fails)."""
        import torch

        with torch.inference_mode():
            while True:
                tick = self.lockstep.exchange(None)
                self._apply(tick)
                if tick.stop:
                    return
                self._advance()

    def _next_tick(self) -> Tick:
        """The leader's next decisions: wait (at most heartbeat_s, so followers' collectives never time
        out) until there is something to do, then admit the inbox, in order, up to the first shard of
        another job while the engine still has work (a job change reconfigures an idle engine only)."""
        busy = self.backend is not None and self.backend.busy
        with self.cond:
            if not busy and not self.inbox and not self.stopping:
                waited = time.time()
                self.cond.wait(timeout=self.heartbeat_s)
                if self._last_step_end is not None and self.inbox:
                    self.stats.idle_s += time.time() - waited
            tick = Tick(stop=self.stopping and not busy and not self.inbox)
            while self.inbox:
                job, tag, requests = self.inbox[0]
                want = (job.params, job.longest_prompt)
                if want != self.configured:
                    if busy or tick.admit:
                        break
                    tick.configure = want
                    self.configured = want
                self.label = job.label
                self.inbox.pop(0)
                tick.admit.append((tag, requests))
        return tick

    def _apply(self, tick: Tick) -> None:
        if tick.configure is not None:
            self._configure(*tick.configure)
        for tag, requests in tick.admit:
            if not self.lockstep.is_leader:  # the leader registered its tickets when the shards came in
                self.tickets[tag] = _Ticket(tag[0], len(requests), 0)
            self.backend.submit(requests, tag)

    def _configure(self, params: SamplingParams, longest_prompt: int) -> None:
        """Set the backend up for a job: its batch size agreed by every rank; rebuilt only if that or the
        sampling changed (otherwise its slots just grow to the job's longest prompt)."""
        batch = self.lockstep.agree_min(self.factory.batch_size(params, longest_prompt))
        if self.built != (params, batch):
            self.backend = self.factory.build(params, batch)
            self.built = (params, batch)
            self.stats.batch_size = batch
            if self.lockstep.is_leader:
                ranks = f", the same on each of its {self.lockstep.ranks} ranks" if self.lockstep.ranks > 1 else ""
                log.info("batch size %d (prompts up to %d tokens)%s", batch, longest_prompt, ranks)
        reserve = getattr(self.backend, "reserve", None)
        if reserve is not None:
            reserve(longest_prompt)

    def _advance(self) -> None:
        """One step of the backend, if it has work; its finished rows go to their shards."""
        if self.backend is None or not self.backend.busy:
            return
        t0, c0 = time.time(), time.thread_time()
        if self._last_step_end is None:
            self.stats.first_step_at, self.stats.cpu_at_first_step = t0, time.process_time()
        before = _prompt_counts(self.backend)
        finished = self._step()
        t1 = time.time()
        after = _prompt_counts(self.backend)
        self.stats.prompt_tokens += after[0] - before[0]
        self.stats.encoded_prompt_tokens += after[1] - before[1]
        self.stats.steps += 1
        self.stats.step_s += t1 - t0
        self.stats.step_cpu_s += time.thread_time() - c0
        self._last_step_end = t1
        if finished:
            self._deliver(finished, t1)

    def _step(self) -> list[tuple[Hashable, int, Result]]:
        try:
            return self.backend.step()
        except Exception as e:
            if not self.isolate_rows:
                raise
            dropped = self.backend.reset()
            log.warning("a step over %d rows failed (%s: %s); running them again in halves to isolate it",
                        len(dropped), type(e).__name__, str(e)[:200])
            if len(dropped) == 1:
                return self._run_or_split(dropped)
            half = len(dropped) // 2
            return self._run_or_split(dropped[:half]) + self._run_or_split(dropped[half:])

    def _run_or_split(self, rows: list[tuple[Hashable, int, Request]]) -> list[tuple[Hashable, int, Result]]:
        """Generate `rows` together; if that fails, each half again, down to single rows, so only a row
        that fails alone becomes an error (its outputs do not depend on what it ran beside)."""
        try:
            gens = self.backend.generate([r for _, _, r in rows])
            return [(tag, index, g) for (tag, index, _), g in zip(rows, gens)]
        except Exception as e:  # noqa: BLE001 - isolated below, or this row's error record
            self.backend.reset()
            if len(rows) == 1:
                return [(rows[0][0], rows[0][1], e)]
        half = len(rows) // 2
        return self._run_or_split(rows[:half]) + self._run_or_split(rows[half:])

    def _deliver(self, finished: list, now: float) -> None:
        done: list[tuple[Hashable, _Ticket]] = []
        with self.cond:
            for tag, index, result in finished:
                ticket = self.tickets.get(tag)
                if ticket is None:  # its caller gave up (cannot happen while the loop lives)
                    continue
                if ticket.add(index, result):
                    done.append((tag, ticket))
                if isinstance(result, Generation):
                    self.stats.rows += 1
                    self.stats.output_tokens += len(result.token_ids)
                    ticket.tokens += len(result.token_ids)
                    self.meter.add(ticket.label, len(result.token_ids), result.tokens_per_forward)
            if self.stats.first_row_at is None:
                self.stats.first_row_at = now
            self.stats.last_row_at, self.stats.cpu_at_last_row = now, time.process_time()
        if not done:
            return
        done.sort(key=lambda d: repr(d[0]))
        self.lockstep.check([(tag, generations_digest(t.results)) for tag, t in done])
        with self.cond:
            for tag, ticket in done:
                self.stats.shards += 1
                if not self.lockstep.is_leader:
                    self.tickets.pop(tag, None)
                ticket.done.set()
