"""Pipeline benchmarks for dgbatch: padding, planning throughput, driver memory, replica scaling.

Each subcommand prints a Markdown table (paste it into BENCHMARKS.md) and writes a JSON result to
--out. Scratch data goes under --workdir (default: a fresh temp dir, removed at the end unless
--keep). Run from the repository root with the venv active:

    python benchmarks/pipeline_bench.py padding --rows 20000 --out bench-padding.json
    python benchmarks/pipeline_bench.py planning --rows 100000 300000 1000000 --out bench-planning.json
    python benchmarks/pipeline_bench.py planning --rows 20000 --profile --out bench-planning-small.json
    python benchmarks/pipeline_bench.py driver-memory --shards 1000 3000 10000 --out bench-driver-memory.json
    python benchmarks/pipeline_bench.py replicas --rows 1024 --max-new-tokens 32 --out bench-replicas.json

What each measures:

  padding        Prompt padding fraction = padding positions / computed prompt positions, for one
                 mixed-length input planned by the real planner (`plan_fragment`) with length
                 bucketing on (`plan.bucket_edges=auto`) and off (`[]`). Batches are cut in three
                 ways: input order (no shards), shard order (what ShardMeta.padded_positions
                 records), and as the reference backend cuts them (sorted by length inside a shard).
  planning       Wall time, prompts/s, shards written and driver memory of `driver.make_plan`
                 (Ray tasks tokenize, bucket and write shards), one fresh subprocess and one local
                 Ray per size. --profile adds a cProfile of one `plan_fragment` call, in process.
  driver-memory  Peak RSS and wall time of the driver's resume bookkeeping over N committed shards:
                 reuse the plan manifest, list data/, compute todo and Progress, `driver.finish`
                 (merge all commit markers, write the summary). One fresh subprocess per size.
  replicas       Rows/s of whole jobs (`python -m dgbatch.cli run configs/demo.yaml ...`) with
                 1 and 2 replicas (1 CPU each, local Ray with 2 CPUs), from each `_summary.json`.

Memory is the driver's resident set: VmRSS before the measured phase, and its high-water mark
during it (VmHWM after resetting it through /proc/self/clear_refs; where that is refused, the
process-lifetime `ru_maxrss`). Results depend on CPU contention: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import random
import re
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOY_MODEL = REPO / "models" / "toy-diffusiongemma"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
MAX_CONTENT_CHARS = 850  # toy model: 1024 positions - 128 new tokens - ~16 chat-template tokens, with margin

# ---------------------------------------------------------------------------------------------
# Shared helpers: prompts, Parquet input, configs, memory, tables, results.
# ---------------------------------------------------------------------------------------------


def toy_prompts(n: int, seed: int) -> list[str]:
    """Prompts of the toy task family the checkpoint is trained on (short: ~20-50 tokens)."""
    from dgbatch.toy.tasks import sample_examples

    return [e.prompt for e in sample_examples(n, seed)]


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def long_prompt(rng: random.Random) -> str:
    """A long prompt: `reverse` of a long word, or a multi-sentence text (heavy-tailed length)."""
    if rng.random() < 0.5:
        return f"reverse {_word(rng, 31, 200)}"
    sentences = []
    for _ in range(1 + min(15, int(rng.expovariate(1 / 4)))):
        words = [_word(rng, 2, 9) for _ in range(rng.randint(4, 12))]
        sentences.append(" ".join(words).capitalize() + ".")
    return ("summarize: " + " ".join(sentences))[:MAX_CONTENT_CHARS]


def mixed_prompts(n: int, seed: int, long_fraction: float = 0.3) -> list[str]:
    """Toy prompts with `long_fraction` of them replaced by long ones; deterministic in (n, seed)."""
    rng = random.Random(seed + 1)
    return [long_prompt(rng) if rng.random() < long_fraction else p for p in toy_prompts(n, seed)]


def make_prompts(kind: str, n: int, seed: int) -> list[str]:
    return mixed_prompts(n, seed) if kind == "mixed" else toy_prompts(n, seed)


def write_input(directory: Path, prompts, num_files: int, row_group_rows: int) -> Path:
    """Write `prompts` (strings, or a pyarrow string array) as `num_files` Parquet files of
    `row_group_rows`-row groups; returns the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table({"prompt": prompts if isinstance(prompts, pa.Array) else pa.array(prompts, pa.string())})
    per_file = -(-len(prompts) // num_files)
    for i, start in enumerate(range(0, len(prompts), per_file)):
        pq.write_table(table.slice(start, per_file), directory / f"part-{i:04d}.parquet", row_group_size=row_group_rows)
    return directory


def write_tiled_input(directory: Path, n: int, kind: str, seed: int, num_files: int, row_group_rows: int) -> Path:
    """N prompts drawn (seeded) from a pool of 8,192: fast even at millions of rows."""
    import numpy as np
    import pyarrow as pa

    pool = pa.array(make_prompts(kind, min(n, 8192), seed), pa.string())
    idx = np.random.default_rng(seed).integers(0, len(pool), n)
    return write_input(directory, pool.take(pa.array(idx)), num_files, row_group_rows)


def job_config(input_path: Path, output_path: Path, overrides: Iterable[str] = ()):
    """A JobConfig for the toy checkpoint, `input_path` and `output_path`, plus dotted overrides."""
    from dgbatch.config import load_config

    base = {"model": {"path": str(TOY_MODEL)}, "input": {"path": str(input_path), "prompt_column": "prompt"},
            "output": {"path": str(output_path)}}
    return load_config(base=base, overrides=list(overrides))


def max_prompt_of(cfg) -> tuple[Path, int]:
    """(local model dir, longest accepted prompt) exactly as `driver.run` resolves them."""
    from dgbatch import checkpoint

    model_dir = checkpoint.local_checkpoint(cfg.model, cfg.storage)
    params = checkpoint.resolve_sampling(model_dir, cfg.sampling)
    return model_dir, checkpoint.max_prompt_tokens(cfg, checkpoint.read_model_config(model_dir), params)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def peak_memory() -> Iterator[dict]:
    """Yields a dict that, after the block, holds the resident set before it and its high-water mark
    during it, in MiB. The mark is reset through /proc/self/clear_refs; where that is refused, the
    process-lifetime high-water mark is reported (peak_scope "process")."""
    before = _status_kib("VmRSS") / 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and ru_maxrss) to the current RSS
        scope = "phase"
    except OSError:
        scope = "process"
    mem: dict = {}
    yield mem
    peak = max(_status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    mem.update(rss_before_mib=round(before, 1), peak_rss_mib=round(peak, 1),
               peak_growth_mib=round(peak - before, 1), peak_scope=scope)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "platform": platform.platform(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


Column = tuple[str, Callable[[dict], Any]]  # (header, value of one result record)


def markdown_table(columns: Sequence[Column], records: Sequence[dict]) -> str:
    """A right-aligned Markdown table, one row per record."""
    headers = [h for h, _ in columns]
    cells = [[_cell(get(r)) for _, get in columns] for r in records]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, *map(line, cells)])


