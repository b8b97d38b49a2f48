"""The driver: check, plan, hand shards to replicas, retry, show progress, resume, summarise.

Order matters for users: everything cheap that can fail (config, storage access, input schema and
identity, checkpoint files and tokenizer, the output root) is checked before Ray starts or a model
loads (`check_job`), and raises a JobError: exit 2, one line. Commit state is plain files under the
output root, checked rather than trusted (`dgbatch/commits.py`), so a rerun runs only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgbatch import __version__, checkpoint, commits, redact
from dgbatch.config import ConfigError, JobConfig, fingerprint_of
from dgbatch.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED_SHARDS,
    EXIT_OK,
    JobError,
    note_stop_signal,
    root_cause,
    stop_signal,
)
from dgbatch.filters import OutputFilter
from dgbatch.io import retry
from dgbatch.io.commit import put_exclusive, read_json, write_bytes, write_json
from dgbatch.io.fs import StorageError, StorageUnavailable, check_access, filesystem, join, overlap
from dgbatch.io.layout import READER_CONFIG, Layout, unowned_entries
from dgbatch.monitor import JobMonitor
from dgbatch.planning import ids
from dgbatch.planning.planner import SHARD_FORMAT, ShardMeta, bucket_edges, plan_fragment, plan_fragment_with_id_digests
from dgbatch.planning.source import InputError, InputPlan, input_changes, inspect_input, read_fragment
from dgbatch.pool import Background, ReplicaPool
from dgbatch.progress import JobProgress
from dgbatch.shard import JobContext
from dgbatch.stats import ShardStats
from dgbatch.vision import image_tokens

log = logging.getLogger("dgbatch")

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED_SHARDS", "EXIT_OK", "run"]


@dataclass
class Plan:
    fingerprint: str  # the plan id: fingerprint of `plan_identity` (config that shapes the plan + the input)
    edges: list[int]
    num_rows: int
    shards: list[ShardMeta]
    input: list = field(default_factory=list)  # InputPlan.identity() of the input it was made from

    @property
    def longest_prompt(self) -> int:
        """Tokens of the plan's longest prompt (0 for a plan written before shards recorded it)."""
        return max((s.longest_prompt for s in self.shards), default=0)

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "shard_format": SHARD_FORMAT, "edges": self.edges,
                "num_rows": self.num_rows, "input": self.input, "shards": [s.__dict__ for s in self.shards]}

    @staticmethod
    def from_dict(d: dict) -> Plan:
        return Plan(d["fingerprint"], d["edges"], d["num_rows"], [ShardMeta.from_dict(s) for s in d["shards"]],
                    d.get("input", []))

    def shard_rows(self) -> dict[str, int]:
        return {s.shard_id: s.rows for s in self.shards}


def progress_of(plan: Plan, committed: Collection[str]) -> JobProgress:
    """A job's progress at the start of a run: what earlier runs committed counts as done."""
    done = [s for s in plan.shards if s.shard_id in committed]
    return JobProgress(plan.num_rows, len(plan.shards), rows_committed=sum(s.rows for s in done),
                       shards_done=len(done))


def prompt_padding(plan: Plan) -> float:
    """Fraction of the plan's prompt positions that are padding, batched as the planner assumed."""
    positions = sum(s.padded_positions for s in plan.shards)
    return 1 - sum(s.prompt_tokens for s in plan.shards) / positions if positions else 0.0


def job_meta(cfg: JobConfig, params, plan: Plan | None = None, fingerprint: str | None = None) -> dict:
    """What every data file's footer carries (with its shard id): provenance, and the plan it belongs to."""
    return {"dgbatch_version": __version__, "model_path": cfg.model.path, "sampling": params.__dict__,
            "seed": cfg.sampling.seed, "backend": cfg.engine.backend,
            "config_fingerprint": fingerprint or cfg.fingerprint(), "plan": plan.fingerprint if plan else ""}


# ---- before Ray: every check that can fail cheaply ------------------------------------------------


@dataclass
class CheckedJob:
    """What `check_job` established; everything after it may rely on it."""

    fs: Any
    layout: Layout
    inp: InputPlan
    model_dir: Path
    params: Any  # SamplingParams, resolved
    max_prompt: int
    tokenizer: Any
    identity: dict[str, Any]  # JobConfig.identity over resolved values
    record: dict  # the output's _job.json

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.identity)


