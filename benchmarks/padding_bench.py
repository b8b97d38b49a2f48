"""Prompt padding with and without length buckets: padding positions / computed prompt positions.

    python benchmarks/padding_bench.py --rows 20000 --out bench-padding.json

One mixed-length input planned by the real planner (`plan_fragment`) with length bucketing on
(`plan.bucket_edges=auto`) and off (`[]`). Batches are cut in three ways: input order (no shards),
shard order (what ShardMeta.padded_positions records), and as the reference backend cuts them
(sorted by length inside a shard)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from _common import (
    Column,
    common_args,
    job_config,
    key,
    machine,
    markdown_table,
    max_prompt_of,
    mixed_prompts,
    pct,
    run_command,
    save,
    workdir,
    write_input,
)


def plan_in_process(cfg) -> tuple[list[int], list, str]:
    """Plan `cfg` with the real planner, fragment by fragment in this process: (edges, metas, root)."""
    from dgbatch.checkpoint import load_tokenizer
    from dgbatch.io.fs import filesystem
    from dgbatch.planning.planner import ShardMeta, bucket_edges, plan_fragment
    from dgbatch.planning.source import inspect_input

    _, root = filesystem(cfg.output.path)
    inp = inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    model_dir, max_prompt = max_prompt_of(cfg)
    edges = bucket_edges(cfg, inp, load_tokenizer(model_dir), max_prompt)
    metas = [ShardMeta.from_dict(m) for frag in inp.fragments
             for m in plan_fragment(cfg, frag, edges, str(model_dir), max_prompt, root)]
    return edges, metas, root


def shard_lengths(root: str, shard_ids: Sequence[str]) -> list[list[int]]:
    """Prompt lengths of each shard's non-error rows, in shard row order, read from the shard files."""
    from dgbatch.io.fs import filesystem
    from dgbatch.io.layout import Layout
    from dgbatch.planning.planner import NUM_PROMPT, PLAN_ERROR, read_shard

    fs, _ = filesystem(root)
    out = []
    for sid in shard_ids:
        t = read_shard(fs, Layout(root).plan_shard(sid), [NUM_PROMPT, PLAN_ERROR])
        out.append([n for n, e in zip(t.column(NUM_PROMPT).to_pylist(), t.column(PLAN_ERROR).to_pylist())
                    if e is None])
    return out


def padding_row(batching: str, bucketing: str, shards: int, tokens: int, positions: int) -> dict:
    return {"batching": batching, "bucketing": bucketing, "shards": shards, "prompt_tokens": tokens,
            "computed_positions": positions, "padding_fraction": 1 - tokens / positions if positions else 0.0}


def padding_rows_of_plan(bucketing: str, metas: list, lengths: list[list[int]], batch_size: int) -> list[dict]:
    from dgbatch.planning.buckets import padded_positions

    tokens = sum(m.prompt_tokens for m in metas)
    meta_positions = sum(m.padded_positions for m in metas)
    file_positions = sum(padded_positions(ls, batch_size) for ls in lengths)
    if file_positions != meta_positions:
        print(f"WARNING ({bucketing}): ShardMeta.padded_positions {meta_positions} != recomputed from the shard "
              f"files {file_positions}", file=sys.stderr)
    sorted_positions = sum(padded_positions(sorted(ls), batch_size) for ls in lengths)
    return [padding_row("shard order (ShardMeta)", bucketing, len(metas), tokens, meta_positions),
            padding_row("sorted within shard (reference backend)", bucketing, len(metas), tokens, sorted_positions)]


PADDING_COLUMNS: list[Column] = [
    ("batching", key("batching")), ("buckets", key("bucketing")), ("shards", key("shards")),
    ("prompt tokens", key("prompt_tokens")), ("computed positions", key("computed_positions")),
    ("padding", pct("padding_fraction")),
]
BUCKET_COLUMNS: list[Column] = [
    ("bucket", key("bucket")), ("upper edge", key("upper_edge")), ("rows", key("rows")), ("shards", key("shards")),
    ("lengths", lambda b: f"{b['min_len']}-{b['max_len']}"), ("padding (shard order)", pct("padding_shard_order")),
    ("padding (sorted in shard)", pct("padding_sorted")),
]


