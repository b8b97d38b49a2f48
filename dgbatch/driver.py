"""The driver: check, plan, hand shards to replicas, retry, show progress, resume, summarise.

Order matters for users: everything cheap that can fail (config, input schema, checkpoint files,
output fingerprint) is checked before Ray starts or a model loads. Commit state is plain files
under the output root, so a rerun lists `data/` and runs only what is missing.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from dgbatch import __version__, checkpoint, redact
from dgbatch.config import ConfigError, JobConfig
from dgbatch.filters import OutputFilter
from dgbatch.io.commit import list_names, read_json, write_bytes, write_json
from dgbatch.io.fs import filesystem
from dgbatch.io.layout import READER_CONFIG, Layout
from dgbatch.monitor import JobMonitor
from dgbatch.planning.planner import SHARD_FORMAT, ShardMeta, bucket_edges, plan_fragment
from dgbatch.planning.source import InputPlan, inspect_input
from dgbatch.pool import Background, ReplicaPool
from dgbatch.progress import JobProgress
from dgbatch.shard import JobContext
from dgbatch.stats import ShardStats

log = logging.getLogger("dgbatch")

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class Plan:
    fingerprint: str
    edges: list[int]
    num_rows: int
    shards: list[ShardMeta]

    @property
    def longest_prompt(self) -> int:
        """Tokens of the plan's longest prompt (0 for a plan written before shards recorded it)."""
        return max((s.longest_prompt for s in self.shards), default=0)

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "shard_format": SHARD_FORMAT, "edges": self.edges,
                "num_rows": self.num_rows, "shards": [s.__dict__ for s in self.shards]}

    @staticmethod
    def from_dict(d: dict) -> Plan:
        return Plan(d["fingerprint"], d["edges"], d["num_rows"], [ShardMeta.from_dict(s) for s in d["shards"]])


def progress_of(plan: Plan, committed: Collection[str]) -> JobProgress:
    """A job's progress at the start of a run: what earlier runs committed counts as done."""
    done = [s for s in plan.shards if s.shard_id in committed]
    return JobProgress(plan.num_rows, len(plan.shards), rows_committed=sum(s.rows for s in done),
                       shards_done=len(done))


def prompt_padding(plan: Plan) -> float:
    """Fraction of the plan's prompt positions that are padding, batched as the planner assumed."""
    positions = sum(s.padded_positions for s in plan.shards)
    return 1 - sum(s.prompt_tokens for s in plan.shards) / positions if positions else 0.0


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


def reusable_plan(fs, layout: Layout, cfg: JobConfig) -> Plan | None:
    """The plan an interrupted run of this config wrote, if any (an older dgbatch's plan is made again)."""
    manifest = read_json(fs, layout.plan_manifest)
    if (manifest is not None and manifest.get("fingerprint") == cfg.fingerprint()
            and manifest.get("shard_format") == SHARD_FORMAT):
        return Plan.from_dict(manifest)
    return None


def remaining(fs, layout: Layout, plan: Plan) -> tuple[list[ShardMeta], set[str]]:
    """(shards still to run, ids of the committed ones): one listing of data/."""
    committed = {n.removesuffix(".parquet") for n in list_names(fs, layout.data(), ".parquet")}
    return [s for s in plan.shards if s.shard_id not in committed], committed


def make_plan(
    ray, cfg: JobConfig, fs, layout: Layout, model_dir, max_prompt: int, inp: InputPlan | None = None
) -> Plan:
    """The job's plan (reused when an interrupted run of the same config wrote one). One input fragment
    is planned in this process; several in Ray tasks. `ray`: the ray module, or a callable returning it
    once Ray is up (planning can then start before Ray has)."""
    plan = reusable_plan(fs, layout, cfg)
    if plan is not None:
        log.info("reusing plan: %d shards, %d rows", len(plan.shards), plan.num_rows)
        return plan
    t0 = time.time()
    inp = inp or inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    edges = bucket_edges(cfg, inp, checkpoint.load_tokenizer(model_dir), max_prompt)
    args = (edges, str(model_dir), max_prompt, layout.root)
    if len(inp.fragments) == 1:  # not worth a worker process
        results = [plan_fragment(cfg, inp.fragments[0], *args)]
    else:
        ray = ray() if callable(ray) else ray
        task = ray.remote(plan_fragment).options(num_cpus=1, max_retries=2)
        results = ray.get([task.remote(cfg, f, *args) for f in inp.fragments])
    shards = [ShardMeta.from_dict(m) for metas in results for m in metas]
    plan = Plan(cfg.fingerprint(), edges, sum(s.rows for s in shards), shards)  # output rows: x num_samples
    write_json(fs, layout.plan_manifest, plan.to_dict())
    n = cfg.sampling.num_samples
    samples = f" ({inp.num_rows} input rows x {n} samples)" if n > 1 else ""
    log.info("planned %d rows%s into %d shards (bucket edges %s) in %.1fs", plan.num_rows, samples, len(shards),
             edges, time.time() - t0)
    return plan


