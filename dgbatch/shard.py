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
from dgbatch.io.commit import put_exclusive, write_json
from dgbatch.io.layout import Layout
from dgbatch.planning.images import ImageError
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


def stats_of_output(fs, path: str) -> ShardStats:
    """Stats recomputed from a committed output file (when its commit marker is missing)."""
    cols = ["finish_reason", "num_output_tokens", "num_prompt_tokens", "tokens_per_forward"]
    with fs.open(path, "rb") as fh:
        t = pq.read_table(fh, columns=cols)
    stats = ShardStats()
    for reason, n_out, n_prompt, tpf in zip(*(t.column(c).to_pylist() for c in cols)):
        stats.add_row(reason, n_out, n_prompt, tpf)
    return stats


class ShardRunner:
    """isolate_rows: a failed batch is retried row by row (one bad row fails only itself). A parallel
    replica turns it off: its ranks must run the same steps, and a retry on one rank alone would not be."""

    def __init__(self, backend: Backend, tokenizer, fs, layout: Layout, eos_ids: list[int], job_meta: dict,
                 id_column: str | None, isolate_rows: bool = True, images=None):
        self.backend = backend
        self.images = images  # `planning.images.RowImages`: reads rows' images here, on the replica
        self.isolate_rows = isolate_rows
        self.tokenizer = tokenizer
        self.fs = fs
        self.layout = layout
        self.eos_ids = set(eos_ids)
        self.metadata = {b"dgbatch": json.dumps(job_meta).encode()}
        self.drop_input_id = id_column == "id"

    def run(self, shard_id: str) -> dict:
        """Run and commit one shard; returns its stats (of the committed file, whoever wrote it)."""
        data_path = self.layout.data(shard_id)
        if self.fs.exists(data_path):  # committed by an earlier attempt
            return self._record(shard_id, stats_of_output(self.fs, data_path))
        with self.fs.open(self.layout.plan_shard(shard_id), "rb") as fh:
            shard = pq.read_table(fh)
        table, stats = self.build_output(shard)
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata}), buf)
        if not put_exclusive(self.fs, data_path, buf.getvalue()):
            log.info("shard %s was already committed by another writer; keeping that one", shard_id)
            stats = stats_of_output(self.fs, data_path)
        return self._record(shard_id, stats)

    def build_output(self, shard: pa.Table) -> tuple[pa.Table, ShardStats]:
        ids = shard.column(ID).to_pylist()
        prompts = shard.column(PROMPT_IDS).to_pylist()
        plan_errors = shard.column(PLAN_ERROR).to_pylist()
        todo, requests = self.requests(shard, ids, prompts, plan_errors)
        if self.isolate_rows:
            results = generate_isolated(self.backend, requests)
        else:
            results = list(self.backend.generate(requests)) if requests else []
        by_row: dict[int, Generation | Exception] = dict(zip(todo, results))
        cols: dict[str, list] = {name: [] for name, _ in OUTPUT_SCHEMA}
        stats = ShardStats()
        expanded = {i: len(r.prompt_ids) for i, r in zip(todo, requests)}
        for i in range(shard.num_rows):
            n_prompt = expanded.get(i, len(prompts[i] or ()))
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

    def requests(self, shard: pa.Table, ids: list, prompts: list, errors: list) -> tuple[list[int], list[Request]]:
        """(rows to generate, their requests); a row whose images cannot be used gets its error in `errors`."""
        refs = self.images.refs(shard) if self.images is not None else [[] for _ in ids]
        todo, requests = [], []
        for i, err in enumerate(errors):
            if err is not None:
                continue
            if not refs[i]:
                todo.append(i)
                requests.append(Request(ids[i], prompts[i]))
                continue
            try:
                requests.append(self.images.request(ids[i], prompts[i], refs[i]))
                todo.append(i)
            except ImageError as e:
                errors[i] = f"image: {e}"
        return todo, requests

    def _record(self, shard_id: str, stats: ShardStats) -> dict:
        write_json(self.fs, self.layout.commit(shard_id), stats.to_dict())
        return stats.to_dict()
