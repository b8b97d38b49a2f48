"""One prompt shard: read it, turn its rows' generations into the output table, commit it exactly once.

Nothing here knows about Ray. `ShardFiles` is a job's side of it (its output root, metadata, id
column; built from the `JobContext` that travels with every shard a replica is given); a replica's
stream (`dgbatch.stream`) reads shards, feeds their rows to its engine and commits each shard as
soon as its last row is done. `ShardRunner` runs one shard start to end through a batch `Backend`
(tests, simple callers).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from dgbatch.config import StorageSection
from dgbatch.generation import Backend, Generation, Request, SamplingParams
from dgbatch.io.commit import put_exclusive, write_json
from dgbatch.io.layout import Layout
from dgbatch.planning.planner import ID, NUM_PROMPT, PLAN_ERROR, PROMPT_IDS
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


def stats_of_output(fs, path: str) -> ShardStats:
    """Stats recomputed from a committed output file (when its commit marker is missing)."""
    cols = ["finish_reason", "num_output_tokens", "num_prompt_tokens", "tokens_per_forward"]
    with fs.open(path, "rb") as fh:
        t = pq.read_table(fh, columns=cols)
    stats = ShardStats()
    for reason, n_out, n_prompt, tpf in zip(*(t.column(c).to_pylist() for c in cols)):
        stats.add_row(reason, n_out, n_prompt, tpf)
    return stats


def requests_of(shard: pa.Table) -> tuple[list[int], list[Request]]:
    """(row positions, requests) of the shard's rows that the planner accepted."""
    ids = shard.column(ID).to_pylist()
    prompts = shard.column(PROMPT_IDS).to_pylist()
    todo = [i for i, e in enumerate(shard.column(PLAN_ERROR).to_pylist()) if e is None]
    return todo, [Request(ids[i], prompts[i]) for i in todo]


def output_table(shard: pa.Table, results: dict[int, Result], tokenizer, eos_ids: set[int],
                 drop_input_id: bool) -> tuple[pa.Table, ShardStats]:
    """The shard's output rows (input columns carried through, then OUTPUT_SCHEMA) from each row
    position's result; a row without one is the planner's error record."""
    ids = shard.column(ID).to_pylist()
    prompts = shard.column(PROMPT_IDS).to_pylist()
    plan_errors = shard.column(PLAN_ERROR).to_pylist()
    cols: dict[str, list] = {name: [] for name, _ in OUTPUT_SCHEMA}
    stats = ShardStats()
    for i in range(shard.num_rows):
        n_prompt = len(prompts[i] or ())
        res = results.get(i)
        err = plan_errors[i]
        text = tpf = None
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
            except Exception as e:  # noqa: BLE001 - an undecodable output is that row's error
                err = f"decoding failed: {type(e).__name__}: {e}"
        for name, value in zip(cols, (text, n_prompt, n_out, tpf, forwards, reason, err)):
            cols[name].append(value)
        stats.add_row(reason, n_out, n_prompt, tpf)
    carried = shard.drop_columns([c for c in (ID, PROMPT_IDS, NUM_PROMPT, PLAN_ERROR) if c in shard.column_names]
                                 + (["id"] if drop_input_id and "id" in shard.column_names else []))
    out = pa.table({"id": pa.array(ids, pa.string())})
    for name in carried.column_names:
        out = out.append_column(carried.schema.field(name), carried.column(name))
    for name, typ in OUTPUT_SCHEMA:
        out = out.append_column(name, pa.array(cols[name], typ))
    return out, stats


class ShardFiles:
    """One job's shard files: whether a shard is committed, its prompt rows, its exactly-once commit."""

    def __init__(self, fs, layout: Layout, job_meta: dict, id_column: str | None):
        self.fs, self.layout = fs, layout
        self.metadata = {b"dgbatch": json.dumps(job_meta).encode()}
        self.drop_input_id = id_column == "id"

    @staticmethod
    def of(job: JobContext) -> ShardFiles:
        from dgbatch.io.fs import filesystem

        fs, _ = filesystem(job.output_path, job.storage)
        return ShardFiles(fs, Layout(job.root), job.meta, job.id_column)

    def committed(self, shard_id: str) -> dict | None:
        """The stats of a shard committed by an earlier attempt (its marker rewritten), or None."""
        data_path = self.layout.data(shard_id)
        if not self.fs.exists(data_path):
            return None
        return self._record(shard_id, stats_of_output(self.fs, data_path))

    def read(self, shard_id: str) -> pa.Table:
        with self.fs.open(self.layout.plan_shard(shard_id), "rb") as fh:
            return pq.read_table(fh)

    def commit(self, shard_id: str, table: pa.Table, stats: ShardStats) -> dict:
        """Create the shard's data file unless another writer did; returns the committed file's stats."""
        data_path = self.layout.data(shard_id)
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata}), buf)
        if not put_exclusive(self.fs, data_path, buf.getvalue()):
            log.info("shard %s was already committed by another writer; keeping that one", shard_id)
            stats = stats_of_output(self.fs, data_path)
        return self._record(shard_id, stats)

    def _record(self, shard_id: str, stats: ShardStats) -> dict:
        write_json(self.fs, self.layout.commit(shard_id), stats.to_dict())
        return stats.to_dict()


class ShardRunner:
    """One shard start to end through a batch `Backend`. isolate_rows: a failed batch is retried row by
    row (one bad row fails only itself)."""

    def __init__(self, backend: Backend, tokenizer, fs, layout: Layout, eos_ids: list[int], job_meta: dict,
                 id_column: str | None, isolate_rows: bool = True):
        self.backend = backend
        self.isolate_rows = isolate_rows
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.files = ShardFiles(fs, layout, job_meta, id_column)

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
        return output_table(shard, dict(zip(todo, results)), self.tokenizer, self.eos_ids, self.files.drop_input_id)