def run(cfg: JobConfig, extra_columns: Mapping[str, str] = {}, *, pool: ReplicaPool | None = None) -> int:
    """Run (or resume) the job; returns the process exit code. On `pool` (its replicas, model loaded,
    shared with other jobs of the same model and engine), or on replicas started for this job alone.
    `extra_columns`: input columns a job built on this one needs (column -> the config key naming it),
    checked with the others up front."""
    redact.install(cfg)
    t_start = time.time()
    fs, root = filesystem(cfg.output.path, cfg.storage)
    layout = Layout(root)

    # 1. Cheap checks, before Ray or any model: input schema, checkpoint files, sampling, parallel
    #    degrees against the model's shape, output.
    inp = inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows, extra_columns)
    model_dir = checkpoint.local_checkpoint(cfg.model, cfg.storage)
    params = checkpoint.resolve_sampling(model_dir, cfg.sampling)
    max_prompt = checkpoint.max_prompt_tokens(cfg, checkpoint.read_model_config(model_dir), params)
    checkpoint.check_parallel(cfg, model_dir)
    if pool is not None:
        pool.check(cfg)
    check_fingerprint(fs, layout, cfg)
    write_bytes(fs, layout.reader_config, READER_CONFIG.encode())
    if fs.exists(layout.success):
        done = read_json(fs, layout.success) or {}
        print(f"nothing to do: the job at {cfg.output.path} is already complete ({done.get('rows', '?')} rows)")
        return EXIT_OK
    t_checked = time.time()

    # 2. Plan while Ray and the replicas start and load the model (or reuse the plan of an interrupted
    #    run; when that left nothing to run, start neither).
    reused = reusable_plan(fs, layout, cfg)
    ray_up = threading.Event()
    started: dict = {}
    planning = None
    if reused is None:
        planning = Background(lambda: make_plan(lambda: ray_up.wait() and started["pool"].ray, cfg, fs, layout,
                                                model_dir, max_prompt, inp), "dgbatch-plan")
    own = pool is None
    failed: dict[str, str] = {}
    try:
        if reused is None or remaining(fs, layout, reused)[0]:
            started["pool"] = pool = pool or ReplicaPool(cfg)
        ray_up.set()
        plan = planning.result() if planning is not None else reused
        t_planned = time.time()
        todo, committed = remaining(fs, layout, plan)
        if committed:
            print(f"resuming: {len(committed)} of {len(plan.shards)} shards already committed, {len(todo)} to run")

        # 3. Replicas pull shards from one queue; a dead replica's shards go back on it.
        if fs.exists(layout.failed()):  # last run's failures are retried now; this run records its own
            fs.rm(layout.failed(), recursive=True)
        if todo:
            label = redact.scrub(layout.url(fs))  # the job on the metrics
            job = JobContext(cfg.output.path, root, job_meta(cfg, params), cfg.input.id_column, params,
                             plan.longest_prompt, cfg.storage, OutputFilter.of(cfg.output), label)
            monitor = JobMonitor(progress_of(plan, committed), fs, layout, label, pool.run_id,
                                 cfg.output.progress_every_s)
            monitor.metrics.padding(prompt_padding(plan))
            state = "interrupted"
            try:
                failed = pool.run(job, todo, observer=monitor)
                state = "failed" if failed else "finished"
            finally:
                monitor.close(state)
            if own:  # (a shared pool started before this job: its start-up is not this job's)
                _log_start_up(t_start, t_checked, t_planned, pool)
        if failed:
            lost = sum(s.rows for s in todo if s.shard_id in failed)
            log.error("%d shard(s) (%d rows) failed: %s", len(failed), lost, ", ".join(sorted(failed)))
    finally:
        if own and "pool" in started:
            started["pool"].close()
    for sid, reason in failed.items():
        write_json(fs, layout.failed(sid), {"shard": sid, "reason": reason})

    # 4. Summary over all committed shards, this run's and earlier ones'.
    return finish(fs, layout, plan, failed, t_start, len(todo), cfg=cfg, done_before=committed)


