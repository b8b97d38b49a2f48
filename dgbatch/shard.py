"""One prompt shard: read it, turn its rows' generations into the output table, commit it exactly once.

Nothing here knows about Ray. `ShardFiles` is a job's side of it (its output root, metadata, id
column, output filters; built from the `JobContext` that travels with every shard a replica is
given); a replica's stream (`dgbatch.stream`) reads shards, feeds their rows to its engine and
commits each shard as soon as its last row is done. `BackendShards` runs shards one at a time, start to
end, through a batch `Backend` (tests, simple callers).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dgbatch.columns import FILTER_SCHEMA, OUTPUT_SCHEMA
from dgbatch.config import InputSection, StorageSection
from dgbatch.filters import OutputFilter, duplicate_outputs
from dgbatch.generation import Backend, Generation, Request, SamplingParams
from dgbatch.io import markers
from dgbatch.io.commit import put_exclusive, write_json
from dgbatch.io.layout import Layout
from dgbatch.planning.images import ImageError, RowImages
from dgbatch.planning.planner import (
    ID,
    INTERNAL_COLUMNS,
    MAX_NEW,
    PLAN_ERROR,
    PROMPT_IDS,
    ROW_INDEX,
    prompt_id,
    read_shard,
)
from dgbatch.stats import ShardStats

log = logging.getLogger(__name__)

STATS_COLUMNS = ("finish_reason", "num_output_tokens", "num_prompt_tokens", "tokens_per_forward", "filter_reason",
                 "id", "sample_index", "output_text")

Result = Generation | Exception  # a row's generation, or why it failed


@dataclass(frozen=True)
class JobContext:
    """What a replica needs to run one job's shards. It travels with each shard, so one replica (its
    model loaded once) can serve several jobs one after another."""

    output_path: str  # output.path as configured (a URL): where the job's filesystem is
    root: str  # the output root on that filesystem (fsspec path, no protocol)
    meta: dict  # job metadata stored in every data file's footer (`driver.job_meta`: names the plan)
    id_column: str | None
    params: SamplingParams
    longest_prompt: int  # the plan's longest prompt, in tokens: sizes the slots (and an 'auto' batch)
    storage: StorageSection = field(default_factory=StorageSection)
    output_filter: OutputFilter | None = None  # output.filters, when the job sets any
    input: InputSection | None = None  # input.*: where rows keep their images, and the image limits
    label: str = ""  # the job's label on the replicas' metrics (its output URL, `dgbatch.metrics`)

    @property
    def key(self) -> tuple[str, str, str]:
        """One job's run: its output root and the plan its files belong to."""
        return (self.output_path, self.root, self.meta.get("plan", ""))


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
    cols = {c: table.column(c).to_pylist() for c in STATS_COLUMNS if c in table.column_names}
    stats = ShardStats()
    none = [None] * table.num_rows
    for reason, n_out, n_prompt, tpf, filtered in zip(cols["finish_reason"], cols["num_output_tokens"],
                                                      cols["num_prompt_tokens"], cols["tokens_per_forward"],
                                                      cols.get("filter_reason", none)):
        stats.add_row(reason, n_out, n_prompt, tpf, filtered)
    if "sample_index" in cols:
        stats.duplicate_outputs = duplicate_outputs([prompt_id(i, True) for i in cols["id"]], cols["output_text"])
    return stats


@dataclass
class ShardRequests:
    """What to generate for a shard: the rows' positions and requests, and each row's error so far (the
    planner's, or the replica's when a row's images cannot be used)."""

    todo: list[int]
    requests: list[Request]
    errors: list[str | None]

    def prompt_tokens(self) -> dict[int, int]:
        """Prompt tokens of each generated row, its images expanded to their soft tokens."""
        return {i: len(r.prompt_ids) for i, r in zip(self.todo, self.requests)}


