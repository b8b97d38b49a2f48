"""Planning: deterministic shards, length buckets that cut padding, O(shards) metadata."""

import json
import random
from pathlib import Path

from dgbatch import checkpoint, driver
from dgbatch.io.fs import filesystem
from dgbatch.io.layout import Layout
from dgbatch.planning.buckets import auto_edges, bucket_of, padding_fraction
from dgbatch.planning.planner import read_shard
from tests.helpers import write_prompts


def mixed_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["reverse " + "".join(rng.choice("abcdefgh") for _ in range(rng.choice([2, 5, 40, 90, 160, 230])))
            for _ in range(n)]


def plan(ray, cfg):
    fs, root = filesystem(cfg.output.path)
    model_dir, _, max_prompt = checkpoint.resolve(cfg)
    return driver.make_plan(ray, cfg, fs, Layout(root), model_dir, max_prompt), Layout(root)


def padding(p) -> float:
    computed = sum(s.padded_positions for s in p.shards)
    return 1 - sum(s.prompt_tokens for s in p.shards) / computed


def test_bucket_helpers():
    assert auto_edges([10] * 50 + [100] * 50, 2) == [16]
    assert [bucket_of(x, [16, 64]) for x in (1, 16, 17, 64, 65)] == [0, 0, 1, 1, 2]
    assert padding_fraction([4, 4], 2) == 0 and abs(padding_fraction([1, 3], 2) - 1 / 3) < 1e-9


def test_plan_is_deterministic(ray_local, tmp_path, job_config):
    inp = tmp_path / "in"
    for i in range(3):  # several files, several fragments each
        write_prompts(inp / f"part-{i}.parquet", mixed_prompts(40, seed=i), extra=[str(j) for j in range(40)])
    plans = []
    for run in ("a", "b"):
        cfg = job_config(inp, f"output.path={tmp_path / run}", "plan.fragment_rows=16", "plan.shard_rows=8",
                         "model.max_prompt_tokens=400")
        plans.append(plan(ray_local, cfg))
    (pa, la), (pb, lb) = plans
    assert [s.shard_id for s in pa.shards] == [s.shard_id for s in pb.shards]
    assert pa.edges == pb.edges and len(pa.shards) > 10
    assert sum(s.rows for s in pa.shards) == pa.num_rows == 120
    fs, _ = filesystem(str(tmp_path))
    for s in pa.shards:
        ta, tb = (read_shard(fs, layout.plan_shard(s.shard_id)) for layout in (la, lb))
        assert ta.equals(tb)
    rows = [r for s in pa.shards for r in read_shard(fs, la.plan_shard(s.shard_id)).to_pylist()]
    assert sorted(r["_dgb_id"] for r in rows) == sorted(f"part-{f}.parquet:{r}" for f in range(3) for r in range(40))
    # Each row knows its position in its input file (the output's row_index), whichever fragment planned it.
    assert all(r["_dgb_row_index"] == int(r["_dgb_id"].rsplit(":", 1)[1]) == int(r["extra"]) for r in rows)
    # A rerun reuses the stored plan rather than re-planning.
    manifest = Path(la.plan_manifest)
    before = manifest.stat().st_mtime_ns
    again, _ = plan(ray_local, job_config(inp, f"output.path={tmp_path / 'a'}", "plan.fragment_rows=16",
                                          "plan.shard_rows=8", "model.max_prompt_tokens=400"))
    assert manifest.stat().st_mtime_ns == before and [s.shard_id for s in again.shards] == [s.shard_id for s in pa.shards]
    assert json.loads(manifest.read_text())["fingerprint"]


def test_bucketing_cuts_prompt_padding(ray_local, tmp_path, job_config):
    path = write_prompts(tmp_path / "in.parquet", mixed_prompts(600, seed=7))
    common = ["plan.shard_rows=64", "engine.batch_size=16", "model.max_prompt_tokens=400"]
    bucketed, layout = plan(ray_local, job_config(path, f"output.path={tmp_path / 'b'}", *common))
    flat, _ = plan(ray_local, job_config(path, f"output.path={tmp_path / 'f'}", "plan.bucket_edges=[]", *common))
    assert len(bucketed.edges) >= 3 and flat.edges == []
    # Batches in input order (no planning at all), from the lengths the planner measured.
    by_row = {}
    fs, _ = filesystem(str(tmp_path))
    for s in bucketed.shards:
        t = read_shard(fs, layout.plan_shard(s.shard_id), ["_dgb_id", "_dgb_num_prompt_tokens"])
        for rid, n in zip(*(c.to_pylist() for c in t.columns)):
            by_row[int(rid.rsplit(":", 1)[1])] = n
    input_order = padding_fraction([by_row[i] for i in range(600)], 16)
    assert input_order > 0.4, input_order
    assert padding(bucketed) < 0.1, padding(bucketed)
    assert padding(bucketed) <= padding(flat) < input_order  # one bucket still sorts inside each shard
