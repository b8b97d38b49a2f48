"""Planning throughput and driver memory: `driver.make_plan` (Ray tasks tokenize, bucket and write shards).

    python benchmarks/planning_bench.py --rows 100000 300000 1000000 --warm-rerun --out bench-planning.json
    python benchmarks/planning_bench.py --rows 100000 --profile --out bench-planning-profile.json

Wall time, prompts/s, shards written and driver memory, one fresh subprocess and one local Ray per
size. --profile adds a cProfile of one `plan_fragment` call, in process. Memory is the driver's
resident set: VmRSS before the measured phase, and its high-water mark during it."""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
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
    write_tiled_input,
)


def child_planning(args: argparse.Namespace) -> None:
    """In a fresh process: resolve the job as driver.run does, start Ray, time make_plan."""
    from dgbatch import driver
    from dgbatch.io.commit import list_names
    from dgbatch.io.fs import filesystem, join
    from dgbatch.io.layout import Layout
    from dgbatch.planning.source import inspect_input
    from dgbatch.pool import init_ray

    cfg = job_config(Path(args.input), Path(args.output), args.overrides)
    fs, root = filesystem(cfg.output.path, cfg.storage)
    layout = Layout(root)
    inp = inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    model_dir, max_prompt = max_prompt_of(cfg)
    t0 = time.perf_counter()
    ray = init_ray(cfg)
    ray_s = time.perf_counter() - t0
    with peak_memory() as mem:
        t0 = time.perf_counter()
        plan = driver.make_plan(ray, cfg, fs, layout, model_dir, max_prompt)
        plan_s = time.perf_counter() - t0
    files = len(list_names(fs, join(root, "_plan", "shards"), ".parquet"))
    warm = {}
    if args.warm_rerun:  # the same plan again into a new root: Ray workers are up and have imported everything
        t0 = time.perf_counter()
        driver.make_plan(ray, cfg, fs, Layout(join(root, "_warm")), model_dir, max_prompt)
        warm_s = time.perf_counter() - t0
        warm = {"plan_warm_s": round(warm_s, 2), "prompts_per_s_warm": round(plan.num_rows / warm_s, 1)}
    ray.shutdown()
    # Driver-side parts of make_plan, timed again on their own (warm, so a lower bound).
    from dgbatch.checkpoint import load_tokenizer
    from dgbatch.planning.planner import bucket_edges

    t0 = time.perf_counter()
    inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    inspect_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bucket_edges(cfg, inp, load_tokenizer(model_dir), max_prompt)
    edges_s = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps({
        "rows": plan.num_rows, "fragments": len(inp.fragments), "shards": len(plan.shards), "shard_files": files,
        "ray_init_s": round(ray_s, 2), "plan_s": round(plan_s, 2), "prompts_per_s": round(plan.num_rows / plan_s, 1),
        "inspect_input_s": round(inspect_s, 3), "bucket_edges_s": round(edges_s, 3), "edges": plan.edges,
        **warm, **mem}))


def profile_plan_fragment(cfg, top: int) -> str:
    """cProfile of one `plan_fragment` call (the work of one Ray task), in this process."""
    from dgbatch.checkpoint import load_tokenizer
    from dgbatch.io.fs import filesystem
    from dgbatch.planning.planner import bucket_edges, plan_fragment
    from dgbatch.planning.source import inspect_input

    _, root = filesystem(cfg.output.path)
    inp = inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    model_dir, max_prompt = max_prompt_of(cfg)
    edges = bucket_edges(cfg, inp, load_tokenizer(model_dir), max_prompt)
    plan_fragment(cfg, inp.fragments[0], edges, str(model_dir), max_prompt, root)  # warm: imports, tokenizer
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(plan_fragment, cfg, inp.fragments[0], edges, str(model_dir), max_prompt, root)
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    buf.write(f"plan_fragment on fragment 0 ({inp.fragments[0].num_rows:,} rows): {wall:.2f}s, "
              f"{inp.fragments[0].num_rows / wall:,.0f} rows/s in one process\n")
    stats = pstats.Stats(prof, stream=buf).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return buf.getvalue()


