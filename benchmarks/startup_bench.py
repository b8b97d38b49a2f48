"""Start-up of the demo job: from `dgbatch run configs/demo.yaml` to its first generated row, piece by piece.

    python benchmarks/startup_bench.py --repeats 5 --out bench-startup.json

Each run is a fresh `dgbatch run` process (a fresh local Ray, a fresh output). The driver logs where
its start-up went, in seconds since its process started: checks done, Ray up (and how long
`ray.init` took), plan ready, the replica's process start, its model loaded (imports, load), its
engine's first step and first finished row. Planning runs beside Ray's and the replica's start, so
the pieces overlap; "first row" is the figure the target (<= 5 s) is about. Medians over the runs,
with the spread.
"""

from __future__ import annotations

import argparse
import os

from _common import Column, cli_job, common_args, machine, markdown_table, median, run_command, save, workdir

PIECES = [("checks", "checks done"), ("ray_init", "ray.init took"), ("ray_up", "Ray up"), ("plan", "plan ready"),
          ("replica_process", "replica process started"), ("actor_init", "replica actor's __init__ began"),
          ("imports", "replica imports took"),
          ("load", "model load took"), ("model_loaded", "replica ready (model loaded)"),
          ("first_step", "first engine step"), ("first_row", "first generated row")]


def cmd(args: argparse.Namespace) -> None:
    start = machine()
    runs = []
    with workdir(args.workdir, args.keep) as work:
        for k in range(args.repeats):
            r = cli_job([f"output.path={work / f'out-{k}'}", *args.set], work / f"job-{k}.log", args.timeout)
            runs.append(r)
            print(f"  run {k + 1}: first row at {r['start_up'].get('first_row')} s, process {r['process_wall_s']:.1f} s",
                  flush=True)
    rows = []
    for name, label in [*PIECES, ("process_wall_s", "whole job (process wall)")]:
        vals = [r["start_up"].get(name) if name != "process_wall_s" else r[name] for r in runs]
        vals = [v for v in vals if v is not None]
        if vals:
            rows.append({"piece": label, "median_s": median(vals), "min_s": min(vals), "max_s": max(vals)})
    columns: list[Column] = [("seconds since `dgbatch run` started", lambda r: r["piece"]),
                             ("median", lambda r: f"{r['median_s']:.2f}"), ("min", lambda r: f"{r['min_s']:.2f}"),
                             ("max", lambda r: f"{r['max_s']:.2f}")]
    print(f"\n{args.repeats} runs of configs/demo.yaml; load at start {start['loadavg']}, at end "
          f"{os.getloadavg()[0]:.2f}\n")
    print(markdown_table(columns, rows))
    save(args.out, "startup", args, {"pieces": rows, "runs": runs}, start)


def parser() -> argparse.ArgumentParser:
    p = common_args(argparse.ArgumentParser(description="the demo job's start-up, piece by piece"))
    p.set_defaults(func=cmd)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra job override")
    p.add_argument("--timeout", type=float, default=600, help="seconds per job")
    return p


if __name__ == "__main__":
    run_command(parser)
