"""The GPU mode of benchmarks/parallel_bench.py on CPU with a tiny model of the real structure: the
same code path (process group of one rank, parallelize at tp=ep=1, forced collectives), so the
unattended GPU run does not meet a bug first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_mode_runs_on_cpu_with_a_tiny_shape(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "parallel_bench.py"), "gpu", "--device", "cpu", "--tiny",
           "--batch", "2", "--steps", "2", "--warmup", "1", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == [], result["errors"]
    assert result["process_group"] == {"backend": "gloo", "world_size": 1}
    runs = {r["run"] for r in result["summary"]}
    assert runs == {"unsharded engine", "sharded tp=ep=1", "sharded tp=ep=1, all-reduces issued"}
    assert all(r["step_ms"] > 0 and r["decoder_ms"] > 0 for r in result["results"])


def test_rank_loading_bench_runs_on_a_tiny_shape(tmp_path):
    """benchmarks/rank_loading_bench.py end to end (write a sharded checkpoint, load rank 0 both ways)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "rank_loading_bench.py"), "--tiny", "--tp", "2", "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["method"] for r in result["runs"]} == {"load-then-shard", "per-rank"}
    kept = {r["method"]: r["params_kept_bytes"] for r in result["runs"]}
    assert kept["per-rank"] == kept["load-then-shard"] > 0
    full = result["full_shape_weights_per_rank_bytes"]
    assert full["per_rank"]["2"] < full["whole"]