def check_job(cfg: JobConfig, extra_columns: Mapping[str, str] = {}) -> CheckedJob:
    """Everything that can refuse the job before Ray starts or a model loads; raises JobError.
    `extra_columns`: input columns a job built on this one needs (column -> the config key naming it)."""
    fs, root = filesystem(cfg.output.path, cfg.storage)
    layout = Layout(root)
    for what, url in (("input.path", cfg.input.path), ("output.path", cfg.output.path), ("model.path", cfg.model.path)):
        if "://" in url and not url.startswith("file://") and (what != "input.path" or cfg.input.format == "parquet"):
            check_access(url, cfg.storage, what)
    inp = inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows, extra_columns)
    check_disjoint(cfg, inp)
    model_dir, params, max_prompt = checkpoint.resolve(cfg)
    tokenizer = checkpoint.check_tokenizer(model_dir, cfg.model.path)
    checkpoint.check_parallel(cfg, model_dir)
    identity = job_identity(cfg, model_dir, params, max_prompt)
    record = check_fingerprint(fs, layout, cfg, identity)  # before any write: the root may not be ours
    check_writable(fs, layout, cfg.output.path)
    job = CheckedJob(fs, layout, inp, model_dir, params, max_prompt, tokenizer, identity, record)
    check_plan(cfg, job)
    return job


def job_identity(cfg: JobConfig, model_dir: Path, params, max_prompt: int) -> dict[str, Any]:
    """The job's identity over resolved values: sampling as resolved against the checkpoint, the prompt
    limit in force, and the checkpoint's digest."""
    resolved: dict[str, Any] = {f"sampling.{k}": v for k, v in params.__dict__.items()}
    resolved.update({"model.max_prompt_tokens": max_prompt, "model.checkpoint": checkpoint.checkpoint_digest(model_dir)})
    return cfg.identity(resolved)


def resolved_fingerprint(cfg: JobConfig) -> str:
    """The fingerprint a run of `cfg` records in `_job.json` (over resolved values), without Ray or a model:
    what `dgbatch plan`, a backfill's skip check and an eval compare an existing output against."""
    return fingerprint_of(job_identity(cfg, *checkpoint.resolve(cfg)))


def check_disjoint(cfg: JobConfig, inp: InputPlan) -> None:
    """The output may not lie inside the input (a rerun would read its own outputs), nor the input inside it."""
    url = cfg.input.path
    scanned = f"{url.split('://', 1)[0]}://{inp.scan_root}" if "://" in url and not url.startswith("file://") else (
        inp.scan_root)
    where = overlap(cfg.output.path, scanned)
    if where is None:
        return
    if where in ("a_in_b", "same"):
        raise ConfigError(f"output.path {cfg.output.path!r} lies inside input.path {cfg.input.path!r}: a rerun "
                          f"would read the job's own outputs as input; write the output elsewhere")
    raise ConfigError(f"input.path {cfg.input.path!r} lies inside output.path {cfg.output.path!r}: the job would "
                      f"write where it reads; move the input or choose another output.path")


def check_writable(fs, layout: Layout, url: str) -> None:
    """Write and remove one hidden probe file in the (claimed) root, so a read-only output fails now, not
    after the plan."""
    probe = join(layout.root, f".dgbatch-probe.{uuid.uuid4().hex}.tmp")
    if fs.isfile(layout.root):
        raise ConfigError(f"output.path {url!r} is a file; it must be a directory (or absent)")
    try:
        write_bytes(fs, probe, b"")
        fs.rm(probe)
    except OSError as e:
        raise StorageError(f"output.path {url!r} is not writable: {e.strerror or e}") from None


def _read_job_file(fs, layout: Layout, url: str) -> dict | None:
    try:
        prev = read_json(fs, layout.job)
    except NotADirectoryError:
        raise ConfigError(f"output.path {url!r} is a file; it must be a directory (or absent)") from None
    except (ValueError, UnicodeDecodeError):
        prev = "unreadable"
    if prev is not None and not (isinstance(prev, dict) and isinstance(prev.get("fingerprint"), str)):
        raise ConfigError(f"output.path {url!r}: its _job.json is not a dgbatch job file; the root holds something "
                          f"else. Use a new output.path")
    return prev


