"""Plan a job: tokenize the input in parallel Ray tasks and write length-bucketed prompt shards.

Each fragment of the input is tokenized by one task; its rows are grouped by prompt-length bucket
and each group is cut into shards of `plan.shard_rows` rows, written to OUTPUT/_plan/shards/. With
`sampling.num_samples` N > 1 each input row becomes N rows (ids ROWID#k, column `sample_index`), all
in one shard, so a prompt's samples are scored, voted and de-duplicated together.
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
from dgbatch.planning.jsonl import READ_ERROR
from dgbatch.planning.prompts import PromptEncoder
from dgbatch.planning.source import Fragment, InputPlan, carried_name, read_fragment

# Internal shard columns; prefixed so they never clash with the input's own columns.
ID, PROMPT_IDS, NUM_PROMPT, PLAN_ERROR = "_dgb_id", "_dgb_prompt_ids", "_dgb_num_prompt_tokens", "_dgb_plan_error"
MAX_NEW = "_dgb_max_new_tokens"  # a row's own output budget (input.max_new_tokens_column); null: the job's
INTERNAL = (ID, PROMPT_IDS, NUM_PROMPT, PLAN_ERROR, MAX_NEW)
ERROR_BUCKET = -1
SAMPLE_SEP = "#"


def sample_id(row_id: str, k: int, num_samples: int) -> str:
    """The id of sample k of a row: the row id itself when there is one sample, else ROWID#k. The
    sample's randomness derives from (job seed, this id), so samples differ and each reproduces."""
    return row_id if num_samples == 1 else f"{row_id}{SAMPLE_SEP}{k}"


def prompt_id(output_id: str, sampled: bool) -> str:
    """The input row an output row came from (the inverse of `sample_id`)."""
    return output_id.rsplit(SAMPLE_SEP, 1)[0] if sampled else output_id


REPORT_BATCH_SIZE = 32  # the batch the planning report's padding figure assumes under engine.batch_size=auto


@dataclass
class ShardMeta:
    shard_id: str
    rows: int
    bucket: int
    error_rows: int
    prompt_tokens: int
    padded_positions: int  # prompt positions incl. padding, batched in shard order at engine.batch_size
    # (at REPORT_BATCH_SIZE when it is 'auto': the replica picks the real one once its model is loaded)

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
    encoder = PromptEncoder(tokenizer, max_prompt, cfg.input.system_prompt)
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
def _encoder(model_dir: str, max_prompt: int, system_prompt: str | None) -> PromptEncoder:
    """One tokenizer per planning worker process, reused by every fragment it plans."""
    from pathlib import Path

    from dgbatch.checkpoint import load_tokenizer

    return PromptEncoder(load_tokenizer(Path(model_dir)), max_prompt, system_prompt)


def row_budgets(table: pa.Table, column: str | None) -> tuple[list[int | None], list[str | None]]:
    """Each row's max_new_tokens from input.max_new_tokens_column (None: the job's), or the row's error."""
    if column is None:
        return [None] * table.num_rows, [None] * table.num_rows
    budgets, errors = [], []
    for v in table.column(column).to_pylist():
        ok = v is None or v >= 1
        budgets.append(v if ok else None)
        errors.append(None if ok else f"{column} is {v}: input.max_new_tokens_column needs a positive integer")
    return budgets, errors


def plan_fragment(
    cfg: JobConfig, frag: Fragment, edges: list[int], model_dir: str, max_prompt: int, root: str
) -> list[dict]:
    """Tokenize one fragment and write its shards. Runs as a Ray task; returns shard metadata dicts."""
    from dgbatch.io.fs import filesystem
    from dgbatch.io.layout import Layout

    encoder = _encoder(model_dir, max_prompt, cfg.input.system_prompt)
    table = read_fragment(frag, cfg.input, cfg.storage)
    read_errors = [None] * table.num_rows
    if READ_ERROR in table.column_names:  # JSON Lines: lines that could not be read
        read_errors = table.column(READ_ERROR).to_pylist()
        table = table.drop_columns([READ_ERROR])
    prompt_ids, errors = encoder.encode_column(table, cfg.input)
    budgets, budget_errors = row_budgets(table, cfg.input.max_new_tokens_column)
    errors = [r or b or e for r, b, e in zip(read_errors, budget_errors, errors)]
    prompt_ids = [None if e else t for t, e in zip(prompt_ids, errors)]
    ids = row_ids(table, frag, cfg.input.id_column)
    # Columns from an earlier dgbatch pass (this input is a job's output) are carried as prev_*.
    table = table.rename_columns([carried_name(c, cfg.input.id_column) for c in table.column_names])
    groups: dict[int, list[int]] = {}
    for i, (t, err) in enumerate(zip(prompt_ids, errors)):
        groups.setdefault(ERROR_BUCKET if err else bucket_of(len(t), edges), []).append(i)
    fs, _ = filesystem(cfg.output.path, cfg.storage)
    layout = Layout(root)
    fs.makedirs(layout.plan_shard("x").rsplit("/", 1)[0], exist_ok=True)
    n = cfg.sampling.num_samples
    per_shard = max(1, cfg.plan.shard_rows // n)  # input rows per shard: all of a row's samples in one shard
    metas = []
    for bucket in sorted(groups):
        rows = groups[bucket]
        for chunk, s in enumerate(range(0, len(rows), per_shard)):
            # Shortest first inside a shard: consecutive rows make batches with the least padding.
            idx = sorted(rows[s : s + per_shard], key=lambda i: len(prompt_ids[i] or ()))
            name = "err" if bucket == ERROR_BUCKET else f"b{bucket:02d}"
            shard_id = f"f{frag.index:06d}-{name}-{chunk:04d}"
            take = [i for i in idx for _ in range(n)]  # each input row, num_samples times in a row
            lengths = [len(prompt_ids[i]) for i in take if prompt_ids[i] is not None]
            shard = table.take(pa.array(take, pa.int64()))
            if n > 1:
                shard = shard.append_column("sample_index", pa.array([k for _ in idx for k in range(n)], pa.int32()))
            shard = shard.append_column(ID, pa.array([sample_id(ids[i], k, n) for i in idx for k in range(n)],
                                                     pa.string()))
            shard = shard.append_column(PROMPT_IDS, pa.array([prompt_ids[i] for i in take], pa.list_(pa.int32())))
            shard = shard.append_column(NUM_PROMPT, pa.array([len(prompt_ids[i] or ()) for i in take], pa.int32()))
            shard = shard.append_column(PLAN_ERROR, pa.array([errors[i] for i in take], pa.string()))
            if cfg.input.max_new_tokens_column:
                shard = shard.append_column(MAX_NEW, pa.array([budgets[i] for i in take], pa.int32()))
            buf = io.BytesIO()
            pq.write_table(shard, buf)
            # No fsync dance: a plan shard is rebuilt if planning dies; the manifest is the commit point.
            fs.pipe_file(layout.plan_shard(shard_id), buf.getvalue())
            batch = cfg.engine.batch_size if cfg.engine.batch_size != "auto" else REPORT_BATCH_SIZE
            padded = padded_positions(lengths, batch)
            metas.append(asdict(ShardMeta(shard_id, len(take), bucket, len(take) - len(lengths), sum(lengths),
                                          padded)))
    return metas
