"""Job efficiency: the job's generation tokens/s ÷ the engine alone on the same requests and batch size.

    python benchmarks/job_efficiency_bench.py --prompts 1200 4800 --shard-rows 1024 --repeats 3 --out bench-eff.json

Each round runs, in fresh processes, one after the other:

  job     `driver.run` with a `ReplicaPool` (as `dgbatch run` does: local Ray with 2 CPUs, one replica
          of 1 CPU, batch --batch-size); its replica's stream reports when its engine took its first
          step and when the last row finished: generation tokens/s = output tokens / that span (start-up
          excluded, the end's drain included);
  alone   the engine by itself (`EngineBackend.generate`, one thread, as `benchmarks/engine_bench.py`
          runs it) over exactly the job's requests (the plan's shards, in the order the job queues
          them, same row ids, so the same tokens): output tokens / wall time. No Ray running.

Efficiency = job tokens/s ÷ alone tokens/s; the target is >= 0.95. On a shared machine wall time
drifts with other work, so the same ratio in CPU time is reported too: the alone run's CPU seconds ÷
the replica process's CPU seconds over the job's generation span (every thread: the engine loop,
the shards' reads and commits, Ray's own threads in the actor). Also reported: the job's time inside
engine steps and between steps without work (waiting for rows: a read, a commit or a driver round
trip on the engine's path would show here), and whether both produced the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from pathlib import Path

from _common import (
    Column,
    common_args,
    demo_input,
    job_config,
    key,
    machine,
    markdown_table,
    median,
    run_child,
    run_command,
    save,
    workdir,
)


def child_job(args: argparse.Namespace) -> None:
    """One job on a fresh pool; its replica's stream stats."""
    from dgbatch import driver
    from dgbatch.pool import ReplicaPool

    cfg = job_config(Path(args.input), Path(args.output), args.overrides)
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()), ReplicaPool(cfg) as pool:
        code = driver.run(cfg, pool=pool)
        [stats] = pool.stats()
    import ray

    ray.shutdown()
    summary = json.loads((Path(args.output) / "_summary.json").read_text())
    span = stats["last_row_at"] - stats["first_step_at"]
    Path(args.result).write_text(json.dumps({
        "code": code, "wall_s": time.time() - t0, "span_s": span, "output_tokens": stats["output_tokens"],
        "cpu_s": stats["cpu_at_last_row"] - stats["cpu_at_first_step"], "step_cpu_s": stats["step_cpu_s"],
        "summary_output_tokens": summary["output_tokens"], "tokens_per_s": stats["output_tokens"] / span,
        "steps": stats["steps"], "step_s": stats["step_s"], "idle_s": stats["idle_s"], "rows": stats["rows"],
        "batch_size": stats["batch_size"], "shards": stats["shards"]}))