def cmd_padding(args: argparse.Namespace) -> None:
    from dgbatch.planning.buckets import padded_positions

    start = machine()
    with workdir(args.workdir, args.keep) as work:
        prompts = mixed_prompts(args.rows, args.seed, args.long_fraction)
        inp = write_input(work / "input", prompts, args.files, args.row_group_rows)
        common = [f"engine.batch_size={args.batch_size}", f"plan.shard_rows={args.shard_rows}",
                  f"plan.num_buckets={args.num_buckets}", f"plan.fragment_rows={args.fragment_rows}"]
        rows, plans = [], {}
        for bucketing, edges_override in (("off", "plan.bucket_edges=[]"), ("auto", "plan.bucket_edges=auto")):
            cfg = job_config(inp, work / f"out-{bucketing}", [*common, edges_override])
            t0 = time.perf_counter()
            edges, metas, root = plan_in_process(cfg)
            plan_s = round(time.perf_counter() - t0, 2)
            ids = sorted(m.shard_id for m in metas)
            by_id = {m.shard_id: m for m in metas}
            lengths = shard_lengths(root, ids)
            plans[bucketing] = {"edges": edges, "shards": len(metas), "plan_s": plan_s,
                                "buckets": per_bucket([by_id[i] for i in ids], lengths, edges, args.batch_size)}
            if bucketing == "off":  # one bucket: shards in id order hold the rows in input order
                flat = [n for ls in lengths for n in ls]
                rows.append(padding_row("input order (no shards)", "n/a", 0, sum(flat),
                                        padded_positions(flat, args.batch_size)))
            rows += padding_rows_of_plan(bucketing, [by_id[i] for i in ids], lengths, args.batch_size)
    lengths_all = sorted(len(p) for p in prompts)
    print(f"{args.rows:,} prompts, content length (chars) p50 {lengths_all[len(lengths_all) // 2]} "
          f"p90 {lengths_all[int(len(lengths_all) * 0.9)]} max {lengths_all[-1]}; batch_size {args.batch_size}, "
          f"shard_rows {args.shard_rows}; auto edges {plans['auto']['edges']}\n")
    print(markdown_table(PADDING_COLUMNS, rows))
    print("\nper bucket (plan.bucket_edges=auto):\n")
    print(markdown_table(BUCKET_COLUMNS, plans["auto"]["buckets"]))
    save(args.out, "padding", args, {"rows": rows, "plans": plans}, start)


def per_bucket(metas: list, lengths: list[list[int]], edges: list[int], batch_size: int) -> list[dict]:
    """Rows, length range and padding (shard order and sorted within shard) of each bucket."""
    from dgbatch.planning.buckets import padded_positions

    out = []
    for b in sorted({m.bucket for m in metas}):
        picked = [(m, ls) for m, ls in zip(metas, lengths) if m.bucket == b]
        flat = [n for _, ls in picked for n in ls]
        tokens = sum(flat)
        in_order = sum(m.padded_positions for m, _ in picked)
        in_sorted = sum(padded_positions(sorted(ls), batch_size) for _, ls in picked)
        upper = edges[b] if 0 <= b < len(edges) else "open"
        out.append({"bucket": b, "upper_edge": upper, "rows": sum(m.rows for m, _ in picked), "shards": len(picked),
                    "min_len": min(flat, default=0), "max_len": max(flat, default=0),
                    "padding_shard_order": 1 - tokens / in_order if in_order else 0.0,
                    "padding_sorted": 1 - tokens / in_sorted if in_sorted else 0.0})
    return out



def parser() -> argparse.ArgumentParser:
    p = common_args(argparse.ArgumentParser(description="prompt padding with and without length buckets"))
    p.set_defaults(func=cmd_padding)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--long-fraction", type=float, default=0.3, help="share of long prompts in the mix")
    p.add_argument("--batch-size", type=int, default=32, help="engine.batch_size")
    p.add_argument("--shard-rows", type=int, default=1024, help="plan.shard_rows")
    p.add_argument("--num-buckets", type=int, default=8, help="plan.num_buckets")
    p.add_argument("--fragment-rows", type=int, default=65536, help="plan.fragment_rows")
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--row-group-rows", type=int, default=8192)
    return p



if __name__ == "__main__":
    run_command(parser)
