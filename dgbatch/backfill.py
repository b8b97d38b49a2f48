"""Cron backfills: one job config run over a range of date (or hour) partitions.

    python -m jobs.backfill CONFIG --start 2026-11-28 --end yesterday [--every day|hour] [--report PATH]
                            [--require-input] [--timezone UTC] [section.key=value ...]

`{date}` (YYYY-MM-DD) and `{hour}` (HH) in input.path and output.path are filled per partition, and
each partition is a job of its own: its own output root, plan, commits, summary and _SUCCESS, with
`input.partition` set to the partition (`2026-11-29`, or `2026-11-29T03` hourly), which prefixes the
default row ids (so rows of different dates get different ids and seeds) and is written to the output's
`partition` column. Per partition, in order:

    complete (_SUCCESS)      -> skipped
    input missing            -> missing (an error only with --require-input)
    otherwise                -> run (resuming what it had committed) -> done | failed

Partitions run one after another in this process, on one replica pool: one Ray session, the model
loaded once for the whole range (`shared_replicas`), not per partition. Exit code: 0 when every partition
is done or skipped (or missing, without --require-input), 1 when any failed, 2 on a bad config, found
before anything runs. Two runs of one partition at once (overlapping cron ticks) are safe: shard
commits are exclusive creates and every other file is replaced atomically with the same content.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from dgbatch import checkpoint, driver, redact
from dgbatch.config import ConfigError, JobConfig, load_config
from dgbatch.io.commit import read_json, write_json
from dgbatch.io.fs import filesystem
from dgbatch.io.layout import Layout
from dgbatch.placement import brief
from dgbatch.planning.source import InputMissing
from dgbatch.pool import ReplicaPool

EVERY = {"day": timedelta(days=1), "hour": timedelta(hours=1)}
PLACEHOLDERS = {"day": ("date",), "hour": ("date", "hour")}
MAX_PARTITIONS = 20_000  # a typo in a year should fail, not plan a century of jobs
STATUSES = ("done", "skipped", "missing", "failed")
_RELATIVE = re.compile(r"^([+-]\d+)([dh])$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class BackfillError(ConfigError):
    """A bad backfill range or template: the backfill stops before anything runs (exit 2)."""


@dataclass(frozen=True)
class Partition:
    start: datetime  # wall-clock time in the backfill's timezone, truncated to the partition's granularity
    every: str  # "day" | "hour"

    @property
    def value(self) -> str:
        """The partition id: `2026-11-29` (daily) or `2026-11-29T03` (hourly)."""
        return self.start.strftime("%Y-%m-%d" if self.every == "day" else "%Y-%m-%dT%H")

    def fill(self, template: str) -> str:
        return template.replace("{date}", self.start.strftime("%Y-%m-%d")).replace("{hour}", self.start.strftime("%H"))


@dataclass
class PartitionResult:
    partition: str
    status: str  # one of STATUSES
    reason: str | None
    input_path: str
    output_path: str
    rows: int | None = None
    wall_time_s: float = 0.0

    def line(self) -> str:
        """The one stdout line per partition."""
        detail = {
            "done": f"{self.rows if self.rows is not None else '?'} rows in {self.wall_time_s:.1f} s",
            "skipped": self.reason,
            "missing": self.reason,
            "failed": self.reason,
        }[self.status]
        return redact.scrub(f"partition {self.partition}: {self.status} ({detail}) -> {self.output_path}")


# ---- dates and partitions -------------------------------------------------------------------------


def _truncate(t: datetime, every: str) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0) if every == "hour" else datetime(t.year, t.month, t.day)


def resolve_date(text: str, every: str, now: datetime, *, end: bool = False) -> datetime:
    """`2026-11-28`, `2026-11-28T03`, `today`, `yesterday`, `now`, `-1d`, `+0d`, `-3h` -> a partition start.

    Relative forms count from `now`. A bare date as the end of an hourly range means its last hour."""
    s = text.strip().lower()
    if s in ("today", "yesterday", "now"):
        t = now - timedelta(days=1) if s == "yesterday" else now
        date_only = s != "now"
    elif m := _RELATIVE.match(s):
        t = now + (timedelta(days=int(m[1])) if m[2] == "d" else timedelta(hours=int(m[1])))
        date_only = False
    else:
        for fmt, date_only in (("%Y-%m-%d", True), ("%Y-%m-%dT%H", False), ("%Y-%m-%dT%H:%M", False),
                               ("%Y-%m-%d %H:%M", False)):
            try:
                t = datetime.strptime(s.upper(), fmt)
                break
            except ValueError:
                continue
        else:
            raise BackfillError(
                f"cannot read {text!r} as a date: use YYYY-MM-DD, YYYY-MM-DDTHH, today, yesterday, now, "
                f"or an offset such as -1d or -3h"
            )
    t = _truncate(t, every)
    if every == "hour" and date_only:
        t = datetime(t.year, t.month, t.day) + (timedelta(hours=23) if end else timedelta())
    return t


def partitions(start: datetime, end: datetime, every: str) -> list[Partition]:
    """Every partition from `start` to `end`, both included."""
    if start > end:
        raise BackfillError(f"--start {start:%Y-%m-%d %H:00} is after --end {end:%Y-%m-%d %H:00}")
    step = EVERY[every]
    count = int((end - start) / step) + 1
    if count > MAX_PARTITIONS:
        raise BackfillError(f"--start/--end span {count:,} {every} partitions (more than {MAX_PARTITIONS:,}): "
                            f"check the dates")
    return [Partition(start + i * step, every) for i in range(count)]


def check_templates(cfg: JobConfig, every: str) -> None:
    """input.path and output.path must name every placeholder of the partition and no other one, so that
    each partition reads its own input and writes its own output root."""
    need = PLACEHOLDERS[every]
    for key, path in (("input.path", cfg.input.path), ("output.path", cfg.output.path)):
        found = _PLACEHOLDER.findall(path)
        unknown = sorted(set(found) - set(PLACEHOLDERS["hour"]))
        if unknown:
            raise BackfillError(f"{key} {path!r}: unknown placeholder(s) {unknown}; a backfill fills {{date}} "
                                f"(YYYY-MM-DD) and, with --every hour, {{hour}} (HH)")
        if every == "day" and "hour" in found:
            raise BackfillError(f"{key} {path!r} uses {{hour}}: run with --every hour, or drop it")
        missing = [p for p in need if p not in found]
        if missing:
            what = "writes over one output" if key == "output.path" else "reads the same input"
            raise BackfillError(f"{key} {path!r} has no {' or '.join('{' + p + '}' for p in missing)}: every "
                                f"{every} partition {what}; put the placeholder in the path")


def partition_config(cfg: JobConfig, part: Partition) -> JobConfig:
    """The partition's own job: paths filled in, `input.partition` set."""
    inp = cfg.input.model_copy(update={"path": part.fill(cfg.input.path), "partition": part.value})
    out = cfg.output.model_copy(update={"path": part.fill(cfg.output.path)})
    return cfg.model_copy(update={"input": inp, "output": out})


