"""`dgbatch plan CONFIG [key=value ...]`: plan a job without generating, and estimate what it will take.

The input is read and tokenized exactly as the planner does (`planning.planner.assign_shards` cuts the
same shards), in this process and without Ray; nothing is written anywhere under the output. The
estimate of output tokens and generation time comes from a short calibration run: a sample of rows
spread evenly over the input, generated on the configured model, device and batch size.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter

from dgbatch import checkpoint
from dgbatch.config import JobConfig
from dgbatch.driver import resolved_fingerprint
from dgbatch.planning.buckets import padded_positions
from dgbatch.planning.planner import ERROR_BUCKET, assign_shards, bucket_edges, input_rows_per_shard, tokenize_fragment
from dgbatch.planning.prompts import PromptEncoder
from dgbatch.planning.source import inspect_input
from dgbatch.sizing import planned_batch_size
from dgbatch.status import reason_kind
from dgbatch.vision import image_tokens

POOL = 256  # rows kept (a seeded uniform sample of the input) to draw the calibration sample from
EXAMPLES = 3  # example rows per kind of row error
MAX_CALIBRATE = 64  # the default sample: one batch, at most this many rows


def _preview(value) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def plan_report(cfg: JobConfig, calibrate_rows: int | None = None) -> dict:
    """Everything `dgbatch plan` prints, as a dict."""
    inp = inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    model_dir, params, max_prompt = checkpoint.resolve(cfg)
    checkpoint.check_parallel(cfg, model_dir)
    tokenizer = checkpoint.load_tokenizer(model_dir)
    t0 = time.time()
    edges = bucket_edges(cfg, inp, tokenizer, max_prompt)
    encoder = PromptEncoder(tokenizer, max_prompt, system_prompt=cfg.input.system_prompt,
                            image_tokens=image_tokens(model_dir))
    batch = planned_batch_size(cfg.engine)
    rng = random.Random(0)
    col = cfg.input.prompt_column or cfg.input.messages_column  # None: input.template renders the prompt
    n = cfg.sampling.num_samples  # each input row is planned n times (its samples share a shard)
    per_shard = input_rows_per_shard(cfg)

    buckets: dict[int, dict] = {}
    shards = error_rows = prompt_tokens = max_len = 0
    padded = {"buckets": 0, "no_buckets": 0, "input_order": 0}
    kinds: Counter[str] = Counter()
    examples: dict[str, list[dict]] = {}
    pool: list[tuple[str, list[int]]] = []
    seen = 0
    for frag in inp.fragments:
        frows = tokenize_fragment(cfg, frag, encoder)
        table, ids, token_ids, errors, lengths = frows.table, frows.ids, frows.prompt_ids, frows.errors, frows.lengths

        for sid, bucket, idx in assign_shards(frag.index, lengths, edges, per_shard):
            kept = _planned(lengths, idx, n)
            b = buckets.setdefault(bucket, {"bucket": bucket, "rows": 0, "shards": 0, "prompt_tokens": 0,
                                            "padded_positions": 0})
            b["rows"] += len(idx) * n
            b["shards"] += 1
            b["prompt_tokens"] += sum(kept)
            b["padded_positions"] += padded_positions(kept, batch)
            shards += 1
        padded["no_buckets"] += sum(padded_positions(_planned(lengths, idx, n), batch)
                                    for _, _, idx in assign_shards(frag.index, lengths, [], per_shard))
        valid = _planned(lengths, range(len(lengths)), n)
        padded["input_order"] += padded_positions(valid, batch)
        prompt_tokens += sum(valid)
        max_len = max([max_len, *valid])
        prompts = (table.column(col).to_pylist() if col else table.to_pylist()) if any(errors) else []
        for i, err in enumerate(errors):
            if err is not None:
                error_rows += n
                k = reason_kind(err)
                kinds[k] += n
                if len(examples.setdefault(k, [])) < EXAMPLES:
                    examples[k].append({"id": ids[i], "error": err, "prompt": _preview(prompts[i])})
            else:  # reservoir sampling: every valid row equally likely to be in the pool
                seen += 1
                if len(pool) < POOL:
                    pool.append((ids[i], token_ids[i]))
                elif (j := rng.randrange(seen)) < POOL:
                    pool[j] = (ids[i], token_ids[i])
    padded["buckets"] = sum(b["padded_positions"] for b in buckets.values())

    bounds = [0, *edges]
    bucket_rows = []
    for k in sorted(buckets):
        b = buckets[k]
        if k == ERROR_BUCKET:
            b["tokens"] = "row errors"
        else:
            b["tokens"] = f"{bounds[k] + 1}-{edges[k]}" if k < len(edges) else f">{bounds[-1]}"
        b["padding"] = _fraction(b["prompt_tokens"], b["padded_positions"])
        bucket_rows.append(b)
    report = {
        "config_fingerprint": resolved_fingerprint(cfg),
        "output": cfg.output.path,
        "output_state": _output_state(cfg),
        "rows": inp.num_rows * n,
        "input_rows": inp.num_rows,
        "num_samples": n,
        "fragments": len(inp.fragments),
        "files": len({f.source for f in inp.fragments}),
        "shards": shards,
        "shard_rows": cfg.plan.shard_rows,
        "bucket_edges": edges,
        "bucket_edges_from": "plan.bucket_edges" if cfg.plan.bucket_edges != "auto" else
        f"auto: {cfg.plan.num_buckets} buckets fitted to a sample of prompt lengths",
        "buckets": bucket_rows,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_mean": round(prompt_tokens / max(inp.num_rows * n - error_rows, 1), 2),
        "prompt_tokens_max": max_len,
        "max_prompt_tokens": max_prompt,
        "padding_batch_size": batch,
        "padded_positions": padded,
        "padding": {k: _fraction(prompt_tokens, v) for k, v in padded.items()},
        "error_rows": error_rows,
        "errors": [{"reason": k, "rows": n, "examples": examples[k]} for k, n in kinds.most_common()],
        "planning_s": round(time.time() - t0, 2),
        "sampling": params.__dict__,
    }
    report["estimate"] = _calibrate(cfg, model_dir, params, tokenizer, pool, calibrate_rows,
                                    inp.num_rows * n - error_rows)
    return report


def _planned(lengths: list[int | None], idx, n: int) -> list[int]:
    """The prompt lengths of these rows' n samples each, as the planner lays them out (errors left out)."""
    return [lengths[i] for i in idx for _ in range(n) if lengths[i] is not None]