def requests_of(shard: pa.Table, images: RowImages | None = None) -> ShardRequests:
    """The requests of the shard's rows that the planner accepted, each with its own output budget; a row
    with images gets them read and processed here (`images`), or that row's error."""
    ids = shard.column(ID).to_pylist()
    prompts = shard.column(PROMPT_IDS).to_pylist()
    budgets = shard.column(MAX_NEW).to_pylist() if MAX_NEW in shard.column_names else [None] * shard.num_rows
    errors = shard.column(PLAN_ERROR).to_pylist()
    refs = images.refs(shard) if images is not None else None
    todo, requests = [], []
    for i, err in enumerate(errors):
        if err is not None:
            continue
        if not refs or not refs[i]:
            todo.append(i)
            requests.append(Request(ids[i], prompts[i], budgets[i]))
            continue
        try:
            requests.append(replace(images.request(ids[i], prompts[i], refs[i]), max_new_tokens=budgets[i]))
            todo.append(i)
        except ImageError as e:
            errors[i] = f"image: {e}"
    return ShardRequests(todo, requests, errors)


def output_table(shard: pa.Table, rows: ShardRequests, results: Sequence[Result], tokenizer, eos_ids: set[int],
                 drop_input_id: bool, output_filter: OutputFilter | None = None) -> tuple[pa.Table, ShardStats]:
    """The shard's output rows (input columns carried through, then OUTPUT_SCHEMA, and FILTER_SCHEMA
    with output filters) from the result of each of `rows`' requests; a row without one is an error
    record (the planner's, or its images')."""
    ids = shard.column(ID).to_pylist()
    prompts = shard.column(PROMPT_IDS).to_pylist()
    by_row = dict(zip(rows.todo, results))
    expanded = rows.prompt_tokens()
    cols: dict[str, list] = {name: [] for name, _ in OUTPUT_SCHEMA + FILTER_SCHEMA}
    for i in range(shard.num_rows):
        n_prompt = expanded.get(i, len(prompts[i] or ()))
        res = by_row.get(i)
        err = rows.errors[i]
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
    """One job's shard files: whether a shard is committed, its prompt rows, its exactly-once commit with
    its commit marker (`dgbatch.io.markers`), and the rows' images (read here, on the replica)."""

    def __init__(self, fs, layout: Layout, job_meta: dict, id_column: str | None,
                 output_filter: OutputFilter | None = None, images: RowImages | None = None):
        self.fs, self.layout = fs, layout
        self.job_meta = job_meta
        self.plan_id = job_meta.get("plan", "")
        self.drop_input_id = id_column == "id"
        self.output_filter = output_filter
        self.images = images  # `planning.images.RowImages`: reads rows' images here, on the replica

    @staticmethod
    def of(job: JobContext, model_dir=None) -> ShardFiles:
        """The job's files; `model_dir` (the replica's checkpoint) processes the rows' images."""
        from dgbatch.io.fs import filesystem

        fs, _ = filesystem(job.output_path, job.storage)
        images = RowImages(job.input, job.storage, model_dir) if job.input is not None and model_dir else None
        return ShardFiles(fs, Layout(job.root), job.meta, job.id_column, job.output_filter, images)

    def committed(self, shard_id: str) -> dict | None:
        """The stats of a shard committed by an earlier attempt (its marker rewritten), or None; refused if
        its files were not written for this shard of this plan."""
        if not self.fs.exists(self.layout.data(shard_id)):
            return None
        return self._record(shard_id, *self._committed(shard_id))

    def read(self, shard_id: str) -> pa.Table:
        return read_shard(self.fs, self.layout.plan_shard(shard_id))

    def requests(self, shard: pa.Table) -> ShardRequests:
        return requests_of(shard, self.images)

    def commit(self, shard_id: str, table: pa.Table, stats: ShardStats) -> dict:
        """Create the shard's data file unless another writer did, then its marker; returns the committed
        file's stats."""
        filtered = None
        if self.output_filter is not None and self.output_filter.drop:
            # The filtered rows go first: the data file is the shard's commit point. Rows derive from
            # (seed, row id, prompt) only, so a retry that finds this file already written writes the same rows.
            dropped = table.filter(table.column("filtered"))
            table = table.filter(pc.invert(table.column("filtered")))
            if dropped.num_rows:
                data = self._parquet(dropped, shard_id)
                if put_exclusive(self.fs, self.layout.filtered(shard_id), data):
                    filtered = markers.DataFile.of_bytes(data, dropped.num_rows)
                else:
                    filtered = markers.read_committed(self.fs.cat_file(self.layout.filtered(shard_id)))[0]
        data = self._parquet(table, shard_id)
        if put_exclusive(self.fs, self.layout.data(shard_id), data):
            return self._record(shard_id, markers.DataFile.of_bytes(data, table.num_rows), stats, filtered)
        log.info("shard %s was already committed by another writer; keeping that one", shard_id)
        return self._record(shard_id, *self._committed(shard_id))

    def _parquet(self, table: pa.Table, shard_id: str) -> bytes:
        """The Parquet bytes of a shard's file, its footer naming the job, the shard and the plan."""
        buf = io.BytesIO()
        meta = {markers.FOOTER_KEY: json.dumps({**self.job_meta, "shard": shard_id, "plan": self.plan_id}).encode()}
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), buf)
        return buf.getvalue()

    def _committed(self, shard_id: str) -> tuple[markers.DataFile, ShardStats, markers.DataFile | None]:
        """The files another attempt committed (data, and filtered with output.drop_filtered), described
        for the marker, with their stats; refused if they were not written for this shard of this plan."""
        tables, files = [], []
        for path in (self.layout.data(shard_id), self.layout.filtered(shard_id)):
            if path != self.layout.data(shard_id) and not self.fs.exists(path):
                files.append(None)
                continue
            file, table = markers.read_committed(self.fs.cat_file(path))
            footer = markers.footer_meta(table.schema)
            if footer.get("shard") != shard_id or footer.get("plan") != self.plan_id:
                raise RuntimeError(f"{path.rsplit('/', 2)[-2]}/{shard_id}.parquet exists but was not written for "
                                   "this shard of this plan")
            tables.append(table)
            files.append(file)
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        return files[0], stats_of(table), files[1]

    def _record(self, shard_id: str, file: markers.DataFile, stats: ShardStats,
                filtered: markers.DataFile | None = None) -> dict:
        write_json(self.fs, self.layout.commit(shard_id),
                   markers.marker(shard_id, self.plan_id, file, stats.to_dict(), filtered))
        return stats.to_dict()