# ---- running ----------------------------------------------------------------------------------------


@contextmanager
def shared_replicas(cfg: JobConfig) -> Iterator[ReplicaPool]:
    """One replica pool over the whole range: Ray and the replicas started once, the model loaded once, and
    every partition's job run on it (`driver.run(partition_cfg, pool=pool)`; a partition differs from the
    range's config only in its input and output, never in what a replica is built from). The pool starts
    with the first partition that has shards to run, so a range of complete or missing partitions starts
    neither Ray nor a model; it is closed when the context exits."""
    pool = ReplicaPool(cfg, start=False)
    try:
        yield pool
    finally:
        pool.close()


def run_job(cfg: JobConfig, pool: ReplicaPool | None) -> int:
    """One partition's job, on the shared pool when there is one."""
    return driver.run(cfg, pool=pool)


def run_partition(cfg: JobConfig, part: Partition, pool: ReplicaPool | None = None) -> PartitionResult:
    """Skip, record as missing, or run one partition. Never raises for the partition's own failures."""
    pcfg = partition_config(cfg, part)
    result = PartitionResult(part.value, "done", None, pcfg.input.path, pcfg.output.path)
    t0 = time.time()
    try:
        fs, root = filesystem(pcfg.output.path, pcfg.storage)
        layout = Layout(root)
        success = read_json(fs, layout.success)
        if success is not None:
            prev = (read_json(fs, layout.job) or {}).get("fingerprint")
            if prev in (None, driver.resolved_fingerprint(pcfg)) or pcfg.output.force:
                result.status, result.rows = "skipped", success.get("rows")
                result.reason = f"already complete: {success.get('rows', '?')} rows"
                return result
            # A different config over a complete output: driver.run refuses it with the reason below.
        code = run_job(pcfg, pool)
        summary = read_json(fs, layout.summary) or {}
        result.rows = summary.get("rows")
        if code != driver.EXIT_OK:
            failed = summary.get("failed_shards") or []
            shown = "; ".join(f"{f['shard']}: {f['reason']}" for f in failed[:3])
            result.status = "failed"
            result.reason = f"{len(failed)} shard(s) failed ({shown}); rerun to retry them" if failed else f"exit {code}"
    except InputMissing as e:
        result.status, result.reason = "missing", str(e)
    except ConfigError as e:
        result.status, result.reason = "failed", str(e).replace("\n", " ")
    except Exception as e:  # noqa: BLE001 - one partition's failure is recorded; the next one still runs
        result.status, result.reason = "failed", brief(e)
    finally:
        result.wall_time_s = round(time.time() - t0, 3)
    return result


