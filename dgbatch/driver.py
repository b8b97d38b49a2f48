"""The driver: check, plan, hand shards to replicas, retry, show progress, resume, summarise.

Order matters for users: everything cheap that can fail (config, input schema, checkpoint files,
output fingerprint) is checked before Ray starts or a model loads. Commit state is plain files
under the output root, so a rerun lists `data/` and runs only what is missing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

from dgbatch import __version__, checkpoint, redact
from dgbatch.config import ConfigError, JobConfig
from dgbatch.io.commit import list_names, read_json, write_json
from dgbatch.io.fs import filesystem
from dgbatch.io.layout import Layout
from dgbatch.planning.planner import ShardMeta, bucket_edges, plan_fragment
from dgbatch.planning.source import InputPlan, inspect_input
from dgbatch.stats import ShardStats
from dgbatch.vision import image_tokens

log = logging.getLogger("dgbatch")

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_BAD_INPUT = 0, 1, 2
MAX_PROBES = 120  # ~2 minutes of 1-second readiness probes before a restarting replica is given up
MAX_GROUP_STARTS = 3  # consecutive failed starts (placement, rendezvous, model load) before a group is dropped


@dataclass
class Plan:
    fingerprint: str
    edges: list[int]
    num_rows: int
    shards: list[ShardMeta]

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "edges": self.edges, "num_rows": self.num_rows,
                "shards": [s.__dict__ for s in self.shards]}

    @staticmethod
    def from_dict(d: dict) -> Plan:
        return Plan(d["fingerprint"], d["edges"], d["num_rows"], [ShardMeta.from_dict(s) for s in d["shards"]])


@dataclass
class Progress:
    total_rows: int
    done_rows: int = 0
    out_tokens: int = 0
    start: float = field(default_factory=time.time)
    last_print: float = 0.0

    def add(self, stats: dict) -> None:
        self.done_rows += stats["rows"]
        self.out_tokens += stats["output_tokens"]

    def line(self, base_rows: int) -> str:
        el = max(time.time() - self.start, 1e-9)
        rate = (self.done_rows - base_rows) / el
        left = self.total_rows - self.done_rows
        eta = f"{left / rate:,.0f}s" if rate > 0 else "?"
        pct = 100 * self.done_rows / max(self.total_rows, 1)
        return (f"rows {self.done_rows:,}/{self.total_rows:,} ({pct:.1f}%) | {rate:,.1f} rows/s | "
                f"{self.out_tokens / el:,.0f} output tok/s | ETA {eta}")


def job_meta(cfg: JobConfig, params) -> dict:
    return {"dgbatch_version": __version__, "model_path": cfg.model.path, "sampling": params.__dict__,
            "seed": cfg.sampling.seed, "backend": cfg.engine.backend, "config_fingerprint": cfg.fingerprint()}


def check_fingerprint(fs, layout: Layout, cfg: JobConfig) -> None:
    """Refuse to mix two different jobs' outputs under one root, unless output.force."""
    prev = read_json(fs, layout.job)
    if prev is not None and prev.get("fingerprint") != cfg.fingerprint() and not cfg.output.force:
        raise ConfigError(
            f"output.path {cfg.output.path!r} holds a job with a different config (fingerprint "
            f"{prev.get('fingerprint')} != {cfg.fingerprint()}). Use a new output.path, restore the old "
            f"config, or set output.force=true to resume with this one."
        )
    write_json(fs, layout.job, {"fingerprint": cfg.fingerprint(), "dgbatch_version": __version__,
                                "config": cfg.public_dict()})


def init_ray(cfg: JobConfig):
    import os

    import ray

    if ray.is_initialized():
        return ray
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # under `ray job submit`, or a cluster the user pointed at
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    return ray