def _fraction(tokens: int, positions: int) -> float:
    return round(1 - tokens / positions, 4) if positions else 0.0


def _output_state(cfg: JobConfig) -> str:
    """What a run would find at output.path (read only)."""
    from dgbatch.io.commit import list_names, read_json
    from dgbatch.io.fs import filesystem
    from dgbatch.io.layout import Layout

    fs, root = filesystem(cfg.output.path, cfg.storage)
    layout = Layout(root)
    job = read_json(fs, layout.job)
    if job is None:
        return "empty: a run starts a new job"
    done = len(list_names(fs, layout.data(), ".parquet"))
    if job.get("fingerprint") != resolved_fingerprint(cfg):
        return (f"holds a job with a different config ({done} shards committed): a run is refused unless "
                "output.force=true")
    if fs.exists(layout.success):
        return f"holds this job, complete ({done} shards): a run does nothing"
    return f"holds this job with {done} shards committed: a run resumes"


def _calibrate(cfg: JobConfig, model_dir, params, tokenizer, pool, rows: int | None, todo_rows: int) -> dict:
    """Generate a few rows spread over the input; extrapolate output tokens and generation time."""
    if rows == 0 or not pool or todo_rows <= 0:
        why = "--calibrate-rows 0" if rows == 0 else "no rows to generate"
        return {"method": f"none ({why}): no model was loaded"}
    from dgbatch.generation import Request
    from dgbatch.replica import Backends
    from dgbatch.sizing import batch_size

    t_load = time.time()
    model = checkpoint.load_model(model_dir, cfg.model)
    pad_id, eos_ids = checkpoint.special_ids(model_dir, tokenizer)
    batch = batch_size(cfg.engine, model, params, max(len(ids) for _, ids in pool))  # as a replica sizes it
    backend = Backends(cfg, model, pad_id, eos_ids).build(params, batch)
    load_s = time.time() - t_load
    n = min(rows or min(batch, MAX_CALIBRATE), len(pool))
    sample = random.Random(1).sample(pool, n)
    requests = [Request(rid, ids) for rid, ids in sample]
    list(backend.generate(requests[:1]))  # warm-up: first-call costs (allocation, compilation) are not the job's
    t0 = time.time()
    gens = list(backend.generate(requests))
    dt = max(time.time() - t0, 1e-9)
    out_tokens = sum(len(g.token_ids) for g in gens)
    tpf = [g.tokens_per_forward for g in gens if g.tokens_per_forward is not None]
    per_row = out_tokens / n
    rows_per_s = n / dt
    replicas = cfg.replicas.num_replicas
    device = next(model.parameters()).device
    return {
        "method": (f"calibration: {n} rows drawn at random (seeded) from the input, generated on {device} "
                   f"({cfg.model.dtype}) by the {cfg.engine.backend} backend at batch {batch}, timed after a one-row warm-up; "
                   f"output tokens = rows x the sample's mean, time = rows / the sample's rows/s / "
                   f"{replicas} replica(s). One batch with its drain: a long job keeps its slots full and "
                   f"runs faster; start-up (Ray, replica start, model load) is not included"),
        "calibration_rows": n,
        "calibration_s": round(dt, 3),
        "model_load_s": round(load_s, 2),
        "batch_size": batch,
        "device": str(device),
        "output_tokens_per_row": round(per_row, 2),
        "tokens_per_forward_mean": round(sum(tpf) / len(tpf), 3) if tpf else None,
        "finish_reasons": dict(Counter(g.finish_reason for g in gens)),
        "rows_per_s": round(rows_per_s, 3),
        "output_tokens_per_s": round(out_tokens / dt, 2),
        "output_tokens": round(per_row * todo_rows),
        "generation_s": round(todo_rows / rows_per_s / replicas, 1),
        "replicas": replicas,
    }


