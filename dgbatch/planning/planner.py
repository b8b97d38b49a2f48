"""Plan a job: tokenize the input in parallel Ray tasks and write length-bucketed prompt shards.

Each fragment of the input is tokenized by one task; its rows are grouped by prompt-length bucket
and each group is cut into shards of `plan.shard_rows` rows, written to OUTPUT/_plan/shards/ as
Arrow IPC files (internal files, read whole by one replica: no Parquet beside the outputs, so a
reader's `OUTPUT/**/*.parquet` glob sees each row once). With `sampling.num_samples` N > 1 each input
row becomes N rows (ids ROWID#k, column `sample_index`), all in one shard, so a prompt's samples are
scored, voted and de-duplicated together.
Shard ids name (fragment, bucket, chunk), so the same input and config always give the same shards
and a rerun maps onto them. The driver only ever holds per-shard metadata: O(shards), not O(rows).
"""

from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass

import pyarrow as pa

from dgbatch.columns import SAMPLE_INDEX
from dgbatch.config import JobConfig
from dgbatch.io.commit import write_bytes
from dgbatch.planning.buckets import auto_edges, bucket_of, padded_positions
from dgbatch.planning.ids import checked_ids, digest_parts
from dgbatch.planning.jsonl import READ_ERROR
from dgbatch.planning.prompts import PromptEncoder
from dgbatch.planning.source import PARTITION_COLUMN, Fragment, InputPlan, carried_name, read_fragment
from dgbatch.sizing import planned_batch_size

# Internal shard columns; prefixed so they never clash with the input's own columns.
ID, PROMPT_IDS, NUM_PROMPT, PLAN_ERROR = "_dgb_id", "_dgb_prompt_ids", "_dgb_num_prompt_tokens", "_dgb_plan_error"
ROW_INDEX = "_dgb_row_index"  # the row's position in its input file (the output's `row_index`)
MAX_NEW = "_dgb_max_new_tokens"  # a row's own output budget (input.max_new_tokens_column); null: the job's
INTERNAL_COLUMNS = (ID, PROMPT_IDS, NUM_PROMPT, PLAN_ERROR, ROW_INDEX, MAX_NEW)
ERROR_BUCKET = -1
SHARD_FORMAT = "arrow"  # recorded in the plan manifest: a plan of another format is made again
SAMPLE_SEP = "#"


def sample_id(row_id: str, k: int, num_samples: int) -> str:
    """The id of sample k of a row: the row id itself when there is one sample, else ROWID#k. The
    sample's randomness derives from (job seed, this id), so samples differ and each reproduces."""
    return row_id if num_samples == 1 else f"{row_id}{SAMPLE_SEP}{k}"


def prompt_id(output_id: str, sampled: bool) -> str:
    """The input row an output row came from (the inverse of `sample_id`)."""
    return output_id.rsplit(SAMPLE_SEP, 1)[0] if sampled else output_id


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


def row_ids(table: pa.Table, frag: Fragment, id_column: str | None, partition: str | None = None) -> list[str]:
    """The input's id column, or `[PARTITION/]FILE:ROW` (FILE relative to the input root): stable across runs,
    and distinct across a backfill's partitions, whose files often share names (part-0.parquet)."""
    if id_column:  # checked: set, unique in this fragment (planning.ids checks across fragments)
        return checked_ids(table.column(id_column).to_pylist(), frag.label, frag.row_start, id_column)
    prefix = f"{partition}/" if partition is not None else ""
    return [f"{prefix}{frag.label}:{frag.row_start + i}" for i in range(table.num_rows)]


