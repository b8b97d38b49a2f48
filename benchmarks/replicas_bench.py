"""Whole jobs (`dgbatch run configs/demo.yaml ...`) with 1 and 2 replicas: rows/s and the ratio.

    python benchmarks/replicas_bench.py --rows 1024 --max-new-tokens 32 --out bench-replicas.json

1 CPU per replica, local Ray with 2 CPUs; rows/s from each `_summary.json` (start-up included) and
between the first and the last shard commit (start-up left out)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    DEMO_CONFIG,
    REPO,
    Column,
    common_args,
    key,
    machine,
    markdown_table,
    run_command,
    save,
    times,
    toy_prompts,
    workdir,
    write_input,
)

PROGRESS_RATE = re.compile(r"\| ([\d,.]+) rows/s \|")


def run_job(input_path: Path, output: Path, num_replicas: int, args: argparse.Namespace) -> dict:
    overrides = [f"input.path={input_path}", f"output.path={output}", f"replicas.num_replicas={num_replicas}",
                 "replicas.num_cpus=1", f"ray.num_cpus={args.num_cpus}", f"plan.shard_rows={args.shard_rows}",
                 f"sampling.max_new_tokens={args.max_new_tokens}"]
    overrides += ([f"engine.batch_size={args.batch_size}"] if args.batch_size else []) + args.set
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dgbatch.cli", "run", str(DEMO_CONFIG), *overrides], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    (output.parent / f"job-{num_replicas}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"job with {num_replicas} replica(s) failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((output / "_summary.json").read_text())
    rates = PROGRESS_RATE.findall(proc.stdout)
    return {"replicas": num_replicas, "rows": summary["rows"], "shards": summary["shards"],
            "output_tokens": summary["output_tokens"], "job_wall_s": summary["wall_time_s"],
            "rows_per_s": summary["rows"] / summary["wall_time_s"],
            "progress_rows_per_s": float(rates[-1].replace(",", "")) if rates else None,
            "steady_rows_per_s": steady_rate(output), "process_wall_s": round(wall, 2)}


def steady_rate(output: Path) -> float | None:
    """Rows/s between the first and the last shard commit (data file times), without startup.

    The first committed shard's rows are left out: its work started before the first commit. An
    estimate: it needs several shards per replica to mean much.
    """
    commits = sorted((p.stat().st_mtime, json.loads((output / "_commits" / f"{p.stem}.json").read_text())["rows"])
                     for p in (output / "data").glob("*.parquet"))
    if len(commits) < 2 or commits[-1][0] <= commits[0][0]:
        return None
    return sum(rows for _, rows in commits[1:]) / (commits[-1][0] - commits[0][0])


REPLICAS_COLUMNS: list[Column] = [
    ("replicas", key("replicas")), ("rows", key("rows")), ("shards", key("shards")),
    ("job wall (s)", key("job_wall_s")), ("rows/s (job)", key("rows_per_s")), ("speedup (job)", times("speedup")),
    ("rows/s (scheduling phase)", key("progress_rows_per_s")),
    ("rows/s (first to last commit)", key("steady_rows_per_s")), ("speedup (commits)", times("steady_speedup")),
]


def cmd_replicas(args: argparse.Namespace) -> None:
    start = machine()
    results = []
    with workdir(args.workdir, args.keep) as work:
        inp = write_input(work / "input", toy_prompts(args.rows, args.seed), 1, args.rows)
        for k in args.num_replicas:
            res = run_job(inp / "part-0000.parquet", work / f"out-{k}", k, args)
            results.append(res)
            print(f"  {k} replica(s): {res['rows_per_s']:.2f} rows/s over {res['job_wall_s']:.1f}s", flush=True)
    base, steady_base = results[0]["rows_per_s"], results[0]["steady_rows_per_s"]
    for r in results:
        r["speedup"] = r["rows_per_s"] / base
        r["steady_speedup"] = r["steady_rows_per_s"] / steady_base if r["steady_rows_per_s"] and steady_base else None
    print()
    print(markdown_table(REPLICAS_COLUMNS, results))
    save(args.out, "replicas", args, results, start)



def parser() -> argparse.ArgumentParser:
    p = common_args(argparse.ArgumentParser(description="job rows/s with 1 and 2 replicas"))
    p.set_defaults(func=cmd_replicas)
    p.add_argument("--rows", type=int, default=1024,
                   help="prompts; the toy model runs ~8 rows in 0.2 s, so fewer leave the job dominated by startup")
    p.add_argument("--num-replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shard-rows", type=int, default=32, help="plan.shard_rows (several shards per replica)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="sampling.max_new_tokens")
    p.add_argument("--batch-size", type=int, default=None, help="engine.batch_size (default: configs/demo.yaml)")
    p.add_argument("--num-cpus", type=int, default=2, help="ray.num_cpus")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra job override, repeatable (e.g. --set engine.backend=...)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per job")
    return p



if __name__ == "__main__":
    run_command(parser)