def check_fingerprint(fs, layout: Layout, cfg: JobConfig, identity: dict[str, Any] | None = None) -> dict:
    """Claim the output root for this job, or check that it already holds this job; returns its _job.json.

    A new root must be absent or empty. The job file is created exclusively (as shards are), so of two
    drivers with different configs starting at once on one output exactly one wins; the other, like any
    rerun whose identity differs, is refused with the keys that differ, unless output.force (then this
    config owns the root from now on).
    """
    identity = identity if identity is not None else cfg.identity()
    fingerprint = fingerprint_of(identity)
    record = {"fingerprint": fingerprint, "job_id": uuid.uuid4().hex, "dgbatch_version": __version__,
              "identity": identity, "config": cfg.public_dict()}
    prev = _read_job_file(fs, layout, cfg.output.path)
    if prev is None:
        try:
            found = unowned_entries(fs, layout.root)
        except NotADirectoryError:
            raise ConfigError(f"output.path {cfg.output.path!r} is a file; it must be a directory (or absent)") from None
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise ConfigError(f"output.path {cfg.output.path!r} is not empty and holds no dgbatch job (_job.json); "
                              f"found {shown}. dgbatch writes only into an empty directory or its own output: "
                              f"use a new output.path")
        blob = (json.dumps(record, indent=2, default=str) + "\n").encode()
        try:
            if put_exclusive(fs, layout.job, blob):
                return record
        except OSError as e:
            raise StorageError(f"output.path {cfg.output.path!r} is not writable: {e.strerror or e}") from None
        prev = _read_job_file(fs, layout, cfg.output.path)  # another driver created it first
    if prev["fingerprint"] == fingerprint:
        return prev
    differ = identity_changes(prev.get("identity"), identity)
    if not cfg.output.force:
        what = f": {'; '.join(differ)}" if differ else f" (fingerprint {prev['fingerprint']} != {fingerprint})"
        raise ConfigError(f"output.path {cfg.output.path!r} holds a job with a different config{what}. Use a new "
                          f"output.path, restore the old config, or set output.force=true to resume with this one")
    log.warning("output.force: resuming %s with a different config (%s)", cfg.output.path, "; ".join(differ) or "?")
    record["job_id"] = prev.get("job_id", record["job_id"])
    write_json(fs, layout.job, record)
    return record


def identity_changes(before: dict | None, now: dict[str, Any], limit: int = 8) -> list[str]:
    """`key: old -> new` for each identity key that differs (nothing when `before` is unknown)."""
    if not isinstance(before, dict):
        return []
    keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    out = [f"{k} {_short(before.get(k))} -> {_short(now.get(k))}" for k in keys[:limit]]
    return out + ([f"and {len(keys) - limit} more"] if len(keys) > limit else [])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Besides input.* and plan.*, what shapes a plan: the tokenizer, the prompt limit, and the samples per row.
PLAN_KEYS = ("model.checkpoint", "model.max_prompt_tokens", "sampling.num_samples")


def plan_identity(identity: dict[str, Any], inp: InputPlan) -> dict[str, Any]:
    """What a plan depends on: the input's files and its settings, the plan settings, the tokenizer and the
    prompt-length limit. Its fingerprint is the plan id that every data file and commit marker names."""
    keep = {k: v for k, v in identity.items() if k.startswith(("input.", "plan.")) or k in PLAN_KEYS}
    keep["input.files"] = inp.identity()
    return keep


def _read_manifest(fs, layout: Layout) -> dict | None:
    try:
        m = read_json(fs, layout.plan_manifest)
    except (ValueError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("shards"), list) else None


def check_plan(cfg: JobConfig, job: CheckedJob) -> None:
    """A stored plan made from other input files is refused, naming them (input.on_change=replan: discarded)."""
    manifest = _read_manifest(job.fs, job.layout)
    plan_id = fingerprint_of(plan_identity(job.identity, job.inp))
    if manifest is None or manifest.get("fingerprint") == plan_id:
        return
    changes = input_changes(manifest["input"], job.inp.identity()) if "input" in manifest else []
    if changes and cfg.input.on_change == "refuse":
        raise InputError(f"the input changed since this job was planned: {', '.join(changes)}. Set "
                         f"input.on_change=replan to plan it again (the old plan's outputs are discarded), or write "
                         f"to a new output.path")
    why = f"the input changed ({', '.join(changes)})" if changes else "the plan's settings changed"
    discard_plan(job.fs, job.layout, why)