def make_plan(
    ray, cfg: JobConfig, fs, layout: Layout, model_dir, max_prompt: int, inp: InputPlan | None = None
) -> Plan:
    manifest = read_json(fs, layout.plan_manifest)
    if manifest is not None and manifest.get("fingerprint") == cfg.fingerprint():
        plan = Plan.from_dict(manifest)
        log.info("reusing plan: %d shards, %d rows", len(plan.shards), plan.num_rows)
        return plan
    t0 = time.time()
    inp = inp or inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    edges = bucket_edges(cfg, inp, checkpoint.load_tokenizer(model_dir), max_prompt, image_tokens(model_dir))
    args = (edges, str(model_dir), max_prompt, layout.root)
    if len(inp.fragments) == 1:  # not worth a worker process
        results = [plan_fragment(cfg, inp.fragments[0], *args)]
    else:
        task = ray.remote(plan_fragment).options(num_cpus=1, max_retries=2)
        results = ray.get([task.remote(cfg, f, *args) for f in inp.fragments])
    shards = [ShardMeta.from_dict(m) for metas in results for m in metas]
    plan = Plan(cfg.fingerprint(), edges, inp.num_rows, shards)
    write_json(fs, layout.plan_manifest, plan.to_dict())
    log.info("planned %d rows into %d shards (bucket edges %s) in %.1fs", inp.num_rows, len(shards), edges,
             time.time() - t0)
    return plan


def run(cfg: JobConfig) -> int:
    """Run (or resume) the job; returns the process exit code."""
    redact.install(cfg)
    t_start = time.time()
    fs, root = filesystem(cfg.output.path, cfg.storage)
    layout = Layout(root)

    # 1. Cheap checks, before Ray or any model: input schema, checkpoint files, sampling, parallel
    #    degrees against the model's shape, output.
    inp = inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    model_dir = checkpoint.local_checkpoint(cfg.model, cfg.storage)
    params = checkpoint.resolve_sampling(model_dir, cfg.sampling)
    max_prompt = checkpoint.max_prompt_tokens(cfg, checkpoint.read_model_config(model_dir), params)
    checkpoint.check_parallel(cfg, model_dir)
    check_fingerprint(fs, layout, cfg)
    if fs.exists(layout.success):
        done = read_json(fs, layout.success) or {}
        print(f"nothing to do: the job at {cfg.output.path} is already complete ({done.get('rows', '?')} rows)")
        return EXIT_OK

    # 2. Plan (or reuse the plan of an interrupted run), then see what is already committed.
    ray = init_ray(cfg)
    plan = make_plan(ray, cfg, fs, layout, model_dir, max_prompt, inp)
    committed = set(n.removesuffix(".parquet") for n in list_names(fs, layout.data(), ".parquet"))
    todo = [s for s in plan.shards if s.shard_id not in committed]
    progress = Progress(plan.num_rows)
    progress.done_rows = sum(s.rows for s in plan.shards if s.shard_id in committed)
    base_rows = progress.done_rows
    if committed:
        print(f"resuming: {len(committed)} of {len(plan.shards)} shards already committed, {len(todo)} to run")

    # 3. Replicas pull shards from one queue; a dead replica's shard goes back on it.
    if fs.exists(layout.failed()):  # last run's failures are retried now; this run records its own
        fs.rm(layout.failed(), recursive=True)
    failed: dict[str, str] = {}
    if todo:
        failed = schedule(ray, cfg, layout, job_meta(cfg, params), todo, progress, base_rows)
    for sid, reason in failed.items():
        write_json(fs, layout.failed(sid), {"shard": sid, "reason": reason})

    # 4. Summary over all committed shards, this run's and earlier ones'.
    return finish(fs, layout, plan, failed, t_start, len(todo))


@dataclass
class _Call:
    """Refs of one request to one replica: a shard (one ref per rank), a readiness probe or a start."""

    replica: int
    kind: str  # "shard" | "probe" | "start"
    shard: str | None
    refs: list
    started: float = field(default_factory=time.time)
    pending: int = 0
    result: dict | None = None
    error: Exception | None = None  # a failure that left the group in step (the leader's GroupStillInStep)

    def __post_init__(self) -> None:
        self.pending = len(self.refs)


