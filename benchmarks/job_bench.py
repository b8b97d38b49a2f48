"""Whole jobs, engine ÷ reference: `dgbatch run configs/demo.yaml` with each backend, same batch size.

    python benchmarks/job_bench.py --prompts 1200 4800 --shard-rows 1024 32 --repeats 3 --out bench-job.json

For each workload (N mixed toy prompts from `scripts/make_demo_data.py`) and `plan.shard_rows`, the
engine job and the reference job run in turn, `--repeats` times (E R E R ...: a drift in the machine's
speed hits both alike, and each pair gives its own ratio). Each job is a fresh `dgbatch run` process
(local Ray with 2 CPUs, one replica of 1 CPU): its wall time from spawn to exit, start-up included.
Reported: each backend's median, every run, and the per-pair ratios. The outputs of every engine run
are compared with the first (a row's tokens must not depend on what shared its batch, nor on the run).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pyarrow.dataset as pads
from _common import (
    Column,
    cli_job,
    common_args,
    demo_input,
    key,
    machine,
    markdown_table,
    median,
    run_command,
    save,
    workdir,
)


def texts(output: Path) -> dict[str, str]:
    t = pads.dataset(output / "data", format="parquet").to_table(columns=["id", "output_text"])
    return dict(zip(t.column("id").to_pylist(), t.column("output_text").to_pylist()))


def workload(work: Path, n: int, shard_rows: int, args: argparse.Namespace) -> dict:
    inp = demo_input(work / f"in-{n}.parquet", n, args.data_seed)
    runs: dict[str, list[dict]] = {"engine": [], "reference": []}
    first_texts = None
    for k in range(args.repeats):
        for backend in ("engine", "reference"):
            out = work / f"out-{n}-{shard_rows}-{backend}"
            r = cli_job([f"input.path={inp}", f"output.path={out}", f"engine.batch_size={args.batch_size}",
                         f"plan.shard_rows={shard_rows}", f"engine.backend={backend}", "ray.num_cpus=2"],
                        work / f"job-{n}-{shard_rows}-{backend}-{k}.log", args.timeout)
            if backend == "engine":
                got = texts(out)
                first_texts = first_texts or got
                r["same_outputs_as_first_run"] = got == first_texts
            runs[backend].append(r)
            print(f"  {n} prompts, shards of {shard_rows}, {backend} #{k + 1}: {r['process_wall_s']:.1f} s",
                  flush=True)
    walls = {b: [r["process_wall_s"] for r in rs] for b, rs in runs.items()}
    pairs = [r / e for e, r in zip(walls["engine"], walls["reference"])]
    return {"prompts": n, "shard_rows": shard_rows, "shards": runs["engine"][0]["shards"],
            "engine_s": median(walls["engine"]), "reference_s": median(walls["reference"]),
            "engine_runs": walls["engine"], "reference_runs": walls["reference"],
            "ratio": median(walls["reference"]) / median(walls["engine"]), "pair_ratios": pairs,
            "engine_outputs_stable": all(r["same_outputs_as_first_run"] for r in runs["engine"]), "runs": runs}


COLUMNS: list[Column] = [
    ("prompts", key("prompts")), ("shard rows", key("shard_rows")), ("shards", key("shards")),
    ("engine job s (runs)", lambda r: f"{r['engine_s']:.1f} ({', '.join(f'{x:.1f}' for x in r['engine_runs'])})"),
    ("reference job s (runs)",
     lambda r: f"{r['reference_s']:.1f} ({', '.join(f'{x:.1f}' for x in r['reference_runs'])})"),
    ("engine ÷ reference", lambda r: f"{r['ratio']:.2f}x"),
    ("per pair", lambda r: ", ".join(f"{x:.2f}" for x in r["pair_ratios"])),
    ("engine outputs stable", key("engine_outputs_stable")),
]


def cmd(args: argparse.Namespace) -> None:
    start = machine()
    results = []
    with workdir(args.workdir, args.keep) as work:
        for n in args.prompts:
            for shard_rows in args.shard_rows:
                results.append(workload(work, n, shard_rows, args))
    print(f"\nbatch size {args.batch_size}, {args.repeats} interleaved rounds, load at start "
          f"{start['loadavg']}, at end {os.getloadavg()[0]:.2f}\n")
    print(markdown_table(COLUMNS, results))
    save(args.out, "job", args, results, start)


def parser() -> argparse.ArgumentParser:
    p = common_args(argparse.ArgumentParser(description="whole jobs, engine vs reference backend"))
    p.set_defaults(func=cmd)
    p.add_argument("--prompts", type=int, nargs="+", default=[1200, 4800])
    p.add_argument("--shard-rows", type=int, nargs="+", default=[1024, 32], help="plan.shard_rows (32: the demo's)")
    p.add_argument("--batch-size", type=int, default=32, help="engine.batch_size, both backends")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (engine, reference) per workload")
    p.add_argument("--data-seed", type=int, default=555, help="scripts/make_demo_data.py --seed")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    return p


if __name__ == "__main__":
    run_command(parser)
