"""Score a finished job's outputs against an `expected` column (the toy task family's answers).

    python scripts/score_job.py OUTPUT [OUTPUT ...]

For each job output root (local path): rows, exact match of output_text to expected (overall and
per task), mean tokens_per_forward, error rows, and the job's wall time from _summary.json.
This is how BENCHMARKS.md compares a job run with the engine against one with the reference.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq


def score(root: Path) -> dict:
    t = pq.read_table(root / "data").to_pylist()  # every committed shard
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in t:
        by_task[r.get("task") or "all"].append(r["output_text"] == r["expected"])
    tpf = [r["tokens_per_forward"] for r in t if r["tokens_per_forward"] is not None]
    summary = json.loads((root / "_summary.json").read_text()) if (root / "_summary.json").exists() else {}
    return {
        "output": str(root),
        "rows": len(t),
        "exact_match": sum(sum(v) for v in by_task.values()) / max(1, len(t)),
        "exact_match_by_task": {k: sum(v) / len(v) for k, v in sorted(by_task.items())},
        "mean_tokens_per_forward": sum(tpf) / max(1, len(tpf)),
        "error_rows": sum(r["error"] is not None for r in t),
        "summary": summary,
    }


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(score(Path(arg)), indent=2, default=str))