def discard_plan(fs, layout: Layout, why: str) -> None:
    """Remove a stale plan and everything made from it (outputs, markers, failures, summary, _SUCCESS)."""
    committed = len([n for n in _ls(fs, layout.data()) if n.endswith(".parquet")])
    print(f"replanning: {why}; discarding the old plan and its {committed} committed shard(s)", flush=True)
    for path in (layout.success, layout.summary, layout.plan_manifest):
        if fs.exists(path):
            fs.rm(path)
    for path in (layout.data(), layout.commit(), layout.failed(), join(layout.root, "_plan")):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _ls(fs, path: str) -> list[str]:
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


# ---- the plan --------------------------------------------------------------------------------------


def reusable_plan(fs, layout: Layout, plan_id: str) -> Plan | None:
    """The stored plan if it was made from this input with these settings (an older dgbatch's plan is made
    again)."""
    manifest = _read_manifest(fs, layout)
    if (manifest is not None and manifest.get("fingerprint") == plan_id
            and manifest.get("shard_format") == SHARD_FORMAT):
        return Plan.from_dict(manifest)
    return None


def remaining(fs, layout: Layout, plan: Plan) -> tuple[list[ShardMeta], set[str]]:
    """(shards still to run, ids of the committed ones), committed as checked (`commits.verify`), not assumed
    from a file's name."""
    committed = commits.verify(fs, layout, plan.fingerprint, plan.shard_rows()).shards
    return [s for s in plan.shards if s.shard_id not in committed], committed


def make_plan(
    ray, cfg: JobConfig, fs, layout: Layout, model_dir, max_prompt: int, inp: InputPlan | None = None,
    identity: dict[str, Any] | None = None, tokenizer=None, retries: Counter[str] | None = None,
) -> Plan:
    """The stored plan if it was made from this input with these settings, else a new one. One input
    fragment is planned in this process, several in Ray tasks. `ray`: the ray module, a callable returning
    it once Ray is up (planning can then start before Ray has), or None (every fragment in this process).
    `retries` gets the storage retries the planning tasks made (this process's own stay in `retry`)."""
    inp = inp or inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    identity = identity if identity is not None else cfg.identity({"model.max_prompt_tokens": max_prompt})
    plan_id = fingerprint_of(plan_identity(identity, inp))
    plan = reusable_plan(fs, layout, plan_id)
    if plan is not None:
        log.info("reusing plan: %d shards, %d rows", len(plan.shards), plan.num_rows)
        return plan
    t0 = time.time()
    edges = bucket_edges(cfg, inp, tokenizer or checkpoint.load_tokenizer(model_dir), max_prompt,
                         image_tokens(model_dir))
    try:
        shards = _plan_fragments(ray, cfg, inp, (edges, str(model_dir), max_prompt, layout.root),
                                 retries if retries is not None else Counter())
    except Exception as e:
        cause = root_cause(e)
        if isinstance(cause, JobError):
            raise cause from None
        if isinstance(cause, OSError):
            raise StorageError(f"planning could not read the input or write under output.path {cfg.output.path!r}: "
                               f"{cause.strerror or cause}") from None
        raise
    plan = Plan(plan_id, edges, sum(s.rows for s in shards), shards, inp.identity())  # output rows: x num_samples
    write_json(fs, layout.plan_manifest, plan.to_dict())
    n = cfg.sampling.num_samples
    samples = f" ({inp.num_rows} input rows x {n} samples)" if n > 1 else ""
    log.info("planned %d rows%s into %d shards (bucket edges %s) in %.1fs", plan.num_rows, samples, len(shards),
             edges, time.time() - t0)
    return plan