def sample_lengths(cfg: JobConfig, inp: InputPlan, tokenizer, max_prompt: int, per_fragment: int = 512,
                   image_tokens=None) -> list[int]:
    """Prompt lengths of a deterministic sample: the head of up to 16 evenly spread fragments."""
    frags = inp.fragments
    picks = sorted({frags[(i * len(frags)) // min(16, len(frags))].index for i in range(min(16, len(frags)))})
    encoder = PromptEncoder(tokenizer, max_prompt, system_prompt=cfg.input.system_prompt, image_tokens=image_tokens)
    lengths = []
    for i in picks:
        table = read_fragment(frags[i], cfg.input, cfg.storage, head=True).slice(0, per_fragment)
        ids, _ = encoder.encode_column(table, cfg.input)
        lengths += [encoder.planned_length(t) for t in ids if t is not None]
    return lengths


def bucket_edges(cfg: JobConfig, inp: InputPlan, tokenizer, max_prompt: int, image_tokens=None) -> list[int]:
    """image_tokens: the checkpoint's (`dgbatch.vision.image_tokens`), so images count in prompt lengths."""
    if cfg.plan.bucket_edges != "auto":
        return sorted(set(cfg.plan.bucket_edges))
    return auto_edges(sample_lengths(cfg, inp, tokenizer, max_prompt, image_tokens=image_tokens),
                      cfg.plan.num_buckets)


@functools.lru_cache(maxsize=4)
def _encoder(model_dir: str, max_prompt: int, system_prompt: str | None) -> PromptEncoder:
    """One tokenizer per planning worker process, reused by every fragment it plans."""
    from pathlib import Path

    from dgbatch.checkpoint import load_tokenizer
    from dgbatch.vision import image_tokens

    return PromptEncoder(load_tokenizer(Path(model_dir)), max_prompt, system_prompt=system_prompt,
                         image_tokens=image_tokens(Path(model_dir)))


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


def assign_shards(frag_index: int, lengths: list[int | None], edges: list[int],
                  shard_rows: int) -> list[tuple[str, int, list[int]]]:
    """(shard id, bucket, row positions) for one fragment's rows, given each row's prompt length (None:
    a row error). The one place rows are cut into shards; `dgbatch plan` calls it too, without writing."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(ERROR_BUCKET if n is None else bucket_of(n, edges), []).append(i)
    out = []
    for bucket in sorted(groups):
        rows = groups[bucket]
        for chunk, s in enumerate(range(0, len(rows), shard_rows)):
            # Shortest first inside a shard: consecutive rows make batches with the least padding.
            idx = sorted(rows[s : s + shard_rows], key=lambda i: lengths[i] or 0)
            name = "err" if bucket == ERROR_BUCKET else f"b{bucket:02d}"
            out.append((f"f{frag_index:06d}-{name}-{chunk:04d}", bucket, idx))
    return out


def input_rows_per_shard(cfg: JobConfig) -> int:
    """Input rows per shard: plan.shard_rows output rows, all of a row's num_samples samples in one shard."""
    return max(1, cfg.plan.shard_rows // cfg.sampling.num_samples)


def write_shard(fs, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    with pa.ipc.new_file(buf, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    # Replaced atomically: a second run planning the same job at once (overlapping cron ticks) rewrites
    # the same bytes while the first one's replicas read them. The manifest is the commit point.
    write_bytes(fs, path, buf.getvalue())


def read_shard(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """A prompt shard written by `write_shard` (the whole file is read: a shard is one replica's work)."""
    table = pa.ipc.open_file(pa.BufferReader(fs.cat_file(path))).read_all()
    return table.select(columns) if columns else table


@dataclass
class FragmentRows:
    """One fragment read and tokenized: what planning decides for each of its input rows."""

    table: pa.Table  # the input's columns as read
    ids: list[str]
    prompt_ids: list[list[int] | None]  # None: the row is an error
    errors: list[str | None]
    budgets: list[int | None]  # input.max_new_tokens_column (None: the job's)
    lengths: list[int | None]  # planned prompt lengths (each image at its most tokens); None: an error row


def tokenize_fragment(cfg: JobConfig, frag: Fragment, encoder: PromptEncoder) -> FragmentRows:
    """Read and tokenize one fragment; every unusable row comes back with its error. The planner and
    `dgbatch plan` both call it, so the dry run sees exactly what a run plans."""
    table = read_fragment(frag, cfg.input, cfg.storage)
    read_errors = [None] * table.num_rows
    if READ_ERROR in table.column_names:  # JSON Lines: lines that could not be read
        read_errors = table.column(READ_ERROR).to_pylist()
        table = table.drop_columns([READ_ERROR])
    prompt_ids, errors = encoder.encode_column(table, cfg.input)
    budgets, budget_errors = row_budgets(table, cfg.input.max_new_tokens_column)
    errors = [r or b or e for r, b, e in zip(read_errors, budget_errors, errors)]
    prompt_ids = [None if e else t for t, e in zip(prompt_ids, errors)]
    ids = row_ids(table, frag, cfg.input.id_column, cfg.input.partition)
    lengths = [None if e else encoder.planned_length(t) for t, e in zip(prompt_ids, errors)]
    return FragmentRows(table, ids, prompt_ids, errors, budgets, lengths)


def plan_fragment(
    cfg: JobConfig, frag: Fragment, edges: list[int], model_dir: str, max_prompt: int, root: str
) -> list[dict]:
    """Tokenize one fragment and write its shards. Runs as a Ray task; returns shard metadata dicts."""
    return _plan_fragment(cfg, frag, edges, model_dir, max_prompt, root)[0]


def plan_fragment_with_id_digests(
    cfg: JobConfig, frag: Fragment, edges: list[int], model_dir: str, max_prompt: int, root: str, parts: int
) -> tuple:
    """`plan_fragment`, also returning its ids' digests in `parts` partitions (a Ray task with 1 + parts
    returns: the driver passes each partition on to its duplicate check without fetching it)."""
    metas, ids = _plan_fragment(cfg, frag, edges, model_dir, max_prompt, root)
    return (metas, *digest_parts(ids, frag.index, parts))


def _plan_fragment(
    cfg: JobConfig, frag: Fragment, edges: list[int], model_dir: str, max_prompt: int, root: str
) -> tuple[list[dict], list[str]]:
    """(shard metadata, the fragment's input row ids)."""
    from dgbatch.io.fs import filesystem
    from dgbatch.io.layout import Layout

    rows = tokenize_fragment(cfg, frag, _encoder(model_dir, max_prompt, cfg.input.system_prompt))
    ids, prompt_ids, errors, budgets, lengths = rows.ids, rows.prompt_ids, rows.errors, rows.budgets, rows.lengths
    # Columns from an earlier dgbatch pass (this input is a job's output) are carried as prev_*.
    table = rows.table.rename_columns([carried_name(c, cfg.input.id_column) for c in rows.table.column_names])
    if cfg.input.partition is not None:  # carried through to the output like any input column
        table = table.append_column(PARTITION_COLUMN, pa.array([cfg.input.partition] * table.num_rows, pa.string()))
    fs, _ = filesystem(cfg.output.path, cfg.storage)
    layout = Layout(root)
    fs.makedirs(layout.plan_shard(), exist_ok=True)
    n = cfg.sampling.num_samples
    metas = []
    for shard_id, bucket, idx in assign_shards(frag.index, lengths, edges, input_rows_per_shard(cfg)):
        take = [i for i in idx for _ in range(n)]  # each input row, num_samples times in a row
        kept = [lengths[i] for i in take if lengths[i] is not None]
        shard = table.take(pa.array(take, pa.int64()))
        if n > 1:
            shard = shard.append_column(SAMPLE_INDEX, pa.array([k for _ in idx for k in range(n)], pa.int32()))
        shard = shard.append_column(ID, pa.array([sample_id(ids[i], k, n) for i in idx for k in range(n)],
                                                 pa.string()))
        shard = shard.append_column(PROMPT_IDS, pa.array([prompt_ids[i] for i in take], pa.list_(pa.int32())))
        shard = shard.append_column(NUM_PROMPT, pa.array([lengths[i] or 0 for i in take], pa.int32()))
        shard = shard.append_column(PLAN_ERROR, pa.array([errors[i] for i in take], pa.string()))
        shard = shard.append_column(ROW_INDEX, pa.array([frag.row_start + i for i in take], pa.int64()))
        if cfg.input.max_new_tokens_column:
            shard = shard.append_column(MAX_NEW, pa.array([budgets[i] for i in take], pa.int32()))
        write_shard(fs, layout.plan_shard(shard_id), shard)
        padded = padded_positions(kept, planned_batch_size(cfg.engine))
        metas.append(asdict(ShardMeta(shard_id, len(take), bucket, len(take) - len(kept), sum(kept), padded,
                                      max(kept, default=0))))
    return metas, ids
