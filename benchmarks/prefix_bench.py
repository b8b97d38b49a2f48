"""Shared prompt encoding (`engine.share_prefixes`): prompt tokens encoded / prompt tokens, and the speedup.

    python benchmarks/prefix_bench.py --prompts 64 --few-shot 256 --batch-size 32 --repeats 3 --jobs --out prefix.json

Two workloads on the trained toy checkpoint, chat-templated:

  samples   --prompts prompts of the toy task family, 8 samples each (ids ROWID#k, adjacent, as the
            planner lays out `sampling.num_samples=8`)
  few-shot  --few-shot questions of the family after one shared block of solved examples of at least
            --shot-tokens tokens (a few-shot eval; the toy was not trained on it, so answers are poor)

Each runs through the engine with share_prefixes off (every prompt encoded alone) and on, --repeats
interleaved rounds (a drift in the machine's speed hits both alike); reported: prompt tokens, prompt
tokens the encoder computed and their ratio (targets, issue 13: <= 1/8 and <= 0.2), whether every
row's output is identical with sharing on and off (tokens, forwards, finish reason), and the median
wall and CPU time of each (speedup = off / on). With --jobs, each workload also runs as a whole job
(`dgbatch run configs/demo.yaml`, sharing on) and the ratio is read from its `_summary.json`.
Timings depend on CPU contention; the token counts do not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _common import (
    DEMO_CONFIG,
    TOY_MODEL,
    cli_job,
    common_args,
    machine,
    markdown_table,
    median,
    save,
    workdir,
    write_input,
)

SAMPLES = 8


def workloads(tok, args) -> dict[str, tuple[list, list[str], int]]:
    """name -> (requests, the input prompts for a job, num_samples)."""
    from dgbatch.generation import Request
    from dgbatch.toy.tasks import few_shot_prompt, sample_examples, shots_of_length

    chat = lambda text: tok.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True)["input_ids"]
    plain = [e.prompt for e in sample_examples(args.prompts, seed=args.seed + 7)]
    samples = [Request(f"q{i}#{k}", chat(p)) for i, p in enumerate(plain) for k in range(SAMPLES)]
    shots = shots_of_length(args.shot_tokens, args.seed + 2, lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    few = [few_shot_prompt(shots, e.prompt) for e in sample_examples(args.few_shot, seed=args.seed + 9)]
    return {"samples": (samples, plain, SAMPLES),
            "few-shot": ([Request(f"f{i}", chat(p)) for i, p in enumerate(few)], few, 1)}


def engine_run(model, params, tok, reqs, batch: int, share: bool) -> dict:
    from dgbatch.engine import EngineBackend

    backend = EngineBackend(model, params, batch, tok.pad_token_id, [tok.eos_token_id], share_prefixes=share)
    t0, c0 = time.perf_counter(), time.process_time()
    gens = backend.generate(reqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = backend.stats
    return {"gens": gens, "wall_s": wall, "cpu_s": cpu, "prompt_tokens": s.prompt_tokens,
            "encoded_prompt_tokens": s.encoded_prompt_tokens, "output_tokens": sum(len(g.token_ids) for g in gens)}


def job_ratio(prompts: list[str], num_samples: int, batch: int, work: Path, name: str) -> dict:
    inp = write_input(work / f"{name}-in", prompts, num_files=1, row_group_rows=1024)
    out = work / f"{name}-out"
    r = cli_job([f"input.path={inp}", f"output.path={out}", f"sampling.num_samples={num_samples}",
                 f"engine.batch_size={batch}", "plan.shard_rows=256"], work / f"{name}.log", timeout=1800,
                config=DEMO_CONFIG)
    enc = json.loads((out / "_summary.json").read_text()).get("prompt_encoding", {})
    return {"job_wall_s": r["job_wall_s"], "rows": r["rows"], **enc}


def main() -> None:
    ap = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--prompts", type=int, default=64, help="samples workload: prompts (x 8 samples)")
    ap.add_argument("--few-shot", type=int, default=256, help="few-shot workload: questions")
    ap.add_argument("--shot-tokens", type=int, default=500, help="few-shot workload: tokens of the shared block")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", action="store_true", help="also run each workload as a whole job (local Ray)")
    args = ap.parse_args()
    start = machine()

    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    from dgbatch.checkpoint import resolve_sampling
    from dgbatch.config import SamplingSection

    torch.set_num_threads(args.threads)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(TOY_MODEL)).eval()
    tok = AutoTokenizer.from_pretrained(str(TOY_MODEL))
    params = resolve_sampling(TOY_MODEL, SamplingSection(seed=args.seed))
    results = []
    with workdir(args.workdir, args.keep) as work:
        for name, (reqs, prompts, n) in workloads(tok, args).items():
            rounds = {False: [], True: []}
            for _ in range(args.repeats):
                for share in (False, True):
                    rounds[share].append(engine_run(model, params, tok, reqs, args.batch_size, share))
            off, on = rounds[False][0], rounds[True][0]
            identical = all(r["gens"] == off["gens"] for rs in rounds.values() for r in rs)
            rec = {"workload": name, "rows": len(reqs), "prompt_tokens": on["prompt_tokens"],
                   "mean_prompt_tokens": on["prompt_tokens"] / len(reqs),
                   "encoded_off": off["encoded_prompt_tokens"], "encoded_on": on["encoded_prompt_tokens"],
                   "ratio": on["encoded_prompt_tokens"] / on["prompt_tokens"], "identical": identical,
                   "wall_off_s": median([r["wall_s"] for r in rounds[False]]),
                   "wall_on_s": median([r["wall_s"] for r in rounds[True]]),
                   "cpu_off_s": median([r["cpu_s"] for r in rounds[False]]),
                   "cpu_on_s": median([r["cpu_s"] for r in rounds[True]]),
                   "output_tokens": on["output_tokens"]}
            rec["speedup_wall"] = rec["wall_off_s"] / rec["wall_on_s"]
            rec["speedup_cpu"] = rec["cpu_off_s"] / rec["cpu_on_s"]
            if args.jobs:
                job = job_ratio(prompts, n, args.batch_size, work, name)
                rec["job_ratio"], rec["job_wall_s"] = job.get("ratio"), job["job_wall_s"]
            results.append(rec)
            print(f"{name}: ratio {rec['ratio']:.3f}, identical {identical}, speedup {rec['speedup_wall']:.2f}x",
                  file=sys.stderr, flush=True)

    cols = [("workload", lambda r: r["workload"]), ("rows", lambda r: r["rows"]),
            ("prompt tokens", lambda r: r["prompt_tokens"]), ("encoded, off", lambda r: r["encoded_off"]),
            ("encoded, on", lambda r: r["encoded_on"]), ("ratio", lambda r: round(r["ratio"], 3)),
            ("identical", lambda r: r["identical"]), ("wall off / on (s)", lambda r: f"{r['wall_off_s']:.1f} / "
                                                       f"{r['wall_on_s']:.1f}"),
            ("speedup (wall)", lambda r: f"{r['speedup_wall']:.2f}x"), ("speedup (CPU)", lambda r: f"{r['speedup_cpu']:.2f}x")]
    if args.jobs:
        cols.append(("job ratio (_summary.json)", lambda r: None if r.get("job_ratio") is None else round(r["job_ratio"], 3)))
    print(markdown_table(cols, results))
    save(args.out, "prefix", args, results, start)


if __name__ == "__main__":
    main()