def _plan_fragments(ray, cfg: JobConfig, inp: InputPlan, args: tuple, retries: Counter[str]) -> list[ShardMeta]:
    """Plan every fragment: Ray tasks, or in this process for one fragment (or without Ray: `ray` None).
    Each task's storage retries are added to `retries`.

    With `input.id_column`, ids are checked across fragments too, by hashed partitions: each task returns
    its digests per partition (as separate objects), one task per partition looks for repeats; the driver
    only passes object refs along and sees the few duplicates found.
    """
    frags = inp.fragments
    local = ray is None or len(frags) == 1
    if not local and callable(ray):  # Ray is starting beside the planning: wait for it only now
        ray = ray()
    if not cfg.input.id_column:
        if local:
            results = [plan_fragment(cfg, f, *args) for f in frags]
        else:
            task = ray.remote(_counting_retries(plan_fragment)).options(num_cpus=1, max_retries=2, num_returns=2)
            refs = [task.remote(cfg, f, *args) for f in frags]
            results = ray.get([r[0] for r in refs])
            for counts in ray.get([r[1] for r in refs]):
                retries.update(counts)
        return [ShardMeta.from_dict(m) for metas in results for m in metas]
    parts = ids.num_parts(inp.num_rows)
    if local:
        outs = [plan_fragment_with_id_digests(cfg, f, *args, parts) for f in frags]
        results = [o[0] for o in outs]
        pairs = [p for i in range(parts) for p in ids.duplicates(*[o[1 + i] for o in outs])]
    else:
        task = ray.remote(_counting_retries(plan_fragment_with_id_digests)).options(
            num_cpus=1, max_retries=2, num_returns=2 + parts)
        refs = [task.remote(cfg, f, *args, parts) for f in frags]
        results = ray.get([r[0] for r in refs])
        for counts in ray.get([r[-1] for r in refs]):
            retries.update(counts)
        check = ray.remote(ids.duplicates).options(num_cpus=1)
        pairs = [p for found in ray.get([check.remote(*[r[1 + i] for r in refs]) for i in range(parts)])
                 for p in found]
    _refuse_duplicate_ids(cfg, inp, pairs)
    return [ShardMeta.from_dict(m) for metas in results for m in metas]


def _counting_retries(fn):
    """`fn` as a planning task that also returns, last, the storage retries its worker made meanwhile: they
    would otherwise stay in the worker, uncounted in the job's summary."""

    def task(*args):
        out = fn(*args)
        return (*out, retry.drain()) if isinstance(out, tuple) else (out, retry.drain())

    task.__name__ = task.__qualname__ = fn.__name__  # what Ray names the task
    return task


def _refuse_duplicate_ids(cfg: JobConfig, inp: InputPlan, pairs: list) -> None:
    col = cfg.input.id_column
    for (fa, ra), (fb, rb) in pairs:
        a, b = inp.fragments[fa], inp.fragments[fb]
        va = read_fragment(a, cfg.input, cfg.storage, columns=[col]).column(col)[ra].as_py()
        vb = read_fragment(b, cfg.input, cfg.storage, columns=[col]).column(col)[rb].as_py()
        if str(va) == str(vb):  # not a 128-bit hash collision
            raise InputError(f"input.id_column {col!r} has duplicate values: {str(va)[:80]!r} at {a.label!r} row "
                             f"{a.row_start + ra} and {b.label!r} row {b.row_start + rb}; ids must be unique")


# ---- the run ---------------------------------------------------------------------------------------


