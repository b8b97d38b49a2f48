"""One prompt shard: read it, turn its rows' generations into the output table, commit it exactly once.

Nothing here knows about Ray. `ShardFiles` is a job's side of it (its output root, metadata, id
column, output filters; built from the `JobContext` that travels with every shard a replica is
given); a replica's stream (`dgbatch.stream`) reads shards, feeds their rows to its engine and
commits each shard as soon as its last row is done. `ShardRunner` runs one shard start to end
through a batch `Backend` (tests, simple callers).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dgbatch.config import StorageSection
from dgbatch.filters import OutputFilter, duplicate_outputs
from dgbatch.generation import Backend, Generation, Request, SamplingParams
from dgbatch.io.commit import put_exclusive, write_json
from dgbatch.io.layout import Layout
from dgbatch.planning.planner import (ID, INTERNAL_COLUMNS, MAX_NEW, PLAN_ERROR, PROMPT_IDS, ROW_INDEX, prompt_id,
                                      read_shard)
from dgbatch.stats import ShardStats

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = [
    ("output_text", pa.string()),
    ("num_prompt_tokens", pa.int32()),
    ("num_output_tokens", pa.int32()),
    ("tokens_per_forward", pa.float64()),
    ("num_decoder_forwards", pa.int32()),
    ("finish_reason", pa.string()),
    ("error", pa.string()),
]
FILTER_SCHEMA = [("filtered", pa.bool_()), ("filter_reason", pa.string())]  # with output.filters
_STATS_COLUMNS = ("finish_reason", "num_output_tokens", "num_prompt_tokens", "tokens_per_forward", "filter_reason",
                  "id", "sample_index", "output_text")

Result = Generation | Exception  # a row's generation, or why it failed


@dataclass(frozen=True)
class JobContext:
    """What a replica needs to run one job's shards. It travels with each shard, so one replica (its
    model loaded once) can serve several jobs one after another."""

    output_path: str  # output.path as configured (a URL): where the job's filesystem is
    root: str  # the output root on that filesystem (fsspec path, no protocol)
    meta: dict  # job metadata stored in every data file
    id_column: str | None
    params: SamplingParams
    longest_prompt: int  # the plan's longest prompt, in tokens: sizes the slots (and an 'auto' batch)
    storage: StorageSection = field(default_factory=StorageSection)
    output_filter: OutputFilter | None = None  # output.filters, when the job sets any
    label: str = ""  # the job's label on the replicas' metrics (its output URL, `dgbatch.metrics`)

    @property
    def key(self) -> tuple[str, str]:
        return (self.output_path, self.root)


def generate_isolated(backend: Backend, requests: Sequence[Request]) -> list[Result]:
    """Generate all rows; if the batch fails, retry row by row so one bad row fails only itself."""
    try:
        return list(backend.generate(requests))
    except Exception as batch_error:  # noqa: BLE001 - any failure is isolated to rows below
        log.warning("batch of %d rows failed (%s); retrying row by row", len(requests), type(batch_error).__name__)
    out: list[Result] = []
    for r in requests:
        try:
            out.extend(backend.generate([r]))
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out


def stats_of(table: pa.Table) -> ShardStats:
    """A shard's stats, from its output rows (what it committed, or is about to)."""
    cols = {c: table.column(c).to_pylist() for c in _STATS_COLUMNS if c in table.column_names}
    stats = ShardStats()
    none = [None] * table.num_rows
    for reason, n_out, n_prompt, tpf, filtered in zip(cols["finish_reason"], cols["num_output_tokens"],
                                                      cols["num_prompt_tokens"], cols["tokens_per_forward"],
                                                      cols.get("filter_reason", none)):
        stats.add_row(reason, n_out, n_prompt, tpf, filtered)
    if "sample_index" in cols:
        stats.duplicate_outputs = duplicate_outputs([prompt_id(i, True) for i in cols["id"]], cols["output_text"])
    return stats


def stats_of_output(fs, layout: Layout, shard_id: str) -> ShardStats:
    """Stats recomputed from a shard's committed files (when its commit marker is missing)."""
    tables = []
    for path in [layout.data(shard_id), *[p for p in [layout.filtered(shard_id)] if fs.exists(p)]]:
        with fs.open(path, "rb") as fh:
            f = pq.ParquetFile(fh)
            tables.append(f.read(columns=[c for c in _STATS_COLUMNS if c in f.schema_arrow.names]))
    return stats_of(pa.concat_tables(tables, promote_options="permissive"))


def requests_of(shard: pa.Table) -> tuple[list[int], list[Request]]:
    """(row positions, requests) of the shard's rows that the planner accepted."""
    ids = shard.column(ID).to_pylist()
    prompts = shard.column(PROMPT_IDS).to_pylist()
    budgets = shard.column(MAX_NEW).to_pylist() if MAX_NEW in shard.column_names else [None] * shard.num_rows
    todo = [i for i, e in enumerate(shard.column(PLAN_ERROR).to_pylist()) if e is None]
    return todo, [Request(ids[i], prompts[i], budgets[i]) for i in todo]