def _log_start_up(t_start: float, t_checked: float, t_planned: float, pool: ReplicaPool) -> None:
    """Where the job's start-up went, from the driver process's start to its first generated row."""
    from dgbatch.replica import process_start

    t0 = process_start() or t_start
    stats = [s for s in pool.stats() if s.get("first_row_at")]
    if not stats:
        return
    first = min(stats, key=lambda s: s["first_row_at"])
    rel = lambda t: f"{t - t0:.1f}" if t else "?"
    log.info("start-up (s since the driver started): checks done %s, Ray up %s (ray.init %.1f s), plan ready %s; "
             "replica: process %s, actor init %s, model loaded %s (imports %.1f s, load %.1f s), first step %s, "
             "first row %s", rel(t_checked), rel(pool.timings["ray_up_at"]), pool.timings["ray_init_s"], rel(t_planned),
             rel(first.get("process_start")), rel(first.get("init_at")), rel(first.get("ready_at")),
             first.get("imports_s", 0), first.get("model_load_s", 0), rel(first.get("first_step_at")),
             rel(first.get("first_row_at")))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def finish(fs, layout: Layout, plan: Plan, failed: dict[str, str], t_start: float, ran: int, *,
           cfg: JobConfig | None = None, done_before: Collection[str] = ()) -> int:
    """Write `_summary.json` (and `_SUCCESS` when every shard is committed); `done_before`: the shards
    committed before this run, left out of this run's throughput."""
    from dgbatch.shard import stats_of_output

    total, now = ShardStats(), ShardStats()
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
            st = stats_of_output(fs, layout, sid).to_dict()
            write_json(fs, layout.commit(sid), st)
        total.merge(ShardStats.from_dict(st))
        if sid not in done_before:
            now.merge(ShardStats.from_dict(st))
    t_end = time.time()
    wall = max(t_end - t_start, 1e-9)
    summary = {
        "rows": total.rows,
        "rows_total": plan.num_rows,
        "output_tokens": total.output_tokens,
        "prompt_tokens": total.prompt_tokens,
        "tokens_per_forward": {"mean": total.tpf_mean, "p50": total.tpf_quantile(0.5),
                               "p90": total.tpf_quantile(0.9)},
        "finish_reasons": total.finish_reasons,
        "failed_rows": total.error_rows,
        "kept_rows": total.kept_rows,  # rows with an output that passed output.filters
        "filtered_rows": total.filtered,  # output.filters: filter_reason -> rows
        "duplicate_outputs": total.duplicate_outputs,  # exact duplicates among a prompt's samples
        "failed_shards": [{"shard": s, "reason": r} for s, r in sorted(failed.items())],
        "shards": len(plan.shards),
        "shards_run_now": ran,
        "wall_time_s": round(t_end - t_start, 3),
        "started_at": _iso(t_start),
        "ended_at": _iso(t_end),
        "throughput": {"rows_per_s": round(now.rows / wall, 3),
                       "output_tokens_per_s": round(now.output_tokens / wall, 3),
                       "over": "this run: what it generated / its wall time (start-up included)"},
        "output": layout.url(fs),
        "model": None if cfg is None else {"path": cfg.model.path, "dtype": cfg.model.dtype,
                                           "backend": cfg.engine.backend},
        "dgbatch_version": __version__,
    }
    write_json(fs, layout.summary, summary)
    print("summary: " + redact.scrub(_fmt(summary)) + f"; output in {redact.scrub(layout.url(fs))}/data/")
    if failed:
        print(f"job incomplete: {len(failed)} shard(s) failed: {', '.join(sorted(failed))}; rerun to retry them",
              file=sys.stderr)
        return EXIT_FAILED_SHARDS
    write_json(fs, layout.success, {"rows": total.rows, "shards": len(plan.shards), "completed_at": _iso(t_end)})
    return EXIT_OK


def _fmt(s: dict) -> str:
    tpf = s["tokens_per_forward"]
    f = lambda v: "n/a" if v is None else f"{v:.2f}"
    filtered = "".join(f", {n} filtered ({r})" for r, n in sorted(s["filtered_rows"].items()))
    duplicates = f", {s['duplicate_outputs']} duplicate samples" if s["duplicate_outputs"] else ""
    return (f"{s['rows']:,} rows, {s['output_tokens']:,} output tokens, tokens/forward mean {f(tpf['mean'])} "
            f"p50 {f(tpf['p50'])} p90 {f(tpf['p90'])}, {s['failed_rows']} failed rows{filtered}{duplicates}, "
            f"{len(s['failed_shards'])} failed shards, {s['wall_time_s']:.1f}s")