def run(cfg: JobConfig, extra_columns: Mapping[str, str] = {}, *, pool: ReplicaPool | None = None) -> int:
    """Run (or resume) the job; returns the process exit code. On `pool` (its replicas, model loaded,
    shared with other jobs of the same model and engine), or on replicas started for this job alone.
    `extra_columns`: input columns a job built on this one needs (column -> the config key naming it),
    checked with the others up front."""
    redact.install(cfg)
    t_start = time.time()
    if pool is not None:
        pool.check(cfg)

    # 1. Cheap checks, before Ray or any model (check_job), and a finished job whose outputs check out.
    job = check_job(cfg, extra_columns)
    fs, layout = job.fs, job.layout
    write_bytes(fs, layout.reader_config, READER_CONFIG.encode())
    if already_complete(job):
        done = read_json(fs, layout.success) or {}
        print(f"nothing to do: the job at {cfg.output.path} is already complete ({done.get('rows', '?')} rows)")
        return EXIT_OK
    t_checked = time.time()

    # 2. Plan while Ray and the replicas start and load the model, or reuse the plan of an interrupted
    #    run (when its committed shards, checked, leave nothing to run: start neither).
    reused = reusable_plan(fs, layout, fingerprint_of(plan_identity(job.identity, job.inp)))
    left = remaining(fs, layout, reused) if reused is not None else None
    ray_up = threading.Event()
    started: dict = {}
    planning = None
    planned_retries: Counter[str] = Counter()  # the planning tasks' storage retries
    if reused is None:
        planning = Background(lambda: make_plan(lambda: ray_up.wait() and started["pool"].ray, cfg, fs, layout,
                                                job.model_dir, job.max_prompt, job.inp, job.identity, job.tokenizer,
                                                planned_retries),
                              "dgbatch-plan")
    own = pool is None
    fresh = False  # the pool's start-up is this job's: it started the pool (its own, or a shared one not yet up)
    failed: dict[str, str] = {}
    encoding: dict | None = None
    retries: Counter[str] = Counter()  # this run's: shard attempts run again, storage retries by kind
    wrap_up = contextlib.ExitStack()
    late = StopSignalsNoted()  # from the last shard on, a stop signal is noted: the summary gets written
    with wrap_up:
        try:
            try:
                if left is None or left[0]:
                    started["pool"] = pool = pool or ReplicaPool(cfg, start=False)
                    fresh = not pool.started
                    pool.start()
                    check_shared_output(pool.ray, cfg)
            finally:
                ray_up.set()
            if planning is not None:
                plan = planning.result()
                retries.update(planned_retries)
                left = remaining(fs, layout, plan)
            else:
                plan = reused
            t_planned = time.time()
            todo, committed = left
            if committed:
                print(f"resuming: {len(committed)} of {len(plan.shards)} shards already committed, {len(todo)} to run")

            # 3. Replicas pull shards from one queue; a dead replica's shards go back on it.
            clear_failures(fs, layout)  # last run's failures are retried now; this run records its own
            if todo:
                label = redact.scrub(layout.url(fs))  # the job on the metrics
                context = JobContext(cfg.output.path, layout.root, job_meta(cfg, job.params, plan, job.fingerprint),
                                     cfg.input.id_column, job.params, plan.longest_prompt, cfg.storage,
                                     OutputFilter.of(cfg.output), cfg.input, label)
                before = (0, 0) if own else _prompt_encoding(pool.stats())  # a shared pool's earlier jobs
                monitor = JobMonitor(progress_of(plan, committed), fs, layout, label, pool.run_id,
                                     cfg.output.progress_every_s)
                monitor.metrics.padding(prompt_padding(plan))
                state = "interrupted"
                try:
                    failed = pool.run(context, todo, observer=monitor)
                    state = "failed" if failed else "finished"
                    wrap_up.enter_context(late)
                except StorageUnavailable as e:  # nothing more can be committed: stop now, keep what is
                    state = "failed"
                    raise StorageUnavailable(
                        f"{e.line()}. The job stopped early: {monitor.p.rows_committed:,} of {plan.num_rows:,} rows are "
                        f"committed and kept; rerun the same command once the storage answers") from None
                except KeyboardInterrupt as e:  # SIGINT / SIGTERM: stop the replicas, say so in the summary
                    with StopSignalsNoted():  # a second Ctrl-C must not cut the summary short
                        monitor.close(state)
                        if own:
                            pool.close()
                        signum = stop_signal() or (e.args[0] if e.args and e.args[0] in STOP_SIGNALS else signal.SIGINT)
                        retries.update(monitor.storage_retries)
                        retries["shard_attempts"] += sum(pool.scheduler.attempts.values())
                        summarize(fs, layout, plan, {}, t_start, len(todo), cfg=cfg, done_before=committed,
                                  retries=retries, interrupted=signal.Signals(signum).name)
                    raise
                finally:
                    monitor.close(state)
                retries.update(monitor.storage_retries)
                retries["shard_attempts"] += sum(pool.scheduler.attempts.values())
                after = _prompt_encoding(pool.stats())
                encoding = {"prompt_tokens": after[0] - before[0], "encoded_prompt_tokens": after[1] - before[1]}
                if fresh:  # (a shared pool started before this job: its start-up is not this job's)
                    _log_start_up(t_start, t_checked, t_planned, pool)
            if failed:
                lost = sum(s.rows for s in todo if s.shard_id in failed)
                log.error("%d shard(s) (%d rows) failed: %s", len(failed), lost, ", ".join(sorted(failed)))
        finally:
            if own and "pool" in started:
                started["pool"].close()
        record_failures(fs, layout, failed)

        # 4. Summary over all committed shards, this run's and earlier ones'.
        code = summarize(fs, layout, plan, failed, t_start, len(todo), cfg=cfg, done_before=committed,
                         prompt_encoding=encoding, retries=retries)
    if late.received:  # the job is done and summarized; the stop still stops a caller running more jobs
        raise KeyboardInterrupt(late.received)
    return code


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignalsNoted:
    """While a job writes its last files, SIGINT / SIGTERM are noted (`received`: the first), not raised, so
    the summary is never cut short; the handlers before are restored on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.before: dict = {}

    def _note(self, signum, frame) -> None:
        note_stop_signal(signum)
        self.received = self.received or signum

    def __enter__(self) -> StopSignalsNoted:  # noqa: PYI034 - py3.10 has no typing.Self
        if threading.current_thread() is threading.main_thread():
            self.before = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.before.items():
            signal.signal(sig, handler)


def check_shared_output(ray, cfg: JobConfig) -> None:
    """Every node's replicas write under output.path: on a multi-node cluster a local path must be storage all
    of them mount (output.shared_filesystem), or each node would keep its own part of the output."""
    if "://" in cfg.output.path and not cfg.output.path.startswith("file://") or cfg.output.shared_filesystem:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise ConfigError(f"output.path {cfg.output.path!r} is a local path, but the Ray cluster has {len(nodes)} "
                          f"nodes: each node's replicas would write to their own disk. Use an s3:// output.path, or "
                          f"set output.shared_filesystem=true if every node mounts this path")


def _prompt_encoding(stats: list[dict]) -> tuple[int, int]:
    """(prompt tokens, prompt tokens encoded) over the replicas' stream stats (`StreamStats`)."""
    return (sum(s.get("prompt_tokens", 0) for s in stats), sum(s.get("encoded_prompt_tokens", 0) for s in stats))


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