@dataclass
class Backfill:
    """A range of partitions of one config, and what became of each."""

    cfg: JobConfig
    parts: list[Partition]
    require_input: bool = False
    report_path: str | None = None
    described: dict | None = None  # config path, range, timezone: echoed in the report

    def __post_init__(self) -> None:
        self.results: list[PartitionResult] = []
        self.started_at = time.time()

    def exit_code(self) -> int:
        bad = {"failed", "missing"} if self.require_input else {"failed"}
        return driver.EXIT_FAILED_SHARDS if any(r.status in bad for r in self.results) else driver.EXIT_OK

    def report(self) -> dict:
        counts = Counter(r.status for r in self.results)
        return {
            **(self.described or {}),
            "every": self.parts[0].every if self.parts else None,
            "require_input": self.require_input,
            "input_path": self.cfg.input.path,
            "output_path": self.cfg.output.path,
            "partitions_total": len(self.parts),
            "counts": {s: counts.get(s, 0) for s in STATUSES},
            "exit_code": self.exit_code(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "wall_time_s": round(time.time() - self.started_at, 3),
            "partitions": [asdict(r) for r in self.results],
        }

    def write_report(self) -> None:
        if self.report_path is None:
            return
        fs, path = filesystem(self.report_path, self.cfg.storage)
        write_json(fs, path, _scrubbed(self.report()))

    def run(self) -> int:
        with shared_replicas(self.cfg) as pool:
            for part in self.parts:
                try:
                    result = run_partition(self.cfg, part, pool)
                except KeyboardInterrupt:  # Ctrl-C / SIGTERM: keep what is known, then stop
                    self.results.append(PartitionResult(part.value, "failed", "interrupted", part.fill(
                        self.cfg.input.path), part.fill(self.cfg.output.path)))
                    self.write_report()
                    raise
                if result.status == "missing" and self.require_input:
                    result.reason = f"{result.reason}; an error with --require-input"
                self.results.append(result)
                print(result.line(), flush=True)
                self.write_report()  # after every partition: a killed backfill leaves its progress
        counts = Counter(r.status for r in self.results)
        where = f"; report at {self.report_path}" if self.report_path else ""
        print(f"backfill: {len(self.results)} partition(s): " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
              + where, flush=True)
        return self.exit_code()


def _scrubbed(obj):
    if isinstance(obj, str):
        return redact.scrub(obj)
    if isinstance(obj, dict):
        return {k: _scrubbed(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrubbed(v) for v in obj]
    return obj


# ---- command line -----------------------------------------------------------------------------------


def join_date_options(argv: list[str]) -> list[str]:
    """`--start -1d` as `--start=-1d`: argparse would read a value starting with '-' as an option."""
    out, it = [], iter(argv)
    for a in it:
        if a in ("--start", "--end"):
            a = f"{a}={next(it, '')}"
        out.append(a)
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("config", help="YAML job config whose input.path and output.path hold {date} (and {hour})")
    ap.add_argument("--start", required=True, help="first partition: YYYY-MM-DD[THH], today, yesterday, now, -1d, -3h")
    ap.add_argument("--end", required=True, help="last partition (included), same forms")
    ap.add_argument("--every", choices=sorted(EVERY), default="day", help="partition granularity [day]")
    ap.add_argument("--report", help="write the backfill report (JSON) here; any fsspec URL")
    ap.add_argument("--require-input", action="store_true", help="a partition without input is an error (exit 1)")
    ap.add_argument("--timezone", default="UTC", help="timezone of the dates and of today/yesterday/now [UTC]")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. engine.batch_size=64")


def prepare(args: argparse.Namespace, now: datetime | None = None) -> Backfill:
    """Everything checked before anything runs: config, templates, range, checkpoint. Raises ConfigError."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    cfg = load_config(args.config, args.overrides)
    redact.install(cfg)
    check_templates(cfg, args.every)
    try:
        tz = ZoneInfo(args.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise BackfillError(f"--timezone {args.timezone!r} is not a known timezone (e.g. UTC, Europe/Paris)") from None
    now = now or datetime.now(tz).replace(tzinfo=None)
    start = resolve_date(args.start, args.every, now)
    end = resolve_date(args.end, args.every, now, end=True)
    parts = partitions(start, end, args.every)
    # The model is the same for every partition: check (and download) it once, before any partition runs.
    model_dir = checkpoint.local_checkpoint(cfg.model, cfg.storage)
    params = checkpoint.resolve_sampling(model_dir, cfg.sampling)
    checkpoint.max_prompt_tokens(cfg, checkpoint.read_model_config(model_dir), params)
    checkpoint.check_parallel(cfg, model_dir)
    described = {"config": str(args.config), "start": parts[0].value, "end": parts[-1].value,
                 "timezone": args.timezone}
    return Backfill(cfg, parts, args.require_input, args.report, described)


def main(args: argparse.Namespace) -> int:
    import sys

    try:
        backfill = prepare(args)
    except ConfigError as e:
        print(f"dgbatch backfill: error: {redact.scrub(str(e))}", file=sys.stderr)
        return driver.EXIT_BAD_INPUT
    print(f"backfill: {len(backfill.parts)} {args.every} partition(s) {backfill.parts[0].value} .. "
          f"{backfill.parts[-1].value}", flush=True)
    return backfill.run()