def schedule(ray, cfg: JobConfig, layout: Layout, meta: dict, todo: list[ShardMeta], progress: Progress,
             base_rows: int) -> dict[str, str]:
    from dgbatch.placement import make_replicas
    from dgbatch.replica import GroupStillInStep

    r = cfg.replicas
    run_id = uuid.uuid4().hex[:8]
    replicas = make_replicas(ray, cfg, layout.root, meta, run_id)
    if cfg.parallel.world_size > 1:
        print(f"starting {len(replicas)} replica group(s) of {replicas[0].describe()} "
              f"(actors replica-N-gG-{run_id}-rankR, namespace dgbatch)", flush=True)
    else:
        print(f"starting {len(replicas)} replica(s) (names replica-N-{run_id}, namespace dgbatch)", flush=True)
    queue = deque(s.shard_id for s in todo)
    rows_of = {s.shard_id: s.rows for s in todo}
    attempts: Counter[str] = Counter()
    failed: dict[str, str] = {}
    inflight: dict = {}  # ref -> _Call
    idle: list[int] = []
    probe_at: dict[int, float] = {}  # restarting single replicas: when to ask again whether they are back
    probe_failures: Counter[int] = Counter()
    start_failures: Counter[int] = Counter()  # replica groups: consecutive starts that failed
    last_actor_error = ""
    actor_errors = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

    def submit(a: int, kind: str, shard: str | None, refs: list) -> None:
        call = _Call(a, kind, shard, refs)
        for ref in refs:
            inflight[ref] = call

    def start(a: int) -> None:
        refs = replicas[a].start()
        if refs:
            submit(a, "start", None, refs)
        else:
            idle.append(a)

    def tear_down(call: _Call, err: Exception) -> None:
        """A group failed: drop its refs, kill every rank and the placement group, start a new one."""
        nonlocal last_actor_error
        a = call.replica
        for ref in call.refs:
            inflight.pop(ref, None)
        replicas[a].kill()
        last_actor_error = _brief(err)
        if call.shard is not None:
            _retry_or_fail(call.shard, err, attempts, failed, queue, r.max_shard_attempts)
        start_failures[a] = start_failures[a] + 1 if call.kind == "start" else 0
        if start_failures[a] >= MAX_GROUP_STARTS:
            log.error("replica group %d failed to start %d times in a row; dropping it (last: %s)", a,
                      MAX_GROUP_STARTS, last_actor_error)
            return
        log.warning("replica group %d torn down (%s); starting a new one", a, last_actor_error)
        start(a)

    for a in range(len(replicas)):
        start(a)
    try:
        while queue or any(c.kind == "shard" for c in inflight.values()):
            now = time.time()
            for a, at in list(probe_at.items()):
                if at <= now:
                    del probe_at[a]
                    submit(a, "probe", None, replicas[a].probe())
            for call in {id(c): c for c in inflight.values()}.values():
                if call.kind == "start" and now - call.started > cfg.parallel.startup_timeout_s:
                    tear_down(call, TimeoutError(
                        f"replica group {call.replica} ({replicas[call.replica].describe()}) was not up "
                        f"{cfg.parallel.startup_timeout_s:g} s after it was created: not enough resources for its "
                        f"placement group, or a slow model load (parallel.startup_timeout_s)"))
            while queue and idle:
                a, sid = idle.pop(0), queue.popleft()
                submit(a, "shard", sid, replicas[a].run(sid))
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)  # short: Ctrl-C stays prompt
            for ref in ready:
                call = inflight.pop(ref, None)
                if call is None:  # its group was torn down meanwhile
                    continue
                a, sid = call.replica, call.shard
                try:
                    value = ray.get(ref)
                except (*actor_errors, ray.exceptions.RayTaskError) as e:
                    if not replicas[a].restartable:
                        cause = getattr(e, "cause", None)
                        if call.kind == "shard" and isinstance(cause, GroupStillInStep) and ref is call.refs[0]:
                            call.error, call.pending = e, call.pending - 1  # wait for the other ranks' returns
                        else:
                            tear_down(call, e)
                            continue
                    else:
                        if isinstance(e, actor_errors):  # dead or restarting: wait until Ray has it back
                            probe_failures[a] += sid is None
                            last_actor_error = redact.scrub(str(e).strip().splitlines()[-1][:500])
                            if probe_failures[a] < MAX_PROBES:
                                probe_at[a] = time.time() + 1.0
                            else:
                                log.error("replica %d did not come back after %d probes; dropping it", a, MAX_PROBES)
                        else:
                            idle.append(a)
                        if sid is not None:
                            _retry_or_fail(sid, e, attempts, failed, queue, r.max_shard_attempts)
                        continue
                else:
                    call.pending -= 1
                    if ref is call.refs[0]:
                        call.result = value
                if call.pending:
                    continue
                probe_failures[a] = 0
                if call.kind == "start":
                    start_failures[a] = 0
                idle.append(a)
                if call.kind == "shard":
                    if call.error is not None:
                        _retry_or_fail(sid, call.error, attempts, failed, queue, r.max_shard_attempts)
                    else:
                        progress.add(call.result)
            if queue and not (idle or inflight or probe_at):  # every replica is gone
                for sid in queue:
                    failed[sid] = f"no replica left to run it; last replica error: {last_actor_error}"
                queue.clear()
            if time.time() - progress.last_print >= 5.0:
                progress.last_print = time.time()
                print(progress.line(base_rows), flush=True)
        print(progress.line(base_rows), flush=True)
    finally:
        for replica in replicas:
            replica.kill()
    if failed:
        lost = sum(rows_of[s] for s in failed)
        log.error("%d shard(s) (%d rows) failed: %s", len(failed), lost, ", ".join(sorted(failed)))
    return failed


