"""Host memory of one rank loading its shard: per-rank loading vs load-then-shard, at TP = 1, 2, 4.

    # the real 26B-A4B shape cut to 2 layers, random bf16 weights written to a temp checkpoint
    python benchmarks/rank_loading_bench.py --layers 2 --tp 1 2 4 --out bench-rank-loading.json
    # a smoke run of the same code path (tiny shape, seconds)
    python benchmarks/rank_loading_bench.py --tiny --tp 1 2

The checkpoint is written like a released one: the decoder's names (the encoder's text layers are tied
to them), several safetensors files behind `model.safetensors.index.json`. Each measurement is a fresh
process loading rank 0's shard on CPU (`Mesh.local`: the same cuts as a real rank, no process group):

    load-then-shard   from_pretrained (the whole model) then parallelize, what every rank did before
    per-rank          dgbatch.parallel.load.load_parallelized: meta model, cuts, only this rank's slices read

Reported per run: peak RSS while loading (VmHWM: it includes the checkpoint's file pages the process
touched through safetensors' mmap, which the page cache shares between the ranks of a node), peak
anonymous memory (RssAnon, sampled every 2 ms: the process's own copies), RSS once every weight the
rank keeps has been read (what a running replica holds: unsliced weights stay mapped from the file
and are only paged in when read), the bytes of the parameters it keeps, and the load time. All ranks
of one degree keep the same amount (tp ranks split evenly), so rank 0 stands for each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

GIB = 1024**3
FILE_BYTES = 2 * GIB  # tensors per safetensors file, about


def checkpoint_names(model) -> list[tuple[str, object]]:
    """(name, meta tensor) of what a saved checkpoint holds: one name per tied group (the decoder's),
    no lm_head (tied to the embedding), every persistent buffer (as the toy checkpoint has)."""
    groups: dict[int, list[str]] = {}
    tensors: dict[int, object] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    out = []
    for key, names in groups.items():
        names = [n for n in names if not n.startswith("lm_head")]
        out.append((next((n for n in names if n.startswith("model.decoder.")), names[0]), tensors[key]))
    for prefix, module in model.named_modules():
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                out.append((f"{prefix}.{attr}", b))
    return sorted(out, key=lambda x: x[0])


def write_checkpoint(out: Path, layers: int, tiny: bool) -> dict:
    """Random bf16 weights of the real shape (or the tiny one), saved as a sharded safetensors checkpoint."""
    import shapes
    import torch
    from safetensors.torch import save_file

    cfg = shapes.config(layers=layers, tiny=tiny)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    model = shapes.meta_model(cfg, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    files, batch, size, weight_map, total = 0, {}, 0, {}, 0

    def flush():
        nonlocal files, batch, size
        if batch:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(batch, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(batch, name))
            batch, size = {}, 0

    for name, t in checkpoint_names(model):
        value = torch.empty(t.shape, dtype=t.dtype).normal_(0, 0.02, generator=g) if t.is_floating_point() \
            else torch.zeros(t.shape, dtype=t.dtype)
        batch[name] = value
        size += value.numel() * value.element_size()
        total += value.numel() * value.element_size()
        if size >= FILE_BYTES:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return {"files": files, "bytes": total, "tensors": len(weight_map)}


class AnonPeak:
    """Peak RssAnon of this process, sampled on a thread (the kernel keeps no high-water mark for it)."""

    def __init__(self, every_s: float = 0.002):
        self.peak, self.every_s, self.done = 0, every_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.status("RssAnon"))
            time.sleep(self.every_s)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.status("RssAnon"))


def measure(ckpt: Path, method: str, tp: int, rank: int) -> dict:
    """In this process: load rank `rank` of tp `tp` with `method`; memory and time."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgbatch.parallel import Mesh, ParallelDims, parallelize
    from dgbatch.parallel.load import load_parallelized

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    base = {"rss": AnonPeak.status("VmRSS"), "anon": AnonPeak.status("RssAnon")}  # torch, transformers imported
    mesh = Mesh.local(ParallelDims(tp, 1), rank)
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        if method == "per-rank":
            model = load_parallelized(ckpt, torch.bfloat16, "cpu", mesh)
        else:
            model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(ckpt), dtype=torch.bfloat16).eval()
            parallelize(model, mesh)
    seconds = time.perf_counter() - t0
    peak_load = AnonPeak.status("VmHWM")
    kept = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():  # what a running replica has resident: every weight it keeps, read once
        for p in model.parameters():
            p.sum()
    return {"method": method, "tp": tp, "rank": rank, "load_s": round(seconds, 2),
            "peak_rss_gib": round(peak_load / GIB, 3), "peak_anon_gib": round(anon.peak / GIB, 3),
            "resident_gib": round(AnonPeak.status("VmRSS") / GIB, 3),
            "baseline_rss_gib": round(base["rss"] / GIB, 3), "baseline_anon_gib": round(base["anon"] / GIB, 3),
            "params_kept_gib": round(kept / GIB, 3), "params_kept_bytes": kept}


