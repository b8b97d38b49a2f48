"""What a replica's metrics cost its generation: the engine loop with and without the metrics reporter.

    python benchmarks/metrics_overhead_bench.py --rows 256 --repeats 3 --out bench-metrics.json

In a local Ray driver (so `ray.util.metrics` records into Ray's real recorder), the toy engine generates
`--rows` prompts on a loop thread as a replica's stream does, each finished row added to a `RowMeter`
(what `ShardStream._deliver` adds per row); a `ReplicaReporter` reads it and the engine's counters
every `--every-s` (default 0.1 s: 50x as often as a replica with Ray's default 10 s export). Runs
alternate without / with the reporter (which goes first alternates too); medians of rows/s. Also: the per-row cost of `RowMeter.add`
on the loop thread, and the reporter's own time per report.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from _common import TOY_MODEL, Column, common_args, machine, markdown_table, median, save, toy_prompts


class _Stream:
    """What the reporter reads of a replica's stream: its finished rows, its job label, its backend."""

    def __init__(self, backend):
        from dgbatch.stream import RowMeter

        self.backend, self.label, self.meter, self.lock = backend, "bench", RowMeter(), threading.Lock()

    def take_rows(self):
        with self.lock:
            return self.meter.take()


def _generate(model, tok, pad, eos, params, prompts, batch: int, every_s: float | None) -> dict:
    import torch

    from dgbatch.engine import EngineBackend
    from dgbatch.generation import Request
    from dgbatch.metrics import ReplicaReporter

    backend = EngineBackend(model, params, batch, pad, eos)
    stream = _Stream(backend)
    reqs = [Request(f"r{i}", tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)) for i, p in enumerate(prompts)]
    reporter = ReplicaReporter(stream, "replica-bench", every_s=every_s).start() if every_s else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        backend.submit(reqs, "bench")
        rows = 0
        while backend.busy:
            for f in backend.step():
                with stream.lock:
                    stream.meter.add(stream.label, len(f.generation.token_ids), f.generation.tokens_per_forward)
                rows += 1
    wall = time.perf_counter() - t0
    out = {"rows": rows, "wall_s": wall, "rows_per_s": rows / wall}
    if reporter is not None:
        reporter.stop()
        reporter.report()
        out["report_s"] = reporter.report_s
        out["reports"] = round(wall / every_s)
    return out


def _meter_add_ns(n: int = 200_000) -> float:
    from dgbatch.stream import RowMeter

    m, lock = RowMeter(), threading.Lock()
    t0 = time.perf_counter()
    for i in range(n):
        with lock:
            m.add("job", 30, 5.5)
        if i % 1000 == 999:
            m.take()
    return (time.perf_counter() - t0) / n * 1e9


def cmd(args: argparse.Namespace) -> None:
    import ray
    import torch

    from dgbatch import checkpoint
    from dgbatch.config import ModelSection, SamplingSection

    start = machine()
    torch.set_num_threads(1)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    tok = checkpoint.load_tokenizer(TOY_MODEL)
    pad, eos = checkpoint.special_ids(TOY_MODEL, tok)
    params = checkpoint.resolve_sampling(TOY_MODEL, SamplingSection())
    model = checkpoint.load_model(TOY_MODEL, ModelSection(path=str(TOY_MODEL)))
    prompts = toy_prompts(args.rows, 0)
    _generate(model, tok, pad, eos, params, prompts[:16], args.batch, None)  # warm-up
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for k in range(args.repeats):
        pair = (("without", None), ("with", args.every_s))
        for name, every in pair if k % 2 == 0 else pair[::-1]:  # alternate which goes first
            r = _generate(model, tok, pad, eos, params, prompts, args.batch, every)
            runs[name].append(r)
            print(f"  {name} reporter, run {k + 1}: {r['rows_per_s']:.1f} rows/s", flush=True)
    add_ns = _meter_add_ns()
    with_ = runs["with"]
    results = [
        {"what": "rows/s without the reporter (median)", "value": f"{median([r['rows_per_s'] for r in runs['without']]):.1f}"},
        {"what": f"rows/s with a report every {args.every_s} s (median)",
         "value": f"{median([r['rows_per_s'] for r in with_]):.1f}"},
        {"what": "reporter time per report (ms)",
         "value": f"{1e3 * sum(r['report_s'] for r in with_) / max(sum(r['reports'] for r in with_), 1):.2f}"},
        {"what": "reporter time / generation wall time",
         "value": f"{sum(r['report_s'] for r in with_) / sum(r['wall_s'] for r in with_):.2%}"},
        {"what": "RowMeter.add per row, on the loop thread (ns)", "value": f"{add_ns:.0f}"},
    ]
    columns: list[Column] = [("measure", lambda r: r["what"]), ("value", lambda r: r["value"])]
    print(f"\n{args.rows} toy prompts, batch {args.batch}, {args.repeats} runs each; load at start "
          f"{start['loadavg']}, at end {os.getloadavg()[0]:.2f}\n")
    print(markdown_table(columns, results))
    save(args.out, "metrics_overhead", args, {"results": results, "runs": runs, "meter_add_ns": add_ns}, start)


def parser() -> argparse.ArgumentParser:
    p = common_args(argparse.ArgumentParser(description="a replica's metrics reporter against its generation"))
    p.set_defaults(func=cmd)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--every-s", type=float, default=0.1, help="seconds between reports")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    args.func(args)