def output_table(shard: pa.Table, results: dict[int, Result], tokenizer, eos_ids: set[int], drop_input_id: bool,
                 output_filter: OutputFilter | None = None) -> tuple[pa.Table, ShardStats]:
    """The shard's output rows (input columns carried through, then OUTPUT_SCHEMA, and FILTER_SCHEMA
    with output filters) from each row position's result; a row without one is the planner's error record."""
    ids = shard.column(ID).to_pylist()
    prompts = shard.column(PROMPT_IDS).to_pylist()
    plan_errors = shard.column(PLAN_ERROR).to_pylist()
    cols: dict[str, list] = {name: [] for name, _ in OUTPUT_SCHEMA + FILTER_SCHEMA}
    for i in range(shard.num_rows):
        n_prompt = len(prompts[i] or ())
        res = results.get(i)
        err = plan_errors[i]
        text = tpf = filtered = None
        n_out = forwards = 0
        reason = "error"
        if isinstance(res, Exception):
            err = f"generation failed: {type(res).__name__}: {res}"
        elif res is not None:
            try:
                body = [t for t in res.token_ids if t not in eos_ids]
                text = tokenizer.decode(body, skip_special_tokens=True)
                n_out, forwards, tpf, reason = (
                    len(res.token_ids), res.num_decoder_forwards, res.tokens_per_forward, res.finish_reason)
                if output_filter is not None:
                    filtered = output_filter.reason(text, len(body))
            except Exception as e:  # noqa: BLE001 - an undecodable output is that row's error
                err = f"decoding failed: {type(e).__name__}: {e}"
                text = None
        values = (text, n_prompt, n_out, tpf, forwards, reason, err, filtered is not None, filtered)
        for name, value in zip(cols, values):
            cols[name].append(value)
    carried = shard.drop_columns([c for c in INTERNAL_COLUMNS if c in shard.column_names]
                                 + (["id"] if drop_input_id and "id" in shard.column_names else []))
    out = pa.table({"id": pa.array(ids, pa.string()), "row_index": shard.column(ROW_INDEX).cast(pa.int64())})
    for name in carried.column_names:
        out = out.append_column(carried.schema.field(name), carried.column(name))
    for name, typ in OUTPUT_SCHEMA + (FILTER_SCHEMA if output_filter is not None else []):
        out = out.append_column(name, pa.array(cols[name], typ))
    return out, stats_of(out)


class ShardFiles:
    """One job's shard files: whether a shard is committed, its prompt rows, its exactly-once commit."""

    def __init__(self, fs, layout: Layout, job_meta: dict, id_column: str | None,
                 output_filter: OutputFilter | None = None):
        self.fs, self.layout = fs, layout
        self.metadata = {b"dgbatch": json.dumps(job_meta).encode()}
        self.drop_input_id = id_column == "id"
        self.output_filter = output_filter

    @staticmethod
    def of(job: JobContext) -> ShardFiles:
        from dgbatch.io.fs import filesystem

        fs, _ = filesystem(job.output_path, job.storage)
        return ShardFiles(fs, Layout(job.root), job.meta, job.id_column, job.output_filter)

    def committed(self, shard_id: str) -> dict | None:
        """The stats of a shard committed by an earlier attempt (its marker rewritten), or None."""
        if not self.fs.exists(self.layout.data(shard_id)):
            return None
        return self._record(shard_id, stats_of_output(self.fs, self.layout, shard_id))

    def read(self, shard_id: str) -> pa.Table:
        return read_shard(self.fs, self.layout.plan_shard(shard_id))

    def commit(self, shard_id: str, table: pa.Table, stats: ShardStats) -> dict:
        """Create the shard's data file unless another writer did; returns the committed file's stats."""
        if self.output_filter is not None and self.output_filter.drop:
            # The filtered rows go first: the data file is the shard's commit point. Rows derive from
            # (seed, row id, prompt) only, so a retry that finds this file already written writes the same rows.
            dropped = table.filter(table.column("filtered"))
            table = table.filter(pc.invert(table.column("filtered")))
            if dropped.num_rows:
                put_exclusive(self.fs, self.layout.filtered(shard_id), self._parquet(dropped))
        if not put_exclusive(self.fs, self.layout.data(shard_id), self._parquet(table)):
            log.info("shard %s was already committed by another writer; keeping that one", shard_id)
            stats = stats_of_output(self.fs, self.layout, shard_id)
        return self._record(shard_id, stats)

    def _parquet(self, table: pa.Table) -> bytes:
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata}), buf)
        return buf.getvalue()

    def _record(self, shard_id: str, stats: ShardStats) -> dict:
        write_json(self.fs, self.layout.commit(shard_id), stats.to_dict())
        return stats.to_dict()


class ShardRunner:
    """One shard start to end through a batch `Backend`. isolate_rows: a failed batch is retried row by
    row (one bad row fails only itself)."""

    def __init__(self, backend: Backend, tokenizer, fs, layout: Layout, eos_ids: list[int], job_meta: dict,
                 id_column: str | None, isolate_rows: bool = True, output_filter: OutputFilter | None = None):
        self.backend = backend
        self.isolate_rows = isolate_rows
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.files = ShardFiles(fs, layout, job_meta, id_column, output_filter)

    def run(self, shard_id: str) -> dict:
        """Run and commit one shard; returns its stats (of the committed file, whoever wrote it)."""
        done = self.files.committed(shard_id)
        if done is not None:
            return done
        table, stats = self.build_output(self.files.read(shard_id))
        return self.files.commit(shard_id, table, stats)

    def build_output(self, shard: pa.Table) -> tuple[pa.Table, ShardStats]:
        todo, requests = requests_of(shard)
        if not requests:
            results = []
        elif self.isolate_rows:
            results = generate_isolated(self.backend, requests)
        else:
            results = list(self.backend.generate(requests))
        return output_table(shard, dict(zip(todo, results)), self.tokenizer, self.eos_ids, self.files.drop_input_id,
                            self.files.output_filter)