def format_report(r: dict) -> str:
    def pct(f: float) -> str:
        return f"{100 * f:.1f}%"

    lines = [
        f"plan     (dry run: nothing written) output {r['output']}: {r['output_state']}",
        f"input    {r['rows']:,} rows in {r['files']} file(s), {r['fragments']} planning fragment(s)",
        f"shards   {r['shards']:,} shards of up to {r['shard_rows']:,} rows (plan.shard_rows)",
        f"buckets  edges {r['bucket_edges']} ({r['bucket_edges_from']})",
        (f"prompts  {r['prompt_tokens']:,} prompt tokens, mean {r['prompt_tokens_mean']}, "
         f"max {r['prompt_tokens_max']} (longest accepted {r['max_prompt_tokens']:,})"),
        (f"padding  {pct(r['padding']['buckets'])} of prompt positions with buckets, "
         f"{pct(r['padding']['no_buckets'])} without (one bucket, sorted within shards), "
         f"{pct(r['padding']['input_order'])} in input order; batches of {r['padding_batch_size']}"),
        "  bucket  tokens        rows  shards  prompt tokens  padding",
    ]
    lines += [f"  {b['bucket']:>6}  {b['tokens']:<10} {b['rows']:>7,} {b['shards']:>7,} {b['prompt_tokens']:>14,}  "
              f"{pct(b['padding'])}" for b in r["buckets"]]
    lines.append(f"errors   {r['error_rows']:,} rows will be error records (found at planning)")
    for e in r["errors"]:
        lines.append(f"  {e['rows']:>7,}  {e['reason']}")
        lines += [f"           e.g. {x['id']}: {x['prompt']!r}" for x in e["examples"]]
    est = r["estimate"]
    if "output_tokens" in est:
        lines += [
            (f"estimate ~{est['output_tokens']:,} output tokens ({est['output_tokens_per_row']} per row), generation "
            f"~{est['generation_s']:,.0f}s on {est['replicas']} replica(s) ({est['rows_per_s']:,.1f} rows/s, "
            f"{est['output_tokens_per_s']:,.0f} output tok/s each; tokens/forward {est['tokens_per_forward_mean']})"),
            f"         how: {est['method']}",
        ]
    else:
        lines.append(f"estimate {est['method']}")
    return "\n".join(lines)


def main(cfg: JobConfig, calibrate_rows: int | None, as_json: bool) -> int:
    report = plan_report(cfg, calibrate_rows)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    sys.stdout.flush()
    return 0