def weights_per_rank(tps: list[int], tiny: bool) -> dict:
    """Bytes of weights a rank keeps at each TP degree, for every layer of the shape: shapes only (meta)."""
    import copy

    import shapes
    import torch

    from dgbatch.parallel import Mesh, ParallelDims, parallelize

    model = shapes.meta_model(shapes.config(tiny=tiny), torch.bfloat16)
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    per_rank = {}
    for tp in tps:
        m = copy.deepcopy(model)
        parallelize(m, Mesh.local(ParallelDims(tp, 1), 0))
        per_rank[tp] = nbytes(m)
    return {"whole": nbytes(model), "per_rank": per_rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the tiny shape of the same structure (smoke run)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--methods", nargs="+", default=["load-then-shard", "per-rank"])
    ap.add_argument("--checkpoint", type=Path, help="reuse a checkpoint written by an earlier run")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--_measure", nargs=4, metavar=("CKPT", "METHOD", "TP", "RANK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        ckpt, method, tp, rank = args._measure
        print(json.dumps(measure(Path(ckpt), method, int(tp), int(rank))))
        return
    result = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                          "python": platform.python_version()},
              "shape": "tiny" if args.tiny else "26B-A4B", "layers": args.layers, "dtype": "bfloat16", "runs": []}
    with tempfile.TemporaryDirectory(prefix="dgbatch-rank-load-") as tmp:
        ckpt = args.checkpoint or Path(tmp)
        if args.checkpoint is None or not (ckpt / "config.json").is_file():
            ckpt.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            result["checkpoint"] = write_checkpoint(ckpt, args.layers, args.tiny)
            print(f"wrote {result['checkpoint']} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for tp in args.tp:
            for method in args.methods:
                cmd = [sys.executable, __file__, "--_measure", str(ckpt), method, str(tp), "0"]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode:
                    sys.exit(f"{method} tp={tp} failed:\n{proc.stderr[-3000:]}")
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                result["runs"].append(run)
                print(json.dumps(run), file=sys.stderr)
    result["full_shape_weights_per_rank_bytes"] = weights_per_rank(args.tp, args.tiny)
    result["machine"]["loadavg_end"] = os.getloadavg()
    print("| TP | method | peak RSS loading (GiB) | peak anon (GiB) | RSS, weights read (GiB) | params kept (GiB) "
          "| load (s) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in result["runs"]:
        print(f"| {r['tp']} | {r['method']} | {r['peak_rss_gib']:.2f} | {r['peak_anon_gib']:.2f} | "
              f"{r['resident_gib']:.2f} | {r['params_kept_gib']:.2f} | {r['load_s']:.1f} |")
    full = result["full_shape_weights_per_rank_bytes"]
    print("\nWeights on each rank's device, all layers (arithmetic on a meta model): load-then-shard moves the whole "
          f"model ({full['whole'] / GIB:.1f} GiB) to the device before cutting; per-rank moves only the rank's share:")
    print(" | ".join(f"TP={tp}: {n / GIB:.1f} GiB" for tp, n in full["per_rank"].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
