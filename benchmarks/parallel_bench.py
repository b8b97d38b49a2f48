"""Tensor / expert parallel: time per denoising step, sharded vs not, and the memory plan per rank.

    # CPU, toy checkpoint: TP=1 vs TP=2 vs EP=2 (2 ranks on gloo), ms per denoising step
    python benchmarks/parallel_bench.py cpu --batch 16 --steps 30 --out bench-parallel-cpu.json

    # One GPU, world size 1 (nccl): the sharded code path (parallelize with tp=ep=1) vs the unsharded
    # engine on a random-weight model of the real 26B-A4B shape cut to 4 layers, bf16; prints JSON
    python benchmarks/parallel_bench.py gpu --layers 4 --batch 8 32 --out bench-parallel-gpu.json
    # ... the same code path on CPU with a tiny shape (a smoke test of the GPU mode)
    python benchmarks/parallel_bench.py gpu --device cpu --tiny

    # Memory per rank of the real 26B-A4B at given degrees (the engine's memory model on a meta model)
    python benchmarks/parallel_bench.py memory --tp 2 --ep 4 --capacity 4864 --gpu-gib 79.1

"lm_head" times the final norm + lm_head (+ fp32 cast) alone: with the sampler, the part of a step
every rank computes in full (the vocabulary is replicated), so it bounds what more ranks can save.

A denoising step is what the engine runs per decoder batch: the decoder forward over n slots
(canvas C tokens each, reading the slot KV) and the sampler (temperature, sampling, entropy-bound
acceptance, renoising, stopping, self-conditioning embeddings) = `Engine._denoise(n)`. It is timed
in steady state: the slots are filled and encoded once, then the step is repeated (its shapes do not
change; only the canvases do). "decoder" times `ModelRunner.decode` alone; sampler = step - decoder.
Under parallelism every rank times the same steps; collectives are counted and timed by wrapping
`torch.distributed.all_reduce` (time inside it includes waiting for the slower rank).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import shapes

from dgbatch.engine.loop import Engine
from dgbatch.generation import Request, SamplingParams
from dgbatch.parallel import Mesh, ParallelDims, parallelize

CHECKPOINT = REPO / "models" / "toy-diffusiongemma"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__}


def step_params(steps: int) -> SamplingParams:
    # max_denoising_steps beyond what is timed: no row finishes, the batch stays full
    return SamplingParams(max_new_tokens=1024, max_denoising_steps=10**6, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                          stability_threshold=1, confidence_threshold=0.005, seed=0)


class CollectiveTimer:
    """Counts and times torch.distributed.all_reduce calls (ms, synchronised on CUDA)."""

    def __init__(self, sync):
        self.sync, self.calls, self.seconds = sync, 0, 0.0

    @contextlib.contextmanager
    def installed(self):
        import torch.distributed as dist

        real = dist.all_reduce

        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        dist.all_reduce = timed
        try:
            yield self
        finally:
            dist.all_reduce = real


def filled_engine(model, batch: int, prompt_len: int, vocab: int) -> Engine:
    """An engine whose `batch` slots hold encoded prompts of `prompt_len` tokens, ready to denoise."""
    engine = Engine(model, step_params(0), batch, pad_id=0, eos_ids=[1])
    g = torch.Generator().manual_seed(0)
    reqs = [Request(f"b{i}", torch.randint(3, vocab, (prompt_len,), generator=g).tolist()) for i in range(batch)]
    engine.submit(reqs)
    engine._ensure_cache()
    engine._refill()
    engine._encode()
    return engine


@torch.inference_mode()
def time_steps(model, batch: int, prompt_len: int, steps: int, warmup: int, sync) -> dict:
    """ms per denoising step and per decoder forward, steady state, on `batch` filled slots."""
    vocab = model.config.get_text_config().vocab_size
    engine = filled_engine(model, batch, prompt_len, vocab)
    bound = engine._bound(r.length for r in engine.rows)

    def timed(fn) -> tuple[float, float]:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        return 1e3 * (time.perf_counter() - t0), 1e3 * (time.process_time() - c0)

    step = lambda: engine._denoise(batch, bound)
    decode = lambda: engine.runner.decode(engine.cache, batch, engine.tokens[:batch], engine.soft[:batch], bound)
    for _ in range(warmup):
        step()
    runner = engine.runner
    h = torch.randn(batch, runner.canvas, runner.hidden_size, device=runner.device, dtype=runner.dtype)
    lm_head = lambda: runner.lm_head(runner.dec_norm(h)).float()  # replicated on every rank
    step_wall, step_cpu, dec_wall, head_wall = [], [], [], []
    for _ in range(steps):  # interleaved, so drift in machine load hits both alike
        w, c = timed(step)
        step_wall.append(w)
        step_cpu.append(c)
        dec_wall.append(timed(decode)[0])
        head_wall.append(timed(lm_head)[0])
    med = statistics.median
    return {"batch": batch, "prompt_tokens": prompt_len, "steps": steps,
            "step_ms": med(step_wall), "step_cpu_ms": med(step_cpu), "decoder_ms": med(dec_wall),
            "sampler_ms": med(step_wall) - med(dec_wall), "lm_head_ms": med(head_wall),
            "step_ms_p90": sorted(step_wall)[int(0.9 * (steps - 1))]}


# ---- cpu: the toy checkpoint, TP=1 vs TP=2 vs EP=2 ------------------------------------------------


def _toy():
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(CHECKPOINT)).eval()


def _cpu_rank(mesh: Mesh, batch: int, prompt_len: int, steps: int, warmup: int) -> dict:
    model = _toy()
    parallelize(model, mesh)
    timer = CollectiveTimer(lambda: None)
    with timer.installed():
        out = time_steps(model, batch, prompt_len, steps, warmup, lambda: None)
    total_steps = 2 * steps + warmup  # steps, decoder-only forwards, warm-up steps
    out["all_reduce_per_step"] = timer.calls / total_steps
    out["all_reduce_ms_per_step"] = 1e3 * timer.seconds / total_steps
    out["all_reduce_alone_ms"] = _all_reduce_alone(mesh, batch * model.config.canvas_length, model.config.get_text_config().hidden_size)
    return out


def _all_reduce_alone(mesh: Mesh, rows: int, hidden: int, reps: int = 50) -> float:
    """Median ms of one all-reduce of a decoder activation [rows, hidden] fp32, ranks already in step
    (what a collective costs without waiting for a slower rank)."""
    import torch.distributed as dist

    x = torch.randn(rows, hidden)
    times = []
    for _ in range(reps):
        dist.barrier(group=mesh.world_group)
        t0 = time.perf_counter()
        dist.all_reduce(x, group=mesh.world_group)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def cmd_cpu(args) -> dict:
    from dgbatch.parallel.local import run_local

    results = {"machine_start": machine(), "runs": []}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        r = time_steps(_toy(), args.batch, args.prompt_tokens, args.steps, args.warmup, lambda: None)
        results["runs"].append({"name": f"TP=1 ({threads} thread{'s' * (threads > 1)})", "ranks": [r]})
    torch.set_num_threads(1)
    for name, dims in (("TP=2", ParallelDims(tp=2)), ("EP=2", ParallelDims(ep=2))):
        ranks = run_local(_cpu_rank, dims, args.batch, args.prompt_tokens, args.steps, args.warmup, timeout_s=600)
        results["runs"].append({"name": f"{name} (2 ranks x 1 thread, gloo)", "ranks": ranks})
    results["machine_end"] = machine()
    base = results["runs"][0]["ranks"][0]["step_ms"]
    print(f"\nbatch {args.batch} slots x canvas 16, prompts of {args.prompt_tokens} tokens, median of {args.steps} steps "
          f"(load average {results['machine_start']['loadavg'][0]:.1f} -> {results['machine_end']['loadavg'][0]:.1f} "
          f"on {os.cpu_count()} cores)\n")
    print("| run | ms / step | decoder | sampler | CPU ms / step (rank) | all-reduces / step | ms in all-reduce "
          "| one all-reduce alone | vs TP=1 (1 thread) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in results["runs"]:
        r = max(run["ranks"], key=lambda x: x["step_ms"])  # the slower rank sets the pace
        print(f"| {run['name']} | {r['step_ms']:.2f} | {r['decoder_ms']:.2f} | {r['sampler_ms']:.2f} | "
              f"{r['step_cpu_ms']:.2f} | {r.get('all_reduce_per_step', 0):.0f} | {r.get('all_reduce_ms_per_step', 0):.2f} | "
              f"{r.get('all_reduce_alone_ms', 0):.2f} | {r['step_ms'] / base:.2f}x |")
    return results


# ---- gpu: world size 1, sharded code path vs unsharded engine --------------------------------------


def cmd_gpu(args) -> dict:
    """Robust by design (it may run once, unattended): every phase records its error and moves on."""
    import torch.distributed as dist

    from dgbatch.engine.memory import memory_model
    from dgbatch.parallel import layers as player
    from dgbatch.parallel.mesh import host_store

    out: dict = {"mode": "gpu", "args": vars(args), "machine": machine(), "results": [], "errors": []}

    def record_error(where: str) -> None:
        out["errors"].append({"where": where, "error": traceback.format_exc(limit=6)})
        print(f"[{where}] failed:\n{traceback.format_exc(limit=6)}", file=sys.stderr)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        out["errors"].append({"where": "setup", "error": "no CUDA device"})
        return out
    if cuda:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        props = torch.cuda.get_device_properties(device)
        out["device"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": list(torch.cuda.get_device_capability(device)),
                         "cuda": torch.version.cuda}
    else:
        torch.set_num_threads(args.threads)
        out["device"] = {"name": platform.processor() or "cpu", "threads": args.threads}
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(json.dumps({"device": out["device"]}), flush=True)

    try:
        cfg = shapes.config(args.layers, tiny=args.tiny)
        t0 = time.time()
        model = shapes.random_model(cfg, str(device), dtype)
        out["model"] = {"shape": "tiny" if args.tiny else "DiffusionGemma 26B-A4B", "layers": args.layers,
                        "layer_types": cfg.text_config.layer_types, "dtype": args.dtype,
                        "params": sum(p.numel() for p in model.parameters()), "build_s": round(time.time() - t0, 1)}
    except Exception:  # noqa: BLE001 - recorded; the run goes on
        record_error("build model")
        return out

    backend = "nccl" if cuda else "gloo"
    try:
        store = host_store("127.0.0.1", 1, 300)
        mesh = Mesh.init(ParallelDims(1, 1), 0, store, backend, 300, device if cuda else None)
        out["process_group"] = {"backend": backend, "world_size": dist.get_world_size()}
    except Exception:  # noqa: BLE001
        record_error("init process group")
        mesh = None

    def measure(name: str, m, batch: int) -> None:
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            r = time_steps(m, batch, args.prompt_tokens, args.steps, args.warmup, sync)
            r["name"] = name
            if cuda:
                r["peak_gib_above_weights"] = round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 2)
                mm = memory_model(m, -(-args.prompt_tokens // 64) * 64)
                r["memory_model_gib_above_weights"] = round((mm.peak(batch) - mm.weights) / 2**30, 2)
            out["results"].append(r)
            print(json.dumps(r), flush=True)
        except torch.OutOfMemoryError:
            out["errors"].append({"where": f"{name} batch {batch}", "error": "out of memory"})
            print(f"[{name} batch {batch}] out of memory", file=sys.stderr)
        except Exception:  # noqa: BLE001
            record_error(f"{name} batch {batch}")

    sharded = None
    if mesh is not None:
        try:
            sharded = copy.deepcopy(model)
            parallelize(sharded, mesh)
        except Exception:  # noqa: BLE001
            record_error("parallelize")
            sharded = None
    for batch in args.batch:
        for rep in range(args.repeats):  # interleaved, so drift hits both alike
            measure(f"unsharded engine (rep {rep})", model, batch)
            if sharded is not None:
                measure(f"sharded tp=ep=1 (rep {rep})", sharded, batch)
                player.FORCE_COLLECTIVES = True
                measure(f"sharded tp=ep=1, all-reduces issued (rep {rep})", sharded, batch)
                player.FORCE_COLLECTIVES = False
    summary = {}
    for r in out["results"]:
        key = (r["batch"], r["name"].split(" (rep")[0])
        summary.setdefault(key, []).append(r["step_ms"])
    out["summary"] = [{"batch": b, "run": n, "step_ms_best": min(v), "step_ms_all": v} for (b, n), v in summary.items()]
    for b in args.batch:
        base = summary.get((b, "unsharded engine"))
        for n in ("sharded tp=ep=1", "sharded tp=ep=1, all-reduces issued"):
            if base and summary.get((b, n)):
                out.setdefault("overhead", []).append(
                    {"batch": b, "run": n, "overhead_pct": round(100 * (min(summary[(b, n)]) / min(base) - 1), 2)})
    if mesh is not None:
        mesh.destroy()
    return out


# ---- memory: the real shape per rank ---------------------------------------------------------------


def cmd_memory(args) -> dict:
    from dgbatch.engine.memory import memory_model

    gib = 2**30
    dims = ParallelDims(args.tp, args.ep)
    model = shapes.meta_model(shapes.config(), getattr(torch, args.dtype))
    dims.check_model(model.config.get_text_config())
    parallelize(model, Mesh.local(dims, 0))
    mm = memory_model(model, args.capacity, args.max_prefill_tokens)
    weights = mm.weights + args.vision_gib * gib
    free = args.gpu_gib * gib - weights - args.reserve_gib * gib
    per_row = mm.kv_per_slot + mm.state_per_slot + mm.logits_per_row + mm.activations_per_row
    fit = int((args.fraction * free - mm.prefill) // per_row)
    pow2 = 1 << (max(fit, 1).bit_length() - 1)
    out = {"tp": args.tp, "ep": args.ep, "capacity": args.capacity, "weights_gib": weights / gib,
           "kv_per_slot_mib": mm.kv_per_slot / 2**20, "logits_per_row_mib": mm.logits_per_row / 2**20,
           "activations_per_row_mib": mm.activations_per_row / 2**20, "state_per_slot_mib": mm.state_per_slot / 2**20,
           "prefill_gib": mm.prefill / gib, "per_row_mib": per_row / 2**20, "free_gib": free / gib,
           "max_batch": fit, "batch_pow2": pow2, "peak_gib_at_pow2": (weights + pow2 * per_row + mm.prefill) / gib}
    for k, v in out.items():
        print(f"{k:>24}: {v:.2f}" if isinstance(v, float) else f"{k:>24}: {v}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cpu", help="toy checkpoint: TP=1 vs TP=2 vs EP=2 on gloo")
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--prompt-tokens", type=int, default=40)
    c.add_argument("--steps", type=int, default=30)
    c.add_argument("--warmup", type=int, default=5)
    g = sub.add_parser("gpu", help="world size 1: sharded code path vs unsharded engine")
    g.add_argument("--device", default="cuda")
    g.add_argument("--tiny", action="store_true", help="a CPU-sized model of the same structure")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    g.add_argument("--prompt-tokens", type=int, default=1024)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--warmup", type=int, default=5)
    g.add_argument("--repeats", type=int, default=2)
    g.add_argument("--dtype", default="bfloat16")
    g.add_argument("--threads", type=int, default=1, help="CPU threads with --device cpu")
    m = sub.add_parser("memory", help="memory per rank of the real 26B-A4B (engine memory model, meta model)")
    m.add_argument("--tp", type=int, default=1)
    m.add_argument("--ep", type=int, default=1)
    m.add_argument("--capacity", type=int, default=4864, help="committed tokens per slot (prompt + canvases)")
    m.add_argument("--max-prefill-tokens", type=int, default=8192)
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--gpu-gib", type=float, default=79.1, help="memory torch sees on the device (H100 80GB: 79.1)")
    m.add_argument("--reserve-gib", type=float, default=1.5, help="CUDA context, NCCL buffers, allocator slack")
    m.add_argument("--vision-gib", type=float, default=1.1, help="the vision tower (not in the shape source)")
    m.add_argument("--fraction", type=float, default=0.85, help="share of the rest the engine may plan for")
    for p in (c, g, m):
        p.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args()
    if args.cmd == "gpu" and args.tiny and args.prompt_tokens == 1024:
        args.prompt_tokens = 40
    result = {"cpu": cmd_cpu, "gpu": cmd_gpu, "memory": cmd_memory}[args.cmd](args)
    text = json.dumps(result, indent=2, default=str)
    if args.cmd == "gpu":
        print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
