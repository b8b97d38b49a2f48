"""Driver memory and time of the resume bookkeeping over N committed shards.

    python benchmarks/driver_memory_bench.py --shards 1000 3000 10000 --out bench-driver-memory.json

The plan manifest (of a tiny real input), the `data/` files (empty) and the `_commits/` markers
(realistic `ShardStats`, describing those files) are written first; the measured process (fresh,
one per size) then reuses the manifest, checks the commits (`commits.verify`), computes `todo` and
`Progress`, and runs `driver.summarize`, which checks them again and merges every marker."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import time
from pathlib import Path

from _common import (
    Column,
    common_args,
    job_config,
    key,
    machine,
    markdown_table,
    max_prompt_of,
    peak_memory,
    run_child,
    run_command,
    save,
    workdir,
    write_input,
)


def fake_stats_pool(rows: int, size: int = 64, seed: int = 0) -> list[dict]:
    """Realistic ShardStats dicts (tokens/forward histograms of a few hundred bins), `size` distinct."""
    from dgbatch.stats import ShardStats

    rng = random.Random(seed)
    pool = []
    for _ in range(size):
        st = ShardStats()
        for _ in range(rows):
            reason = rng.choices(["eos", "length", "error"], [0.95, 0.045, 0.005])[0]
            n_out = 0 if reason == "error" else rng.randint(4, 128)
            tpf = None if reason == "error" else max(1.0, rng.gauss(4.0, 1.2))
            st.add_row(reason, n_out, rng.randint(20, 400), tpf)
        pool.append(st.to_dict())
    return pool


def write_committed_job(root: Path, cfg, num_shards: int, shard_rows: int) -> None:
    """A plan manifest of `num_shards` shards, each with an (empty) data file and a commit marker that
    describes it, for the plan of `cfg`'s (tiny, real) input at max_prompt 0."""
    from dgbatch import driver
    from dgbatch.config import fingerprint_of
    from dgbatch.io.commit import write_json
    from dgbatch.io.fs import filesystem
    from dgbatch.io.layout import Layout
    from dgbatch.io.markers import DataFile, marker
    from dgbatch.planning.planner import ShardMeta
    from dgbatch.planning.source import inspect_input

    fs, _ = filesystem(str(root))
    layout = Layout(str(root))
    inp = inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    plan_id = fingerprint_of(driver.plan_identity(cfg.identity({"model.max_prompt_tokens": 0}), inp))
    shards = [ShardMeta(f"f{i // 64:06d}-b{i % 8:02d}-{(i // 8) % 8:04d}", shard_rows, i % 8, 0,
                        shard_rows * 150, shard_rows * 180) for i in range(num_shards)]
    write_json(fs, layout.plan_manifest, driver.Plan(plan_id, [32, 64, 128, 256, 384, 512, 768],
                                                     num_shards * shard_rows, shards, inp.identity()).to_dict())
    data, commits = Path(layout.data()), Path(layout.commit())
    data.mkdir(parents=True, exist_ok=True)
    commits.mkdir(parents=True, exist_ok=True)
    pool = fake_stats_pool(shard_rows)
    empty = DataFile.of_bytes(b"", shard_rows)
    for i, s in enumerate(shards):  # plain writes: the layout the driver reads, without per-file fsyncs
        (data / f"{s.shard_id}.parquet").write_bytes(b"")
        m = marker(s.shard_id, plan_id, empty, pool[i % len(pool)])
        (commits / f"{s.shard_id}.json").write_text(json.dumps(m, indent=2) + "\n")


def child_driver_memory(args: argparse.Namespace) -> None:
    """In a fresh process: the resume path of driver.run from make_plan (reused) to summarize."""
    from dgbatch import commits, driver
    from dgbatch.io.fs import filesystem
    from dgbatch.io.layout import Layout

    cfg = job_config(Path(args.input), Path(args.output))
    max_prompt_of(cfg)  # as driver.run does before planning: imports transformers (and torch), a real baseline
    with peak_memory() as mem:
        t_start = time.time()
        fs, root = filesystem(cfg.output.path, cfg.storage)
        layout = Layout(root)
        t0 = time.perf_counter()
        plan = driver.make_plan(None, cfg, fs, layout, None, 0)  # fingerprint matches: reads the manifest only
        t1 = time.perf_counter()
        committed = commits.verify(fs, layout, plan.fingerprint, plan.shard_rows()).shards
        todo = [s for s in plan.shards if s.shard_id not in committed]
        driver.progress_of(plan, committed)
        t2 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = driver.summarize(fs, layout, plan, {}, t_start, len(todo))
        t3 = time.perf_counter()
    summary = json.loads(Path(layout.summary).read_text())
    Path(args.result).write_text(json.dumps({
        "shards": len(plan.shards), "committed": len(committed), "todo": len(todo), "rc": rc,
        "summary_rows": summary["rows"], "load_plan_s": round(t1 - t0, 3), "list_and_todo_s": round(t2 - t1, 3),
        "finish_s": round(t3 - t2, 3), "total_s": round(t3 - t0, 3), **mem}))


DRIVER_MEMORY_COLUMNS: list[Column] = [
    ("shards", key("shards")), ("load plan (s)", key("load_plan_s")), ("list + todo (s)", key("list_and_todo_s")),
    ("finish (s)", key("finish_s")), ("total (s)", key("total_s")), ("RSS before (MiB)", key("rss_before_mib")),
    ("peak RSS (MiB)", key("peak_rss_mib")), ("growth (MiB)", key("peak_growth_mib")),
]


def cmd_driver_memory(args: argparse.Namespace) -> None:
    start = machine()
    results = []
    with workdir(args.workdir, args.keep) as work:
        write_input(work / "tiny-input", ["reverse abc"], 1, 1)  # what the plan was made from
        for n in args.shards:
            root = work / f"job-{n}"
            cfg = job_config(work / "tiny-input", root)
            t0 = time.perf_counter()
            write_committed_job(root, cfg, n, args.shard_rows)
            gen_s = time.perf_counter() - t0
            res = run_child(__file__, ["--input", str(work / "tiny-input"), "--output", str(root)],
                            args.timeout)
            if res["todo"] or res["rc"] or res["summary_rows"] != n * args.shard_rows:
                raise RuntimeError(f"resume bookkeeping went wrong at {n} shards: {res}")
            results.append({"generate_s": round(gen_s, 2), **res})
            print(f"  {n:,} shards: {res['total_s']:.2f}s, peak {res['peak_rss_mib']:.0f} MiB", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(markdown_table(DRIVER_MEMORY_COLUMNS, results))
    save(args.out, "driver-memory", args, results, start)



def parser() -> argparse.ArgumentParser:
    p = common_args(argparse.ArgumentParser(description="driver memory and time of the resume bookkeeping"))
    p.set_defaults(func=cmd_driver_memory)
    p.add_argument("--shards", type=int, nargs="+", default=[1000, 3000, 10000])
    p.add_argument("--shard-rows", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per size")
    return p


def child_parser() -> argparse.ArgumentParser:
    """The hidden child: one size, in a fresh interpreter (`run_child`)."""
    p = argparse.ArgumentParser()
    p.set_defaults(func=child_driver_memory)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--result", required=True)
    return p



if __name__ == "__main__":
    run_command(parser, child_parser)