def _pct(key: str) -> Callable[[dict], str]:
    return lambda r: f"{100 * r[key]:.1f}%"


def _key(key: str) -> Callable[[dict], Any]:
    return lambda r: r.get(key)


def _times(key: str) -> Callable[[dict], str | None]:
    return lambda r: None if r.get(key) is None else f"{r[key]:.2f}x"


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def save(out: Path | None, name: str, args: argparse.Namespace, results: Any, start: dict) -> None:
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    doc = {"benchmark": name, "args": params, "machine_start": start, "machine_end": machine(), "results": results}
    if out:
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {out}")


def run_child(args: list[str], timeout: float) -> dict:
    """Run this script's hidden subcommand in a fresh interpreter; returns the JSON it writes."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    try:
        proc = subprocess.run([sys.executable, __file__, *args, "--result", str(result)], check=False,
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"child {args[0]} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        return json.loads(result.read_text())
    finally:
        result.unlink(missing_ok=True)


@contextlib.contextmanager
def workdir(arg: str | None, keep: bool) -> Iterator[Path]:
    path = Path(arg) if arg else Path(tempfile.mkdtemp(prefix="dgbatch-bench-"))
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if not keep and not arg:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# padding: how much of the prompt compute is padding, with and without length buckets.
# ---------------------------------------------------------------------------------------------


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
    ("batching", _key("batching")), ("buckets", _key("bucketing")), ("shards", _key("shards")),
    ("prompt tokens", _key("prompt_tokens")), ("computed positions", _key("computed_positions")),
    ("padding", _pct("padding_fraction")),
]
BUCKET_COLUMNS: list[Column] = [
    ("bucket", _key("bucket")), ("upper edge", _key("upper_edge")), ("rows", _key("rows")), ("shards", _key("shards")),
    ("lengths", lambda b: f"{b['min_len']}-{b['max_len']}"), ("padding (shard order)", _pct("padding_shard_order")),
    ("padding (sorted in shard)", _pct("padding_sorted")),
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


# ---------------------------------------------------------------------------------------------
# planning: make_plan throughput and driver memory, one fresh process (and Ray) per size.
# ---------------------------------------------------------------------------------------------


def child_planning(args: argparse.Namespace) -> None:
    """In a fresh process: resolve the job as driver.run does, start Ray, time make_plan."""
    from dgbatch import driver
    from dgbatch.io.commit import list_names
    from dgbatch.io.fs import filesystem, join
    from dgbatch.io.layout import Layout
    from dgbatch.planning.source import inspect_input

    cfg = job_config(Path(args.input), Path(args.output), args.overrides)
    fs, root = filesystem(cfg.output.path, cfg.storage)
    layout = Layout(root)
    inp = inspect_input(cfg.input, cfg.storage, cfg.plan.fragment_rows)
    model_dir, max_prompt = max_prompt_of(cfg)
    t0 = time.perf_counter()
    ray = driver.init_ray(cfg)
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
    ("prompts", _key("rows")), ("fragments", _key("fragments")), ("shards", _key("shards")),
    ("plan wall (s)", _key("plan_s")), ("prompts/s", _key("prompts_per_s")),
    ("prompts/s (warm rerun)", _key("prompts_per_s_warm")), ("driver RSS before (MiB)", _key("rss_before_mib")),
    ("driver peak RSS (MiB)", _key("peak_rss_mib")), ("growth (MiB)", _key("peak_growth_mib")),
    ("bucket_edges (s)", _key("bucket_edges_s")), ("ray.init (s)", _key("ray_init_s")),
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
            child = ["_planning-child", "--input", str(inp), "--output", str(out), *overrides]
            res = run_child(child + (["--warm-rerun"] if args.warm_rerun else []), args.timeout)
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


# ---------------------------------------------------------------------------------------------
# driver-memory: resume bookkeeping over N committed shards.
# ---------------------------------------------------------------------------------------------


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
    """In a fresh process: the resume path of driver.run from make_plan (reused) to finish."""
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
        progress = driver.Progress(plan.num_rows)
        progress.done_rows = sum(s.rows for s in plan.shards if s.shard_id in committed)
        t2 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = driver.finish(fs, layout, plan, {}, t_start, len(todo))
        t3 = time.perf_counter()
    summary = json.loads(Path(layout.summary).read_text())
    Path(args.result).write_text(json.dumps({
        "shards": len(plan.shards), "committed": len(committed), "todo": len(todo), "rc": rc,
        "summary_rows": summary["rows"], "load_plan_s": round(t1 - t0, 3), "list_and_todo_s": round(t2 - t1, 3),
        "finish_s": round(t3 - t2, 3), "total_s": round(t3 - t0, 3), **mem}))


DRIVER_MEMORY_COLUMNS: list[Column] = [
    ("shards", _key("shards")), ("load plan (s)", _key("load_plan_s")), ("list + todo (s)", _key("list_and_todo_s")),
    ("finish (s)", _key("finish_s")), ("total (s)", _key("total_s")), ("RSS before (MiB)", _key("rss_before_mib")),
    ("peak RSS (MiB)", _key("peak_rss_mib")), ("growth (MiB)", _key("peak_growth_mib")),
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
            res = run_child(["_driver-memory-child", "--input", str(work / "tiny-input"), "--output", str(root)],
                            args.timeout)
            if res["todo"] or res["rc"] or res["summary_rows"] != n * args.shard_rows:
                raise RuntimeError(f"resume bookkeeping went wrong at {n} shards: {res}")
            results.append({"generate_s": round(gen_s, 2), **res})
            print(f"  {n:,} shards: {res['total_s']:.2f}s, peak {res['peak_rss_mib']:.0f} MiB", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(markdown_table(DRIVER_MEMORY_COLUMNS, results))
    save(args.out, "driver-memory", args, results, start)


# ---------------------------------------------------------------------------------------------
# replicas: whole jobs with 1 and 2 replicas.
# ---------------------------------------------------------------------------------------------

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
    ("replicas", _key("replicas")), ("rows", _key("rows")), ("shards", _key("shards")),
    ("job wall (s)", _key("job_wall_s")), ("rows/s (job)", _key("rows_per_s")), ("speedup (job)", _times("speedup")),
    ("rows/s (scheduling phase)", _key("progress_rows_per_s")),
    ("rows/s (first to last commit)", _key("steady_rows_per_s")), ("speedup (commits)", _times("steady_speedup")),
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


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        p.add_argument("--out", type=Path, help="write the JSON result here")
        p.add_argument("--workdir", help="scratch directory (default: a temp dir, removed at the end)")
        p.add_argument("--keep", action="store_true", help="keep the temp scratch directory")
        p.add_argument("--seed", type=int, default=0)
        return p

    p = command("padding", cmd_padding, "prompt padding with and without length buckets")
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--long-fraction", type=float, default=0.3, help="share of long prompts in the mix")
    p.add_argument("--batch-size", type=int, default=32, help="engine.batch_size")
    p.add_argument("--shard-rows", type=int, default=1024, help="plan.shard_rows")
    p.add_argument("--num-buckets", type=int, default=8, help="plan.num_buckets")
    p.add_argument("--fragment-rows", type=int, default=65536, help="plan.fragment_rows")
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--row-group-rows", type=int, default=8192)

    p = command("planning", cmd_planning, "make_plan throughput and driver memory")
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

    p = command("driver-memory", cmd_driver_memory, "driver memory and time of the resume bookkeeping")
    p.add_argument("--shards", type=int, nargs="+", default=[1000, 3000, 10000])
    p.add_argument("--shard-rows", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per size")

    p = command("replicas", cmd_replicas, "job rows/s with 1 and 2 replicas")
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

    for name, func in (("_planning-child", child_planning), ("_driver-memory-child", child_driver_memory)):
        p = sub.add_parser(name)  # internal: run by the commands above in a fresh interpreter
        p.set_defaults(func=func)
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--result", required=True)
        p.add_argument("--warm-rerun", action="store_true")
        p.add_argument("overrides", nargs="*")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