def _brief(err: Exception) -> str:
    """An error in one scrubbed line for logs and failure records: its type and its message's last line."""
    return redact.scrub(f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:500]}")


def _retry_or_fail(sid: str, err: Exception, attempts: Counter, failed: dict, queue: deque, limit: int) -> None:
    attempts[sid] += 1
    reason = _brief(err)
    if attempts[sid] >= limit:
        failed[sid] = f"failed {attempts[sid]} attempts; last: {reason}"
        log.error("shard %s failed for good: %s", sid, reason)
    else:
        log.warning("shard %s attempt %d failed (%s); requeued", sid, attempts[sid], reason)
        queue.append(sid)


def finish(fs, layout: Layout, plan: Plan, failed: dict[str, str], t_start: float, ran: int) -> int:
    from dgbatch.shard import stats_of_output

    total = ShardStats()
    ids = [s.shard_id for s in plan.shards if s.shard_id not in failed]
    markers = {n.removesuffix(".json") for n in list_names(fs, layout.commit(), ".json")}
    paths = [layout.commit(sid) for sid in ids if sid in markers]
    blobs = fs.cat(paths, on_error="omit") if paths else {}  # one batched (concurrent on S3) read
    by_path = {fs._strip_protocol(p): b for p, b in blobs.items()}
    for sid in ids:
        blob = by_path.get(fs._strip_protocol(layout.commit(sid)))
        if blob is not None:
            st = json.loads(blob)
        else:  # committed data whose marker was never written (a crash in between)
            st = stats_of_output(fs, layout.data(sid)).to_dict()
            write_json(fs, layout.commit(sid), st)
        total.merge(ShardStats.from_dict(st))
    summary = {
        "rows": total.rows,
        "rows_total": plan.num_rows,
        "output_tokens": total.output_tokens,
        "prompt_tokens": total.prompt_tokens,
        "tokens_per_forward": {"mean": total.tpf_mean, "p50": total.tpf_quantile(0.5),
                               "p90": total.tpf_quantile(0.9)},
        "finish_reasons": total.finish_reasons,
        "failed_rows": total.error_rows,
        "failed_shards": [{"shard": s, "reason": r} for s, r in sorted(failed.items())],
        "shards": len(plan.shards),
        "shards_run_now": ran,
        "wall_time_s": round(time.time() - t_start, 3),
    }
    write_json(fs, layout.summary, summary)
    print("summary: " + redact.scrub(_fmt(summary)))
    if failed:
        print(f"job incomplete: {len(failed)} shard(s) failed: {', '.join(sorted(failed))}; rerun to retry them",
              file=sys.stderr)
        return EXIT_FAILED_SHARDS
    write_json(fs, layout.success, {"rows": total.rows, "shards": len(plan.shards),
                                    "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return EXIT_OK


def _fmt(s: dict) -> str:
    tpf = s["tokens_per_forward"]
    f = lambda v: "n/a" if v is None else f"{v:.2f}"
    return (f"{s['rows']:,} rows, {s['output_tokens']:,} output tokens, tokens/forward mean {f(tpf['mean'])} "
            f"p50 {f(tpf['p50'])} p90 {f(tpf['p90'])}, {s['failed_rows']} failed rows, "
            f"{len(s['failed_shards'])} failed shards, {s['wall_time_s']:.1f}s")
