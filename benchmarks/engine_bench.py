"""Engine vs reference backend on the toy checkpoint: slot utilization and output tokens/s.

    python benchmarks/engine_bench.py --prompts 1024 --batch-size 32 --out bench-engine.json

Workload: a mixed sample of the toy task family (count / reverse / repeat: outputs from 1 to ~120
tokens, rows that converge fast and rows that take many steps), chat-templated, same batch size for
every backend. Three runs over the same prompts:

  reference, input order   transformers' `generate` on consecutive batches of the input
  reference, length-sorted one `ReferenceBackend.generate` call (it sorts by prompt length)
  engine                   one `EngineBackend.generate` call

With --repeats N the three run N times, interleaved (so a drift in the machine's speed hits all
alike); each backend's median-wall run is reported, and each round's engine / best-reference ratio.

Slot utilization = useful decoder row-forwards / computed decoder row-forwards. Useful is what
transformers' tokens_per_forward counts (rows still denoising); computed is the decoder batch size
summed over decoder calls (counted by wrapping the model's forward for the reference). Output tokens
are the generated tokens returned (EOS included, padding excluded). Targets (issue 4): engine
utilization >= 0.95; engine tokens/s >= 5x the better reference ordering.

Prints a Markdown table and writes the numbers as JSON to --out. Wall timings depend on CPU
contention (the JSON records the load average); with one thread, CPU-time throughput is the
contention-robust comparison and is reported next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dgbatch.checkpoint import resolve_sampling
from dgbatch.config import SamplingSection
from dgbatch.engine import EngineBackend
from dgbatch.generation import Request, SamplingParams
from dgbatch.reference import ReferenceBackend
from dgbatch.toy.tasks import sample_examples


class DecoderCounter:
    """Counts decoder calls and rows through `model.forward` (what `generate` calls per step)."""

    def __init__(self, model):
        self.model, self.calls, self.rows = model, 0, 0
        self._forward = model.forward

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            self.rows += kwargs["decoder_input_ids"].shape[0]
            return self._forward(*args, **kwargs)

        self.model.forward = counted  # an instance attribute shadows the method `generate` looks up
        return self

    def __exit__(self, *exc):
        del self.model.forward


def run(name, fn, reqs, examples, tok) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    gens = fn(reqs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(g.token_ids) for g in gens)
    exact = sum(tok.decode(g.token_ids, skip_special_tokens=True) == e.answer for g, e in zip(gens, examples))
    return {
        "backend": name,
        "wall_s": wall,
        "cpu_s": cpu,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / cpu,
        "useful_row_forwards": sum(g.num_decoder_forwards for g in gens),
        "exact_match": exact / len(examples),
        "mean_tokens_per_forward": sum(g.tokens_per_forward for g in gens) / len(gens),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "toy-diffusiongemma")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--data-seed", type=int, default=7, help="seed of the prompt sample")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--sampling",
        choices=("checkpoint", "transformers"),
        default="checkpoint",
        help="the checkpoint's generation_config.json, or transformers' defaults (48 steps, t 0.4-0.8)",
    )
    ap.add_argument("--skip-reference", action="store_true", help="engine only (quick check)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds; medians are reported")
    ap.add_argument("--phases", action="store_true", help="also time the engine's model passes and sampler")
    ap.add_argument("--compile", action="store_true", help="engine with torch.compile (after a warm-up run)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion, DiffusionGemmaGenerationConfig

    torch.set_num_threads(args.threads)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(args.model)).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(str(args.model))
    if args.sampling == "checkpoint":
        params = resolve_sampling(args.model, SamplingSection(seed=args.seed))
    else:
        d = DiffusionGemmaGenerationConfig._get_default_generation_params()
        d["entropy_bound"] = d.pop("sampler_config").entropy_bound
        params = SamplingParams(seed=args.seed, **d)
    examples = sample_examples(args.prompts, seed=args.data_seed)
    reqs = [
        Request(
            f"q{i}",
            tok.apply_chat_template([{"role": "user", "content": e.prompt}], add_generation_prompt=True)["input_ids"],
        )
        for i, e in enumerate(examples)
    ]
    pad, eos, b = tok.pad_token_id, [tok.eos_token_id], args.batch_size

    engine = EngineBackend(model, params, b, pad, eos, compile=args.compile)
    warmup_s = None
    if args.compile:  # graphs are built once per decoder batch size; a long job pays this once
        t0 = time.perf_counter()
        engine.generate(reqs[: 4 * b])
        warmup_s = time.perf_counter() - t0

    def engine_run() -> dict:
        engine.engine.stats.__init__()
        r = run("engine (compiled)" if args.compile else "engine", engine.generate, reqs, examples, tok)
        r["compile_warmup_s"] = warmup_s
        r["computed_row_forwards"] = engine.stats.computed_row_forwards
        r["decoder_calls"] = engine.stats.decoder_calls
        r["decoder_batch_sizes"] = engine.stats.batch_sizes
        r["encoder_batches"] = engine.stats.encoder_calls  # all but the over-long ones share the decoder's pass
        return r

    backends = [engine_run]
    if not args.skip_reference:
        ref = ReferenceBackend(model, params, b, pad, eos)

        def input_order(rs):
            # one call per consecutive batch: its internal length sort cannot regroup rows
            return [g for i in range(0, len(rs), b) for g in ref.generate(rs[i : i + b])]

        def reference_run(name, fn):
            def go() -> dict:
                with DecoderCounter(model) as counter:
                    r = run(name, fn, reqs, examples, tok)
                r["computed_row_forwards"] = counter.rows
                r["decoder_calls"] = counter.calls
                return r

            return go

        backends += [reference_run("reference, input order", input_order),
                     reference_run("reference, length-sorted", ref.generate)]

    # rounds interleave the backends (engine, reference, reference, engine, ...): a drift in the
    # machine's speed then hits every backend alike, and each round gives its own ratio
    runs: list[list[dict]] = [[] for _ in backends]
    for _ in range(args.repeats):
        for i, go in enumerate(backends):
            runs[i].append(go())
    results = []
    for rs in runs:  # each backend's median-wall run, with every run's wall time
        r = sorted(rs, key=lambda x: x["wall_s"])[len(rs) // 2]
        r["wall_s_runs"] = [x["wall_s"] for x in rs]
        results.append(r)
    round_ratios = [runs[0][k]["tokens_per_s"] / max(rs[k]["tokens_per_s"] for rs in runs[1:])
                    for k in range(args.repeats)] if len(runs) > 1 else []

    if args.phases:  # a second, instrumented engine run (host timers: meaningful on CPU, not on a GPU)
        from dgbatch.engine import loop

        phases = {"model": [0.0, 0], "sampler": [0.0, 0]}

        def timed(fn, key):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                out = fn(*a, **k)
                phases[key][0] += time.perf_counter() - t0
                phases[key][1] += 1
                return out

            return wrapper

        runner = engine.engine.runner
        runner.forward = timed(runner.forward, "model")  # every pass: encoder, decoder or both at once
        draft = loop.draft
        loop.draft = timed(draft, "sampler")
        try:
            t0 = time.perf_counter()
            engine.generate(reqs)
            results[0]["phases"] = {"wall_s": time.perf_counter() - t0,
                                    **{k: {"s": v[0], "calls": v[1]} for k, v in phases.items()}}
        finally:
            loop.draft = draft
            del runner.forward  # back to the class's method
        print("engine phases:", json.dumps(results[0]["phases"]))

    for r in results:
        r["slot_utilization"] = r["useful_row_forwards"] / max(1, r["computed_row_forwards"])
    best_ref = max((r["tokens_per_s"] for r in results[1:]), default=None)
    best_ref_cpu = max((r["tokens_per_cpu_s"] for r in results[1:]), default=None)
    summary = {
        "prompts": args.prompts,
        "batch_size": b,
        "sampling_source": args.sampling,
        "sampling": params.__dict__,
        "threads": args.threads,
        "loadavg": os.getloadavg(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "results": results,
        "engine_speedup_vs_best_reference": results[0]["tokens_per_s"] / best_ref if best_ref else None,
        "engine_speedup_per_round": round_ratios,
        "engine_speedup_vs_best_reference_cpu_time": results[0]["tokens_per_cpu_s"] / best_ref_cpu
        if best_ref
        else None,
    }

    print(
        f"\n{args.prompts} prompts, batch size {b}, sampling: {args.sampling}, {args.threads} thread(s), "
        f"load {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| backend | wall s | CPU s | tok/s (wall) | tok/s (CPU) | slot utilization | decoder calls | exact match | mean TPF |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['backend']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_cpu_s']:.1f} | {r['slot_utilization']:.3f} | "
            f"{r['decoder_calls']} | {r['exact_match']:.3f} | {r['mean_tokens_per_forward']:.2f} |"
        )
    if best_ref:
        print(
            f"\nengine tokens/s / best reference: {summary['engine_speedup_vs_best_reference']:.1f}x wall, "
            f"{summary['engine_speedup_vs_best_reference_cpu_time']:.1f}x CPU time (median runs)"
        )
        if args.repeats > 1:
            print("per round:", ", ".join(f"{x:.2f}x" for x in round_ratios))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