def already_complete(job: CheckedJob) -> bool:
    """True if the job finished and every data file still checks out; a finished job whose files do not
    loses its _SUCCESS and resumes."""
    fs, layout = job.fs, job.layout
    if not fs.exists(layout.success):
        return False
    manifest = _read_manifest(fs, layout)
    if manifest is not None:  # check_plan has made sure it is this input's plan
        plan = Plan.from_dict(manifest)
        checked = commits.verify(fs, layout, plan.fingerprint, plan.shard_rows())
        if len(checked.shards) == len(plan.shards):
            return True
        print(f"the finished job's outputs no longer check out ({len(plan.shards) - len(checked.shards)} shard(s) "
              f"missing or damaged); running them again", flush=True)
    fs.rm(layout.success)
    return False


def clear_failures(fs, layout: Layout) -> None:
    try:
        if fs.exists(layout.failed()):
            fs.rm(layout.failed(), recursive=True)
    except OSError as e:
        log.error("could not clear %s: %s", layout.failed(), e.strerror or e)


def record_failures(fs, layout: Layout, failed: dict[str, str]) -> None:
    """One _failed/<shard>.json per failed shard; a storage that refuses them is reported, never raised."""
    for sid, reason in failed.items():
        try:
            write_json(fs, layout.failed(sid), {"shard": sid, "reason": reason})
        except OSError as e:
            log.error("could not record shard %s's failure under %s (%s); the summary lists it",
                      sid, layout.failed(), e.strerror or e)
            return


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def summarize(fs, layout: Layout, plan: Plan, failed: dict[str, str], t_start: float, ran: int, *,
              cfg: JobConfig | None = None, done_before: Collection[str] = (), prompt_encoding: dict | None = None,
              retries: Mapping[str, int] = {}, interrupted: str | None = None) -> int:
    """Summarise every committed shard (checked, not trusted); `_SUCCESS` only when all of them check out.
    `done_before`: the shards committed before this run, left out of this run's throughput.
    `prompt_encoding`: this run's prompt tokens and those the engine's encoder computed
    (`engine.share_prefixes`), over its replicas. `retries`: this run's shard attempts run again and the
    replicas' storage retries (the driver's own are added here). `interrupted`: the signal that stopped
    the run (the summary says so; no `_SUCCESS`, and the CLI has the last word).

    A storage that refuses the summary or `_SUCCESS` is reported on one line (the summary still printed),
    and the job is not complete: exit 1, and a rerun finishes it.
    """
    total, now = ShardStats(), ShardStats()

    def add(sid: str, marker: dict) -> None:
        total.merge(ShardStats.from_dict(marker["stats"]))
        if sid not in done_before:
            now.merge(ShardStats.from_dict(marker["stats"]))

    checked = commits.verify(fs, layout, plan.fingerprint, plan.shard_rows(), visit=add)
    failed = dict(failed)
    for s in plan.shards:
        if s.shard_id not in checked.shards and s.shard_id not in failed and not interrupted:
            why = checked.rejected.get(f"{s.shard_id}.parquet", "its data file is missing")
            failed[s.shard_id] = f"not committed: {why}"
    t_end = time.time()
    wall = max(t_end - t_start, 1e-9)
    tried = Counter(retries)
    tried.update(retry.drain())  # the driver's own (planning, checks, this summary's reads)
    storage = {k: tried.get(k, 0) for k in (*retry.KINDS, "own_object", "gave_up")}
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
        "rejected_files": commits.rejections(fs, layout),
        "retries": {"shard_attempts": tried.get("shard_attempts", 0),  # this run: attempts lost and run again
                    "storage": {**storage, "total": sum(tried.get(k, 0) for k in retry.KINDS)}},
        "shards": len(plan.shards),
        "shards_committed": len(checked.shards),
        "shards_run_now": ran,
        "interrupted": interrupted,  # "SIGTERM" / "SIGINT": stopped; committed shards kept, a rerun resumes
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
    if prompt_encoding and prompt_encoding["prompt_tokens"] > 0:
        summary["prompt_encoding"] = {**prompt_encoding, "ratio": round(
            prompt_encoding["encoded_prompt_tokens"] / prompt_encoding["prompt_tokens"], 4),
            "over": "this run: prompt tokens the engine's encoder computed / prompt tokens it admitted"}
    unwritten = _write_end_file(fs, layout.summary, summary)
    print("summary: " + redact.scrub(_fmt(summary)) + f"; output in {redact.scrub(layout.url(fs))}/data/")
    if interrupted:
        return EXIT_FAILED_SHARDS
    if failed:
        print(f"job incomplete: {len(failed)} shard(s) failed: {', '.join(sorted(failed))}; rerun to retry them",
              file=sys.stderr)
        return EXIT_FAILED_SHARDS
    unwritten = unwritten or _write_end_file(fs, layout.success, {
        "rows": total.rows, "shards": len(plan.shards), "completed_at": _iso(t_end)})
    if unwritten:
        print(f"job incomplete: every shard is committed, but {unwritten}; rerun to finish", file=sys.stderr)
        return EXIT_FAILED_SHARDS
    return EXIT_OK


