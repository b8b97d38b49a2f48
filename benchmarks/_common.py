"""What the benchmark scripts share: toy prompts, Parquet inputs, job configs, memory, tables, results.

Each benchmark is one script beside this module (`python benchmarks/NAME_bench.py --help`); each
prints Markdown tables (paste them into BENCHMARKS.md) and writes a JSON result to --out, with the
machine's load average at start and end. Results depend on CPU contention.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
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
sys.path.insert(0, str(REPO))
TOY_MODEL = REPO / "models" / "toy-diffusiongemma"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
MAX_CONTENT_CHARS = 850  # toy model: 1024 positions - 128 new tokens - ~16 chat-template tokens, with margin

Column = tuple[str, Callable[[dict], Any]]  # (header, value of one result record)


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

    model_dir, _, max_prompt = checkpoint.resolve(cfg)
    return model_dir, max_prompt


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


def markdown_table(columns: Sequence[Column], records: Sequence[dict]) -> str:
    """A right-aligned Markdown table, one row per record."""
    headers = [h for h, _ in columns]
    cells = [[cell(get(r)) for _, get in columns] for r in records]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, *map(line, cells)])


def pct(key: str) -> Callable[[dict], str]:
    return lambda r: f"{100 * r[key]:.1f}%"


def key(key: str) -> Callable[[dict], Any]:
    return lambda r: r.get(key)


def times(key: str) -> Callable[[dict], str | None]:
    return lambda r: None if r.get(key) is None else f"{r[key]:.2f}x"


def cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
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


CHILD = "_child"  # the first argument of a script's hidden child run (`run_child`, `run_command`)


def run_command(parser: Callable[[], argparse.ArgumentParser],
                child_parser: Callable[[], argparse.ArgumentParser] | None = None,
                argv: list[str] | None = None) -> None:
    """A benchmark script's entry point: parse `argv` with `parser` (or, after `CHILD`, with `child_parser`,
    the hidden run `run_child` starts) and call the `func` the parser set."""
    argv = sys.argv[1:] if argv is None else argv
    if child_parser is not None and argv[:1] == [CHILD]:
        args = child_parser().parse_intermixed_args(argv[1:])
    else:
        args = parser().parse_args(argv)
    args.func(args)


def run_child(script: str, args: list[str], timeout: float) -> dict:
    """Run `script`'s hidden child (`CHILD`, then `args`) in a fresh interpreter; returns the JSON it writes."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    try:
        proc = subprocess.run([sys.executable, script, CHILD, *args, "--result", str(result)], check=False,
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"child run of {Path(script).name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
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


def common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--out, --workdir, --keep, --seed: every benchmark has them."""
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--workdir", help="scratch directory (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temp scratch directory")
    p.add_argument("--seed", type=int, default=0)
    return p


# ---- whole jobs ----------------------------------------------------------------------------------

START_UP = re.compile(
    r"start-up \(s since the driver started\): checks done (?P<checks>[\d.?]+), Ray up (?P<ray_up>[\d.?]+) "
    r"\(ray\.init (?P<ray_init>[\d.]+) s\), plan ready (?P<plan>[\d.?]+); replica: process (?P<replica_process>[\d.?]+), "
    r"actor init (?P<actor_init>[\d.?]+), model loaded (?P<model_loaded>[\d.?]+) "
    r"\(imports (?P<imports>[\d.]+) s, load (?P<load>[\d.]+) s\), "
    r"first step (?P<first_step>[\d.?]+), first row (?P<first_row>[\d.?]+)")


def demo_input(path: Path, rows: int, seed: int) -> Path:
    """`scripts/make_demo_data.py`'s mixed toy prompts (count / reverse / repeat), `rows` of them."""
    if not path.exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), str(path), "--rows", str(rows),
                        "--seed", str(seed)], check=True, cwd=REPO, capture_output=True)
    return path


def cli_job(overrides: Sequence[str], log_path: Path, timeout: float, config: Path = DEMO_CONFIG,
            env: dict | None = None) -> dict:
    """`dgbatch run CONFIG OVERRIDES` in a fresh process: its wall time (spawn to exit), its summary, and the
    start-up breakdown the driver logs (seconds since the driver process started)."""
    output = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output.path=")))
    shutil.rmtree(output, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dgbatch.cli", "run", str(config), *overrides], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"dgbatch run {' '.join(overrides)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((output / "_summary.json").read_text())
    m = START_UP.search(proc.stderr + proc.stdout)
    start_up = {k: (None if v == "?" else float(v)) for k, v in m.groupdict().items()} if m else {}
    return {"process_wall_s": round(wall, 3), "job_wall_s": summary["wall_time_s"], "rows": summary["rows"],
            "output_tokens": summary["output_tokens"], "shards": summary["shards"], "start_up": start_up}


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
