"""Start-up of the demo job: from `dgbatch run configs/demo.yaml` to its first generated row, piece by piece.

    python benchmarks/startup_bench.py --repeats 5 --out bench-startup.json

Each run is a fresh `dgbatch run` process (a fresh local Ray, a fresh output). The driver logs where
its start-up went, in seconds since its process started: checks done, Ray up (and how long
`ray.init` took), plan ready, the replica's process start, its model loaded (imports, load), its
engine's first step and first finished row. Planning runs beside Ray's and the replica's start, so
the pieces overlap; "first row" is the figure the target (<= 5 s) is about. Medians over the runs,
with the spread.

`--cluster standing` joins a `ray start --head` started once beforehand (`ray.address`), as a job
submitted to a running cluster does; `standing-preload` is that head started with
`--system-config '{"preload_python_modules": [...]}'` (what a replica imports), as infra/ can start one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _common import Column, cli_job, common_args, machine, markdown_table, median, run_command, save, workdir

PIECES = [("checks", "checks done"), ("ray_init", "ray.init took"), ("ray_up", "Ray up"), ("plan", "plan ready"),
          ("replica_process", "replica process started"), ("actor_init", "replica actor's __init__ began"),
          ("imports", "replica imports took"),
          ("load", "model load took"), ("model_loaded", "replica ready (model loaded)"),
          ("first_step", "first engine step"), ("first_row", "first generated row")]


@contextlib.contextmanager
def cluster(kind: str) -> Iterator[tuple[list[str], dict | None]]:
    """(job overrides, job environment) for a fresh local Ray per job, or a `ray start --head` standing for
    all of them (stopped at the end)."""
    if kind == "local":
        yield [], None
        return
    from dgbatch.replica import REPLICA_IMPORTS

    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "token"}  # as tests/test_job_submit.py's head
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = [ray_bin, "start", "--head", "--num-cpus", "2", "--port", str(port), "--include-dashboard", "false",
             "--disable-usage-stats"]
    if kind == "standing-preload":
        start += ["--system-config", json.dumps({"preload_python_modules": list(REPLICA_IMPORTS)})]
    try:
        subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True, env=env, capture_output=True, timeout=60)
        subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
        time.sleep(5)  # the head's own start-up is not the job's
        yield [f"ray.address=127.0.0.1:{port}"], env
    finally:
        subprocess.run(["pkill", "-9", "-f", tmp], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def cmd(args: argparse.Namespace) -> None:
    start = machine()
    runs = []
    with workdir(args.workdir, args.keep) as work, cluster(args.cluster) as (joined, env):
        for k in range(args.repeats):
            r = cli_job([f"output.path={work / f'out-{k}'}", *joined, *args.set], work / f"job-{k}.log",
                        args.timeout, env=env)
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
    print(f"\n{args.repeats} runs of configs/demo.yaml ({args.cluster} Ray); load at start {start['loadavg']}, at end "
          f"{os.getloadavg()[0]:.2f}\n")
    print(markdown_table(columns, rows))
    save(args.out, "startup", args, {"pieces": rows, "runs": runs}, start)


def parser() -> argparse.ArgumentParser:
    p = common_args(argparse.ArgumentParser(description="the demo job's start-up, piece by piece"))
    p.set_defaults(func=cmd)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cluster", choices=["local", "standing", "standing-preload"], default="local",
                   help="a fresh local Ray per job (the default), or one `ray start --head` they all join")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra job override")
    p.add_argument("--timeout", type=float, default=600, help="seconds per job")
    return p


if __name__ == "__main__":
    run_command(parser)
