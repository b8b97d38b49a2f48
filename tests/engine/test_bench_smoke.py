"""The engine benchmarks that a lent GPU session runs unattended (`scripts/gpu_bench.sh`), smoke-run
on CPU with tiny sizes, so that session does not spend its minutes on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_real_shape_bench_runs_with_a_tiny_shape(tmp_path):
    out = tmp_path / "real.json"
    _run([str(REPO / "benchmarks" / "real_shape_bench.py"), "--tiny", "--device", "cpu", "--dtype", "float32",
          "--layers", "2", "--prompts", "8", "--batch-size", "4", "--min-prompt", "8", "--max-prompt", "40",
          "--max-new-tokens", "32", "--steps", "4", "--backends", "engine,reference-sorted", "--out", str(out)])
    d = json.loads(out.read_text())
    by = {r["backend"]: r for r in d["results"]}
    assert set(by) == {"engine", "reference-sorted"}
    assert by["engine"]["slot_utilization"] >= 0.9  # random weights rarely stop a row early
    assert all(0 < r["output_tokens"] <= 8 * 32 and r["tokens_per_s"] > 0 for r in by.values())


def test_engine_bench_rounds_and_ratios(tmp_path):
    out = tmp_path / "engine.json"
    _run([str(REPO / "benchmarks" / "engine_bench.py"), "--prompts", "12", "--batch-size", "4", "--repeats", "2",
          "--out", str(out)])
    d = json.loads(out.read_text())
    assert [r["backend"] for r in d["results"]] == ["engine", "reference, input order", "reference, length-sorted"]
    assert all(len(r["wall_s_runs"]) == 2 for r in d["results"])
    assert len(d["engine_speedup_per_round"]) == 2 and d["engine_speedup_vs_best_reference"] > 0
    engine = d["results"][0]
    assert engine["slot_utilization"] > 0.5 and engine["output_tokens"] > 0
