"""Plan a job: tokenize the input in parallel Ray tasks and write length-bucketed prompt shards.

Each fragment of the input is tokenized by one task; its rows are grouped by prompt-length bucket
and each group is cut into shards of `plan.shard_rows` rows, written to OUTPUT/_plan/shards/.
Shard ids name (fragment, bucket, chunk), so the same input and config always give the same shards
and a rerun maps onto them. The driver only ever holds per-shard metadata: O(shards), not O(rows).
"""

from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from dgbatch.config import JobConfig
from dgbatch.planning.buckets import auto_edges, bucket_of, padded_positions
from dgbatch.planning.prompts import PromptEncoder
from dgbatch.planning.source import Fragment, InputPlan, read_fragment
from dgbatch.sizing import planned_batch_size

# Internal shard columns; prefixed so they never clash with the input's own columns.
ID, PROMPT_IDS, NUM_PROMPT, PLAN_ERROR = "_dgb_id", "_dgb_prompt_ids", "_dgb_num_prompt_tokens", "_dgb_plan_error"
ERROR_BUCKET = -1


@dataclass
class ShardMeta:
    shard_id: str
    rows: int
    bucket: int
    error_rows: int
    prompt_tokens: int
    padded_positions: int  # prompt positions incl. padding, batched in shard order at engine.batch_size
    # (at sizing.REPORT_BATCH_SIZE when it is 'auto': the replica picks the real one once its model is loaded)
    longest_prompt: int = 0  # tokens of the shard's longest prompt (0: none, or a plan from before this field)

    @staticmethod
    def from_dict(d: dict) -> ShardMeta:
        return ShardMeta(**d)


def row_ids(table: pa.Table, frag: Fragment, id_column: str | None) -> list[str]:
    if id_column:
        return [str(v) for v in table.column(id_column).to_pylist()]
    return [f"{frag.label}:{frag.row_start + i}" for i in range(table.num_rows)]


def sample_lengths(cfg: JobConfig, inp: InputPlan, tokenizer, max_prompt: int, per_fragment: int = 512) -> list[int]:
    """Prompt lengths of a deterministic sample: the head of up to 16 evenly spread fragments."""
    frags = inp.fragments
    picks = sorted({frags[(i * len(frags)) // min(16, len(frags))].index for i in range(min(16, len(frags)))})
    encoder = PromptEncoder(tokenizer, max_prompt)
    lengths = []
    for i in picks:
        table = read_fragment(frags[i], cfg.input, cfg.storage, head=True).slice(0, per_fragment)
        ids, _ = encoder.encode_column(table, cfg.input)
        lengths += [len(t) for t in ids if t is not None]
    return lengths


def bucket_edges(cfg: JobConfig, inp: InputPlan, tokenizer, max_prompt: int) -> list[int]:
    if cfg.plan.bucket_edges != "auto":
        return sorted(set(cfg.plan.bucket_edges))
    return auto_edges(sample_lengths(cfg, inp, tokenizer, max_prompt), cfg.plan.num_buckets)


@functools.lru_cache(maxsize=4)
def _encoder(model_dir: str, max_prompt: int) -> PromptEncoder:
    """One tokenizer per planning worker process, reused by every fragment it plans."""
    from pathlib import Path

    from dgbatch.checkpoint import load_tokenizer

    return PromptEncoder(load_tokenizer(Path(model_dir)), max_prompt)


def plan_fragment(
    cfg: JobConfig, frag: Fragment, edges: list[int], model_dir: str, max_prompt: int, root: str
) -> list[dict]:
    """Tokenize one fragment and write its shards. Runs as a Ray task; returns shard metadata dicts."""
    from dgbatch.io.fs import filesystem
    from dgbatch.io.layout import Layout

    encoder = _encoder(model_dir, max_prompt)
    table = read_fragment(frag, cfg.input, cfg.storage)
    prompt_ids, errors = encoder.encode_column(table, cfg.input)
    ids = row_ids(table, frag, cfg.input.id_column)
    groups: dict[int, list[int]] = {}
    for i, (t, err) in enumerate(zip(prompt_ids, errors)):
        groups.setdefault(ERROR_BUCKET if err else bucket_of(len(t), edges), []).append(i)
    fs, _ = filesystem(cfg.output.path, cfg.storage)
    layout = Layout(root)
    fs.makedirs(layout.plan_shard("x").rsplit("/", 1)[0], exist_ok=True)
    metas = []
    for bucket in sorted(groups):
        rows = groups[bucket]
        for chunk, s in enumerate(range(0, len(rows), cfg.plan.shard_rows)):
            # Shortest first inside a shard: consecutive rows make batches with the least padding.
            idx = sorted(rows[s : s + cfg.plan.shard_rows], key=lambda i: len(prompt_ids[i] or ()))
            name = "err" if bucket == ERROR_BUCKET else f"b{bucket:02d}"
            shard_id = f"f{frag.index:06d}-{name}-{chunk:04d}"
            lengths = [len(prompt_ids[i]) for i in idx if prompt_ids[i] is not None]
            shard = table.take(pa.array(idx, pa.int64()))
            shard = shard.append_column(ID, pa.array([ids[i] for i in idx], pa.string()))
            shard = shard.append_column(PROMPT_IDS, pa.array([prompt_ids[i] for i in idx], pa.list_(pa.int32())))
            shard = shard.append_column(NUM_PROMPT, pa.array([len(prompt_ids[i] or ()) for i in idx], pa.int32()))
            shard = shard.append_column(PLAN_ERROR, pa.array([errors[i] for i in idx], pa.string()))
            buf = io.BytesIO()
            pq.write_table(shard, buf)
            # No fsync dance: a plan shard is rebuilt if planning dies; the manifest is the commit point.
            fs.pipe_file(layout.plan_shard(shard_id), buf.getvalue())
            padded = padded_positions(lengths, planned_batch_size(cfg.engine))
            metas.append(asdict(ShardMeta(shard_id, len(idx), bucket, len(idx) - len(lengths), sum(lengths), padded,
                                          max(lengths, default=0))))
    return metas
