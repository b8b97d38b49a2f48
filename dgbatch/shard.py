"""Run one prompt shard: generate, build the output table, commit it exactly once.

Nothing here knows about Ray: a replica actor calls `ShardRunner.run` per shard, and so can a test.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from dgbatch.generation import Backend, Generation, Request
from dgbatch.io import markers
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


def generate_isolated(backend: Backend, requests: Sequence[Request]) -> list[Generation | Exception]:
    """Generate all rows; if the batch fails, retry row by row so one bad row fails only itself."""
    try:
        return list(backend.generate(requests))
    except Exception as batch_error:  # noqa: BLE001 - any failure is isolated to rows below
        log.warning("batch of %d rows failed (%s); retrying row by row", len(requests), type(batch_error).__name__)
    out: list[Generation | Exception] = []
    for r in requests:
        try:
            out.extend(backend.generate([r]))
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out


STATS_COLUMNS = ["finish_reason", "num_output_tokens", "num_prompt_tokens", "tokens_per_forward"]


def stats_of_output(fs, path: str) -> ShardStats:
    """Stats recomputed from a committed output file (when its commit marker is missing)."""
    with fs.open(path, "rb") as fh:
        return stats_of_table(pq.read_table(fh, columns=STATS_COLUMNS))


def stats_of_table(t: pa.Table) -> ShardStats:
    cols = STATS_COLUMNS
    stats = ShardStats()
    for reason, n_out, n_prompt, tpf in zip(*(t.column(c).to_pylist() for c in cols)):
        stats.add_row(reason, n_out, n_prompt, tpf)
    return stats


class ShardRunner:
    """isolate_rows: a failed batch is retried row by row (one bad row fails only itself). A parallel
    replica turns it off: its ranks must run the same steps, and a retry on one rank alone would not be."""

    def __init__(self, backend: Backend, tokenizer, fs, layout: Layout, eos_ids: list[int], job_meta: dict,
                 id_column: str | None, isolate_rows: bool = True):
        self.backend = backend
        self.isolate_rows = isolate_rows
        self.tokenizer = tokenizer
        self.fs = fs
        self.layout = layout
        self.eos_ids = set(eos_ids)
        self.job_meta = job_meta
        self.plan_id = job_meta.get("plan", "")
        self.drop_input_id = id_column == "id"

    def run(self, shard_id: str) -> dict:
        """Run and commit one shard; returns its stats (of the committed file, whoever wrote it)."""
        data_path = self.layout.data(shard_id)
        if self.fs.exists(data_path):  # committed by an earlier attempt
            return self._record(shard_id, *self._committed(shard_id))
        with self.fs.open(self.layout.plan_shard(shard_id), "rb") as fh:
            shard = pq.read_table(fh)
        table, stats = self.build_output(shard)
        buf = io.BytesIO()
        meta = {markers.FOOTER_KEY: json.dumps({**self.job_meta, "shard": shard_id, "plan": self.plan_id}).encode()}
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), buf)
        data = buf.getvalue()
        if put_exclusive(self.fs, data_path, data):
            return self._record(shard_id, markers.DataFile.of_bytes(data, table.num_rows), stats)
        log.info("shard %s was already committed by another writer; keeping that one", shard_id)
        return self._record(shard_id, *self._committed(shard_id))

    def _committed(self, shard_id: str) -> tuple[markers.DataFile, ShardStats]:
        """The data file another attempt committed, described for its marker; refused if not this shard's."""
        data = self.fs.cat_file(self.layout.data(shard_id))
        file, table = markers.read_committed(data)
        footer = markers.footer_meta(table.schema)
        if footer.get("shard") != shard_id or footer.get("plan") != self.plan_id:
            raise RuntimeError(f"data/{shard_id}.parquet exists but was not written for this shard of this plan")
        return file, stats_of_table(table.select(STATS_COLUMNS))

    def build_output(self, shard: pa.Table) -> tuple[pa.Table, ShardStats]:
        ids = shard.column(ID).to_pylist()
        prompts = shard.column(PROMPT_IDS).to_pylist()
        plan_errors = shard.column(PLAN_ERROR).to_pylist()
        todo = [i for i, e in enumerate(plan_errors) if e is None]
        requests = [Request(ids[i], prompts[i]) for i in todo]
        if self.isolate_rows:
            results = generate_isolated(self.backend, requests)
        else:
            results = list(self.backend.generate(requests)) if requests else []
        by_row: dict[int, Generation | Exception] = dict(zip(todo, results))
        cols: dict[str, list] = {name: [] for name, _ in OUTPUT_SCHEMA}
        stats = ShardStats()
        for i in range(shard.num_rows):
            n_prompt = len(prompts[i] or ())
            res = by_row.get(i)
            err = plan_errors[i]
            text = tpf = None
            n_out = forwards = 0
            reason = "error"
            if isinstance(res, Exception):
                err = f"generation failed: {type(res).__name__}: {res}"
            elif res is not None:
                try:
                    body = [t for t in res.token_ids if t not in self.eos_ids]
                    text = self.tokenizer.decode(body, skip_special_tokens=True)
                    n_out, forwards, tpf, reason = (
                        len(res.token_ids), res.num_decoder_forwards, res.tokens_per_forward, res.finish_reason)
                except Exception as e:  # noqa: BLE001 - an undecodable output is that row's error
                    err = f"decoding failed: {type(e).__name__}: {e}"
            for name, value in zip(cols, (text, n_prompt, n_out, tpf, forwards, reason, err)):
                cols[name].append(value)
            stats.add_row(reason, n_out, n_prompt, tpf)
        carried = shard.drop_columns([c for c in (ID, PROMPT_IDS, NUM_PROMPT, PLAN_ERROR) if c in shard.column_names]
                                     + (["id"] if self.drop_input_id and "id" in shard.column_names else []))
        out = pa.table({"id": pa.array(ids, pa.string())})
        for name in carried.column_names:
            out = out.append_column(carried.schema.field(name), carried.column(name))
        for name, typ in OUTPUT_SCHEMA:
            out = out.append_column(name, pa.array(cols[name], typ))
        return out, stats

    def _record(self, shard_id: str, file: markers.DataFile, stats: ShardStats) -> dict:
        write_json(self.fs, self.layout.commit(shard_id), markers.marker(shard_id, self.plan_id, file, stats.to_dict()))
        return stats.to_dict()
