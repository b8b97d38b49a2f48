"""One shard, without Ray: a failing row never fails its shard; a second writer never duplicates."""

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgbatch import checkpoint
from dgbatch.config import load_config
from dgbatch.io.fs import filesystem
from dgbatch.io.layout import Layout
from dgbatch.planning.planner import plan_fragment, read_shard
from dgbatch.planning.source import inspect_input
from dgbatch.reference import ReferenceBackend
from dgbatch.shard import BackendShards
from tests.helpers import write_prompts


class RowFailingBackend:
    """The real reference backend, except that generating one chosen row raises (e.g. a device error)."""

    def __init__(self, inner, bad_row: str):
        self.inner, self.bad_row = inner, bad_row

    def generate(self, requests):
        if any(r.row_id == self.bad_row for r in requests):
            raise RuntimeError("simulated device error on one row")
        return self.inner.generate(requests)


@pytest.fixture
def planned(tmp_path, toy_model_dir):
    prompts = ["reverse abc", "repeat 2 xy", "reverse hello", "repeat 3 q"]
    path = write_prompts(tmp_path / "in.parquet", prompts)
    cfg = load_config(None, ["sampling.max_new_tokens=32", "plan.bucket_edges=[]"], base={
        "model": {"path": str(toy_model_dir)}, "input": {"path": str(path)}, "output": {"path": str(tmp_path / "o")}})
    model_dir, params, _ = checkpoint.resolve(cfg)
    fs, root = filesystem(cfg.output.path)
    frag = inspect_input(cfg.input, None, 1000).fragments[0]
    [meta] = plan_fragment(cfg, frag, [], str(model_dir), 100, root)
    tok = checkpoint.load_tokenizer(model_dir)
    pad, eos = checkpoint.special_ids(model_dir, tok)
    backend = ReferenceBackend(checkpoint.load_model(model_dir, cfg.model), params, 8, pad, eos)
    return {"cfg": cfg, "fs": fs, "layout": Layout(root), "shard": meta["shard_id"], "tok": tok, "eos": eos, "backend": backend}


def shards(p, backend) -> BackendShards:
    return BackendShards(backend, p["tok"], p["fs"], p["layout"], p["eos"], {"test": True}, None)


def test_a_failing_row_becomes_an_error_record(planned):
    p = planned
    stats = shards(p, RowFailingBackend(p["backend"], "in.parquet:1")).run(p["shard"])
    rows = {r["id"]: r for r in pq.read_table(p["layout"].data(p["shard"])).to_pylist()}
    assert len(rows) == 4 and stats["rows"] == 4 and stats["error_rows"] == 1
    bad = rows["in.parquet:1"]
    assert bad["finish_reason"] == "error" and "simulated device error" in bad["error"]
    assert rows["in.parquet:0"]["output_text"] == "cba" and rows["in.parquet:2"]["output_text"] == "olleh"
    marker = json.loads(Path(p["layout"].commit(p["shard"])).read_text())
    data = Path(p["layout"].data(p["shard"])).read_bytes()
    assert marker["stats"]["rows"] == 4 and marker["shard"] == p["shard"]
    assert marker["file"] == {"size": len(data), "rows": 4, "sha256": hashlib.sha256(data).hexdigest()}


def test_second_writer_keeps_the_first_commit(planned):
    p = planned
    first = shards(p, p["backend"])
    first.run(p["shard"])
    before = Path(p["layout"].data(p["shard"])).read_bytes()
    # A zombie replica that built the same shard's output: its commit must lose, leaving the file intact.
    table, _ = first.build_output(read_shard(p["fs"], p["layout"].plan_shard(p["shard"])))
    from dgbatch.io.commit import put_exclusive

    buf = io.BytesIO()
    pq.write_table(table.append_column("zombie", pa.array([1] * table.num_rows)), buf)
    assert put_exclusive(p["fs"], p["layout"].data(p["shard"]), buf.getvalue()) is False
    assert Path(p["layout"].data(p["shard"])).read_bytes() == before
    # A retried run of a committed shard does not regenerate; its stats come from the committed file.
    stats = shards(p, RowFailingBackend(p["backend"], "in.parquet:0")).run(p["shard"])
    assert stats["error_rows"] == 0 and Path(p["layout"].data(p["shard"])).read_bytes() == before
