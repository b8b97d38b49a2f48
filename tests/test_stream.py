"""A replica's stream of shards, without Ray: shards share one engine, each commits when its last row is
done, outputs are those of each shard alone, and a bad row fails only itself."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dgbatch import checkpoint
from dgbatch.config import load_config
from dgbatch.engine import EngineBackend
from dgbatch.io.fs import filesystem
from dgbatch.io.layout import Layout
from dgbatch.planning.planner import plan_fragment
from dgbatch.planning.source import inspect_input
from dgbatch.shard import BackendShards, JobContext
from dgbatch.stream import ShardStream
from dgbatch.toy.tasks import sample_examples
from tests.helpers import write_prompts


class Factory:
    """Engine backends for the stream; `wrap` may put a test's spy around each one."""

    def __init__(self, model, pad, eos, batch: int, wrap=None):
        self.model, self.pad, self.eos, self.batch, self.wrap = model, pad, eos, batch, wrap
        self.built: list = []

    def batch_size(self, params, longest_prompt):
        return self.batch

    def build(self, params, batch_size):
        b = EngineBackend(self.model, params, batch_size, self.pad, self.eos)
        self.built.append(b)
        return self.wrap(b) if self.wrap else b


class TagSpy:
    """Records which shards had rows in the engine's slots at each step."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self):
        out = self.inner.step()
        self.steps.append({r.tag[0] for r in self.inner.engine.rows if r is not None} | {f.tag[0] for f in out})
        return out


class FailingRow:
    """The real engine, except that a step over slots holding one chosen row raises before any row of it
    finishes (say, a device error in the model pass)."""

    def __init__(self, inner, bad_row: str):
        self.inner, self.bad_row = inner, bad_row

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self):
        if any(r is not None and r.request.row_id == self.bad_row for r in self.inner.engine.rows):
            raise RuntimeError("simulated device error on one row")
        return self.inner.step()

    def generate(self, requests):
        if any(r.row_id == self.bad_row for r in requests):
            raise RuntimeError("simulated device error on one row")
        return self.inner.generate(requests)


@pytest.fixture(scope="module")
def toy(toy_model_dir):
    model_dir = checkpoint.local_checkpoint(load_config(None, [], base=_base(toy_model_dir, "i", "o")).model)
    tok = checkpoint.load_tokenizer(model_dir)
    pad, eos = checkpoint.special_ids(model_dir, tok)
    model = checkpoint.load_model(model_dir, load_config(None, [], base=_base(toy_model_dir, "i", "o")).model)
    return {"dir": model_dir, "tok": tok, "pad": pad, "eos": eos, "model": model}


def _base(model_dir, inp, out) -> dict:
    return {"model": {"path": str(model_dir)}, "input": {"path": str(inp)}, "output": {"path": str(out)}}


def planned_job(tmp_path: Path, toy, n: int = 24, shard_rows: int = 6, overrides: tuple[str, ...] = ()):
    """n toy prompts planned into shards of `shard_rows`: (JobContext, shard ids, layout)."""
    prompts = [e.prompt for e in sample_examples(n, 8)]
    path = write_prompts(tmp_path / "in.parquet", prompts)
    cfg = load_config(None, ["sampling.max_new_tokens=48", "plan.bucket_edges=[]", f"plan.shard_rows={shard_rows}",
                             *overrides], base=_base(toy["dir"], path, tmp_path / "out"))
    params = checkpoint.resolve_sampling(toy["dir"], cfg.sampling)
    _, root = filesystem(cfg.output.path)
    frag = inspect_input(cfg.input, None, 1000).fragments[0]
    metas = plan_fragment(cfg, frag, [], str(toy["dir"]), 200, root)
    job = JobContext(cfg.output.path, root, {"test": True}, None, params, max(m["longest_prompt"] for m in metas))
    return job, [m["shard_id"] for m in metas], Layout(root)


def run_concurrently(stream: ShardStream, shards: list[str], job: JobContext) -> dict[str, dict]:
    """Every shard's run_shard at once, one thread each, as a replica's actor threads call it."""
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda s=s: results.setdefault(s, stream.run_shard(s, job))) for s in shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return results


def outputs(layout: Layout, shards: list[str]) -> dict[str, dict]:
    return {r["id"]: r for s in shards for r in pq.read_table(layout.data(s)).to_pylist()}


def test_shards_share_the_engine_and_each_row_is_what_its_shard_alone_gives(tmp_path, toy):
    job, shards, layout = planned_job(tmp_path, toy)
    assert len(shards) == 4
    factory = Factory(toy["model"], toy["pad"], toy["eos"], batch=8, wrap=TagSpy)
    stream = ShardStream(factory, toy["tok"], toy["eos"]).start()
    stats = run_concurrently(stream, shards, job)
    stream.stop()
    assert sorted(stats) == sorted(shards) and all(s["rows"] == 6 for s in stats.values())
    assert len(factory.built) == 1, "one backend for the whole job"
    steps = stream.backend.steps
    assert any(len(tags) >= 2 for tags in steps), "no step ever held rows of two shards"
    assert stream.stats.steps == len(steps) and stream.stats.rows == 24 and stream.stats.shards == 4

    # the same shards, one after another, each alone through a fresh engine
    alone = tmp_path / "alone"
    fs, root = filesystem(str(alone))
    alone_layout = Layout(root)
    for s in shards:
        Path(alone_layout.plan_shard()).mkdir(parents=True, exist_ok=True)
        Path(alone_layout.plan_shard(s)).write_bytes(Path(layout.plan_shard(s)).read_bytes())
        backend = EngineBackend(toy["model"], job.params, 8, toy["pad"], toy["eos"])
        BackendShards(backend, toy["tok"], fs, alone_layout, toy["eos"], {"test": True}, None).run(s)
    streamed, expected = outputs(layout, shards), outputs(alone_layout, shards)
    assert streamed == expected


def test_the_stream_counts_prompt_tokens_and_the_fewer_its_engine_encoded_for_samples_of_one_prompt(tmp_path, toy):
    job, shards, layout = planned_job(tmp_path, toy, n=6, shard_rows=8, overrides=("sampling.num_samples=4",))
    stream = ShardStream(Factory(toy["model"], toy["pad"], toy["eos"], batch=8), toy["tok"], toy["eos"]).start()
    run_concurrently(stream, shards, job)
    stream.stop()
    rows = outputs(layout, shards)
    assert len(rows) == 24 and stream.stats.prompt_tokens == sum(r["num_prompt_tokens"] for r in rows.values())
    assert 0 < 4 * stream.stats.encoded_prompt_tokens <= stream.stats.prompt_tokens


def test_a_committed_shard_is_not_run_again(tmp_path, toy):
    job, shards, layout = planned_job(tmp_path, toy, n=6, shard_rows=6)
    factory = Factory(toy["model"], toy["pad"], toy["eos"], batch=4)
    stream = ShardStream(factory, toy["tok"], toy["eos"]).start()
    first = stream.run_shard(shards[0], job)
    before = Path(layout.data(shards[0])).read_bytes()
    steps = stream.stats.steps
    again = stream.run_shard(shards[0], job)
    stream.stop()
    assert again == first and stream.stats.steps == steps
    assert Path(layout.data(shards[0])).read_bytes() == before


def test_a_row_that_fails_the_engine_becomes_its_error_record_and_the_others_are_unchanged(tmp_path, toy):
    job, shards, layout = planned_job(tmp_path, toy, n=12, shard_rows=6)
    clean = ShardStream(Factory(toy["model"], toy["pad"], toy["eos"], batch=8), toy["tok"], toy["eos"]).start()
    run_concurrently(clean, shards, job)
    clean.stop()
    expected = outputs(layout, shards)
    for s in shards:
        Path(layout.data(s)).unlink()
    bad = sorted(expected)[3]
    factory = Factory(toy["model"], toy["pad"], toy["eos"], batch=8, wrap=lambda b: FailingRow(b, bad))
    stream = ShardStream(factory, toy["tok"], toy["eos"]).start()
    stats = run_concurrently(stream, shards, job)
    stream.stop()
    got = outputs(layout, shards)
    assert got[bad]["finish_reason"] == "error" and "simulated device error on one row" in got[bad]["error"]
    assert {k: v for k, v in got.items() if k != bad} == {k: v for k, v in expected.items() if k != bad}
    assert sum(s["error_rows"] for s in stats.values()) == 1


def test_progress_counts_rows_of_shards_in_flight(tmp_path, toy):
    job, shards, _ = planned_job(tmp_path, toy, n=12, shard_rows=12)
    seen: list[dict] = []

    class Watch:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def step(self):
            out = self.inner.step()
            seen.append(stream.progress())
            return out

    stream = ShardStream(Factory(toy["model"], toy["pad"], toy["eos"], batch=4, wrap=Watch), toy["tok"],
                         toy["eos"]).start()
    stream.run_shard(shards[0], job)
    stream.stop()
    counts = [p[shards[0]][0] for p in seen if shards[0] in p]
    tokens = [p[shards[0]][1] for p in seen if shards[0] in p]
    assert counts == sorted(counts) and 0 < counts[len(counts) // 2] < 12 and counts[-1] >= 11
    assert tokens == sorted(tokens) and 0 < tokens[len(tokens) // 2] < tokens[-1]
    assert stream.progress() == {}
    generated = stream.take_rows()  # what the replica's metrics get, by job label
    assert list(generated) == [""] and generated[""][0] == 12 and len(generated[""][2]) == 12
    assert generated[""][1] == stream.stats.output_tokens and stream.take_rows() == {}
