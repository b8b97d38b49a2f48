"""Engine vs reference on a random-weight model of DiffusionGemma 26B-A4B's shape, cut to a few layers.

    python benchmarks/real_shape_bench.py --layers 4 --device cuda --dtype bfloat16 --out real.json
    python benchmarks/real_shape_bench.py --tiny --device cpu          # a smoke run of the same code

The model is `DiffusionGemmaForBlockDiffusion` built from the real checkpoint's text config
(`shapes.REAL_26B_A4B`, from its config.json: hidden 2816, 16 heads, 8 KV heads on sliding layers and 2 on
full ones, head dims 256/512, 128 experts top-8, vocab 262,144, canvas 256) with `--layers` layers
(the real pattern: five sliding, then one full; the last forced full). Weights are random, so no row
converges early and EOS is rare: every canvas runs all its denoising steps. What differs between the
backends is therefore per-step cost (cache handling, compile) and padding, not early exit; the toy
benchmark (`engine_bench.py`) measures early exit.

Prompts are random token ids with lengths spread over [--min-prompt, --max-prompt]. Reports output
tokens/s, slot utilization, decoder calls and peak device memory per backend, and the card's name.
Each backend runs in this process one after another, each after an unmeasured warm-up batch (the
first run on a fresh GPU pays one-time set-up); `--backends` picks which.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import shapes
from engine_bench import DecoderCounter

from dgbatch.engine import EngineBackend
from dgbatch.generation import Request, SamplingParams
from dgbatch.reference import ReferenceBackend


def build_model(layers: int, device: str, dtype: torch.dtype, tiny: bool):
    torch.manual_seed(0)
    return shapes.random_model(shapes.config(layers, tiny=tiny), device, dtype)


def requests(n: int, vocab: int, lo: int, hi: int) -> list[Request]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [Request(f"p{i}", torch.randint(3, vocab, (k,), generator=g).tolist()) for i, k in enumerate(lengths)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, fn, reqs, device: str) -> dict:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    gens = fn(reqs)
    sync(device)
    wall = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for g in gens)
    r = {
        "backend": name,
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "useful_row_forwards": sum(g.num_decoder_forwards for g in gens),
        "mean_tokens_per_forward": round(sum(g.tokens_per_forward for g in gens) / len(gens), 3),
    }
    if device.startswith("cuda"):
        r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return r


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--min-prompt", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=1536)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=48, help="max_denoising_steps (transformers' default)")
    ap.add_argument(
        "--backends",
        default="engine,reference-sorted,engine-compiled,reference-input",
        help="comma-separated, run in this order (engine-compiled: torch.compile, CUDA graphs on GPU)",
    )
    ap.add_argument("--tiny", action="store_true", help="CPU-sized dimensions (smoke test)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        args.min_prompt, args.max_prompt = min(args.min_prompt, 8), min(args.max_prompt, 96)
        args.max_new_tokens = min(args.max_new_tokens, 32)
    t0 = time.perf_counter()
    model = build_model(args.layers, args.device, dtype, args.tiny)
    build_s = time.perf_counter() - t0
    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    # transformers' defaults for temperatures and stopping; steps and length as asked
    params = SamplingParams(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps, entropy_bound=0.1,
                            t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005, seed=0)
    reqs = requests(args.prompts, vocab, args.min_prompt, args.max_prompt)
    b = args.batch_size
    summary = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "layers": args.layers,
        "params_billion": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "canvas_length": cfg.canvas_length,
        "prompts": args.prompts,
        "prompt_tokens": sum(len(r.prompt_ids) for r in reqs),
        "batch_size": b,
        "sampling": params.__dict__,
        "model_build_s": round(build_s, 1),
        "results": [],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}), flush=True)
    for name in args.backends.split(","):
        try:
            if name.startswith("engine"):
                engine = EngineBackend(model, params, b, 0, [1], compile=name == "engine-compiled")
                t = time.perf_counter()
                engine.generate(reqs[:b])  # warm-up (and, compiled, the capture a long job pays once)
                summary[f"{name}_warmup_s"] = round(time.perf_counter() - t, 1)
                engine.engine.stats.__init__()
                r = measure(name, engine.generate, reqs, args.device)
                r["computed_row_forwards"] = engine.stats.computed_row_forwards
                r["decoder_calls"] = engine.stats.decoder_calls
            else:
                ref = ReferenceBackend(model, params, b, 0, [1])
                if name == "reference-input":

                    def fn(rs, ref=ref):  # consecutive batches: its internal length sort cannot regroup rows
                        return [g for i in range(0, len(rs), b) for g in ref.generate(rs[i : i + b])]
                else:
                    fn = ref.generate
                fn(reqs[:b])  # warm-up: the first run of either backend pays one-time CUDA/cuBLAS set-up
                with DecoderCounter(model) as counter:
                    r = measure(name, fn, reqs, args.device)
                r["computed_row_forwards"] = counter.rows
                r["decoder_calls"] = counter.calls
            r["slot_utilization"] = round(r["useful_row_forwards"] / max(1, r["computed_row_forwards"]), 3)
        except Exception as e:  # noqa: BLE001 - one failing backend must not lose the others' numbers
            r = {"backend": name, "error": f"{type(e).__name__}: {e}"[:2000]}
        summary["results"].append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            args.out.write_text(json.dumps(summary, indent=2) + "\n")
    ok = [r for r in summary["results"] if "tokens_per_s" in r]
    refs = [r["tokens_per_s"] for r in ok if r["backend"].startswith("reference")]
    for r in ok:
        if r["backend"].startswith("engine") and refs:
            print(f"{r['backend']}: {r['tokens_per_s'] / max(refs):.2f}x the better reference ordering")


if __name__ == "__main__":
    main()