def child_alone(args: argparse.Namespace) -> None:
    """The engine alone over the job's planned requests, in the job's queue order."""
    import pyarrow.parquet as pq
    import torch

    from dgbatch import checkpoint
    from dgbatch.engine import EngineBackend
    from dgbatch.io.fs import filesystem
    from dgbatch.io.layout import Layout
    from dgbatch.planning.planner import read_shard
    from dgbatch.shard import requests_of

    cfg = job_config(Path(args.input), Path(args.output), args.overrides)
    torch.set_num_threads(1)
    model_dir, params, _ = checkpoint.resolve(cfg)
    tok = checkpoint.load_tokenizer(model_dir)
    pad, eos = checkpoint.special_ids(model_dir, tok)
    model = checkpoint.load_model(model_dir, cfg.model)
    out = Path(args.output)
    manifest = json.loads((out / "_plan" / "manifest.json").read_text())
    fs, root = filesystem(str(out))
    reqs = []
    for s in manifest["shards"]:
        reqs += requests_of(read_shard(fs, Layout(root).plan_shard(s["shard_id"]))).requests
    backend = EngineBackend(model, params, cfg.engine.batch_size, pad, eos)
    t0, c0 = time.perf_counter(), time.process_time()
    gens = backend.generate(reqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    job = {r["id"]: r["num_output_tokens"] for f in (out / "data").glob("*.parquet")
           for r in pq.read_table(f, columns=["id", "num_output_tokens"]).to_pylist()}
    tokens = sum(len(g.token_ids) for g in gens)
    Path(args.result).write_text(json.dumps({
        "wall_s": wall, "cpu_s": cpu, "output_tokens": tokens, "tokens_per_s": tokens / wall,
        "slot_utilization": backend.stats.slot_utilization, "decoder_calls": backend.stats.decoder_calls,
        "same_tokens_as_job": all(job.get(g.row_id) == len(g.token_ids) for g in gens) and len(job) == len(gens)}))


def workload(work: Path, n: int, shard_rows: int, args: argparse.Namespace) -> dict:
    inp = demo_input(work / f"in-{n}.parquet", n, args.data_seed)
    overrides = [f"engine.batch_size={args.batch_size}", f"plan.shard_rows={shard_rows}", "ray.num_cpus=2",
                 "replicas.num_cpus=1"]
    jobs, alone = [], []
    for k in range(args.repeats):
        out = work / f"out-{n}-{shard_rows}-{k}"
        common = ["--input", str(inp), "--output", str(out), *overrides]
        jobs.append(run_child(__file__, ["job", *common], args.timeout))
        alone.append(run_child(__file__, ["alone", *common], args.timeout))
        eff = jobs[-1]["tokens_per_s"] / alone[-1]["tokens_per_s"]
        print(f"  {n} prompts, shards of {shard_rows}, round {k + 1}: job {jobs[-1]['tokens_per_s']:,.0f} tok/s "
              f"over {jobs[-1]['span_s']:.1f} s ({jobs[-1]['cpu_s']:.1f} CPU s), alone "
              f"{alone[-1]['tokens_per_s']:,.0f} tok/s over {alone[-1]['wall_s']:.1f} s ({alone[-1]['cpu_s']:.1f} CPU s): "
              f"{eff:.3f}", flush=True)
    ratios = [j["tokens_per_s"] / a["tokens_per_s"] for j, a in zip(jobs, alone)]
    cpu_ratios = [a["cpu_s"] / j["cpu_s"] for j, a in zip(jobs, alone)]  # same tokens: CPU-time tokens/s ratio
    return {"prompts": n, "shard_rows": shard_rows, "shards": jobs[0]["shards"],
            "job_tokens_per_s": median([j["tokens_per_s"] for j in jobs]),
            "alone_tokens_per_s": median([a["tokens_per_s"] for a in alone]), "efficiency": median(ratios),
            "round_efficiency": ratios, "cpu_efficiency": median(cpu_ratios), "round_cpu_efficiency": cpu_ratios,
            "job_idle_s": median([j["idle_s"] for j in jobs]),
            "job_loop_cpu_share": median([j["step_cpu_s"] / j["cpu_s"] for j in jobs]),
            "job_step_share": median([j["step_s"] / j["span_s"] for j in jobs]),
            "alone_utilization": alone[0]["slot_utilization"],
            "same_tokens": all(a["same_tokens_as_job"] for a in alone), "jobs": jobs, "alone": alone}


COLUMNS: list[Column] = [
    ("prompts", key("prompts")), ("shard rows", key("shard_rows")), ("shards", key("shards")),
    ("job gen tok/s", lambda r: f"{r['job_tokens_per_s']:,.0f}"),
    ("engine alone tok/s", lambda r: f"{r['alone_tokens_per_s']:,.0f}"),
    ("efficiency", lambda r: f"{r['efficiency']:.3f}"),
    ("per round", lambda r: ", ".join(f"{x:.3f}" for x in r["round_efficiency"])),
    ("CPU-time efficiency", lambda r: f"{r['cpu_efficiency']:.3f}"),
    ("per round (CPU)", lambda r: ", ".join(f"{x:.3f}" for x in r["round_cpu_efficiency"])),
    ("job: wall in steps", lambda r: f"{100 * r['job_step_share']:.1f}%"), ("job: idle s", key("job_idle_s")),
    ("job: replica CPU in the loop's steps", lambda r: f"{100 * r['job_loop_cpu_share']:.1f}%"),
    ("alone utilization", key("alone_utilization")), ("same tokens", key("same_tokens")),
]


def cmd(args: argparse.Namespace) -> None:
    start = machine()
    results = []
    with workdir(args.workdir, args.keep) as work:
        for n in args.prompts:
            for shard_rows in args.shard_rows:
                results.append(workload(work, n, shard_rows, args))
    print(f"\nbatch size {args.batch_size}, {args.repeats} rounds (job, then the engine alone), load at start "
          f"{start['loadavg']}, at end {os.getloadavg()[0]:.2f}\n")
    print(markdown_table(COLUMNS, results))
    save(args.out, "job-efficiency", args, results, start)


def parser() -> argparse.ArgumentParser:
    p = common_args(argparse.ArgumentParser(description="job generation tokens/s vs the engine alone"))
    p.set_defaults(func=cmd)
    p.add_argument("--prompts", type=int, nargs="+", default=[1200, 4800])
    p.add_argument("--shard-rows", type=int, nargs="+", default=[1024], help="plan.shard_rows")
    p.add_argument("--batch-size", type=int, default=32, help="engine.batch_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-seed", type=int, default=555, help="scripts/make_demo_data.py --seed")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    return p


def child_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.set_defaults(func=lambda args: (child_job if args.mode == "job" else child_alone)(args))
    p.add_argument("mode", choices=["job", "alone"])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("overrides", nargs="*")
    return p


if __name__ == "__main__":
    run_command(parser, child_parser)