def _write_end_file(fs, path: str, obj: dict) -> str | None:
    """Write `obj` at `path`; on a storage error, say so in one line instead of raising."""
    try:
        write_json(fs, path, obj)
        return None
    except OSError as e:
        msg = f"could not write {path} ({e.strerror or e})"
        print(f"dgbatch: error: {redact.scrub(msg)}", file=sys.stderr)
        return msg


def _fmt(s: dict) -> str:
    tpf = s["tokens_per_forward"]
    f = lambda v: "n/a" if v is None else f"{v:.2f}"
    filtered = "".join(f", {n} filtered ({r})" for r, n in sorted(s["filtered_rows"].items()))
    duplicates = f", {s['duplicate_outputs']} duplicate samples" if s["duplicate_outputs"] else ""
    return (f"{s['rows']:,} rows, {s['output_tokens']:,} output tokens, tokens/forward mean {f(tpf['mean'])} "
            f"p50 {f(tpf['p50'])} p90 {f(tpf['p90'])}, {s['failed_rows']} failed rows{filtered}{duplicates}, "
            f"{len(s['failed_shards'])} failed shards{_fmt_retries(s['retries'])}, {s['wall_time_s']:.1f}s")


def _fmt_retries(r: dict) -> str:
    parts = [f"{r['storage']['total']} storage retries"] if r["storage"]["total"] else []
    parts += [f"{r['shard_attempts']} shard attempts run again"] if r["shard_attempts"] else []
    return "".join(f", {p}" for p in parts)