PLANNING_COLUMNS: list[Column] = [
    ("prompts", key("rows")), ("fragments", key("fragments")), ("shards", key("shards")),
    ("plan wall (s)", key("plan_s")), ("prompts/s", key("prompts_per_s")),
    ("prompts/s (warm rerun)", key("prompts_per_s_warm")), ("driver RSS before (MiB)", key("rss_before_mib")),
    ("driver peak RSS (MiB)", key("peak_rss_mib")), ("growth (MiB)", key("peak_growth_mib")),
    ("bucket_edges (s)", key("bucket_edges_s")), ("ray.init (s)", key("ray_init_s")),
]


def cmd_planning(args: argparse.Namespace) -> None:
    start = machine()
    overrides = [f"ray.num_cpus={args.num_cpus}", f"plan.shard_rows={args.shard_rows}",
                 f"plan.fragment_rows={args.fragment_rows}", f"engine.batch_size={args.batch_size}"]
    results, profile = [], None
    with workdir(args.workdir, args.keep) as work:
        for n in args.rows:
            t0 = time.perf_counter()
            inp = write_tiled_input(work / f"input-{n}", n, args.prompts, args.seed, args.files, args.row_group_rows)
            gen_s = time.perf_counter() - t0
            out = work / f"out-{n}"
            child = ["--input", str(inp), "--output", str(out), *overrides]
            res = run_child(__file__, child + (["--warm-rerun"] if args.warm_rerun else []), args.timeout)
            results.append({"requested_rows": n, "generate_input_s": round(gen_s, 2), **res})
            print(f"  {n:,} rows: {res['plan_s']:.1f}s, {res['prompts_per_s']:,.0f} prompts/s, "
                  f"peak {res['peak_rss_mib']:.0f} MiB", flush=True)
            if args.profile and profile is None:
                profile = profile_plan_fragment(job_config(inp, out / "profile", overrides), args.profile_top)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(inp, ignore_errors=True)
    print()
    print(markdown_table(PLANNING_COLUMNS, results))
    if profile:
        print("\n" + profile)
    save(args.out, "planning", args, {"sizes": results, "profile": profile}, start)



def parser() -> argparse.ArgumentParser:
    p = common_args(argparse.ArgumentParser(description="make_plan throughput and driver memory"))
    p.set_defaults(func=cmd_planning)
    p.add_argument("--rows", type=int, nargs="+", default=[20000, 50000, 100000])
    p.add_argument("--prompts", choices=["toy", "mixed"], default="toy", help="toy task family, or mixed lengths")
    p.add_argument("--num-cpus", type=int, default=2, help="ray.num_cpus")
    p.add_argument("--shard-rows", type=int, default=1024, help="plan.shard_rows")
    p.add_argument("--fragment-rows", type=int, default=65536, help="plan.fragment_rows")
    p.add_argument("--batch-size", type=int, default=32, help="engine.batch_size")
    p.add_argument("--files", type=int, default=4, help="input Parquet files")
    p.add_argument("--row-group-rows", type=int, default=16384)
    p.add_argument("--warm-rerun", action="store_true",
                   help="plan again in the same Ray session (warm workers): separates fixed startup cost")
    p.add_argument("--profile", action="store_true", help="also cProfile one plan_fragment call")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per size")
    return p


def child_parser() -> argparse.ArgumentParser:
    """The hidden child: one size, in a fresh interpreter (`run_child`)."""
    p = argparse.ArgumentParser()
    p.set_defaults(func=child_planning)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--warm-rerun", action="store_true")
    p.add_argument("overrides", nargs="*")
    return p



if __name__ == "__main__":
    run_command(parser, child_parser)