class BackendShards:
    """A job's shards, each start to end, through a batch `Backend`. isolate_rows: a failed batch is retried row by
    row (one bad row fails only itself)."""

    def __init__(self, backend: Backend, tokenizer, fs, layout: Layout, eos_ids: list[int], job_meta: dict,
                 id_column: str | None, isolate_rows: bool = True, output_filter: OutputFilter | None = None,
                 images: RowImages | None = None):
        self.backend = backend
        self.isolate_rows = isolate_rows
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.files = ShardFiles(fs, layout, job_meta, id_column, output_filter, images)

    def run(self, shard_id: str) -> dict:
        """Run and commit one shard; returns its stats (of the committed file, whoever wrote it)."""
        done = self.files.committed(shard_id)
        if done is not None:
            return done
        table, stats = self.build_output(self.files.read(shard_id))
        return self.files.commit(shard_id, table, stats)

    def build_output(self, shard: pa.Table) -> tuple[pa.Table, ShardStats]:
        rows = self.files.requests(shard)
        if not rows.requests:
            results = []
        elif self.isolate_rows:
            results = generate_isolated(self.backend, rows.requests)
        else:
            results = list(self.backend.generate(rows.requests))
        return output_table(shard, rows, results, self.tokenizer, self.eos_ids, self.files.drop_input_id,
                            self.files.output_filter)
