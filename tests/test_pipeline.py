"""The pipeline end to end on a real local Ray cluster and the shipped toy checkpoint."""

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgbatch import driver
from dgbatch.config import ConfigError, load_config
from dgbatch.toy.tasks import answer_for, sample_examples
from tests.helpers import (
    FAST,
    assert_exactly_once,
    break_one_shard,
    engine_reproduction,
    read_output,
    short_prompts,
    start_job_until_first_commit,
    write_jsonl,
    write_prompts,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_job_writes_one_correct_row_per_input(ray_local, tmp_path, capsys):
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"output.path={tmp_path / 'demo'}"])
    assert driver.run(cfg) == 0
    inp = pq.read_table(REPO / "data" / "demo_prompts.parquet")
    out = read_output(tmp_path / "demo")
    assert out.num_rows == inp.num_rows
    types = {f.name: str(f.type) for f in out.schema}
    assert types == {
        "id": "string", "row_index": "int64", "prompt": "string", "task": "string", "expected": "string", "output_text": "string",
        "num_prompt_tokens": "int32", "num_output_tokens": "int32", "tokens_per_forward": "double",
        "num_decoder_forwards": "int32", "finish_reason": "string", "error": "string",
    }
    rows = sorted(out.to_pylist(), key=lambda r: int(r["id"].rsplit(":", 1)[1]))
    assert [r["prompt"] for r in rows] == inp.column("prompt").to_pylist()  # carried through unchanged
    assert [r["row_index"] for r in rows] == list(range(inp.num_rows))  # input order is one sort away
    assert [r["task"] for r in rows] == inp.column("task").to_pylist()
    assert all(r["error"] is None and r["finish_reason"] in ("eos", "length") for r in rows)
    # Faithful: exactly what the model gives for these rows (answer quality is test_toy_checkpoint's job).
    assert {r["id"]: r["output_text"] for r in rows} == engine_reproduction(cfg, tmp_path / "demo")
    correct = sum(r["output_text"] == r["expected"] for r in rows)
    assert correct >= len(rows) // 2, f"only {correct}/{len(rows)} demo answers correct"
    assert sum(r["tokens_per_forward"] for r in rows) / len(rows) > 1.0
    for r in rows:  # per-row stats are consistent with transformers' definition
        assert r["num_decoder_forwards"] > 0
        assert r["tokens_per_forward"] == pytest.approx(r["num_output_tokens"] / r["num_decoder_forwards"], rel=0.02)
    meta = json.loads(pq.read_schema(next((tmp_path / "demo" / "data").iterdir())).metadata[b"dgbatch"])
    assert meta["model_path"] == "models/toy-diffusiongemma" and meta["seed"] == 0 and meta["dgbatch_version"]
    success = json.loads((tmp_path / "demo" / "_SUCCESS").read_text())
    summary = json.loads((tmp_path / "demo" / "_summary.json").read_text())
    assert success["rows"] == summary["rows"] == inp.num_rows and summary["failed_rows"] == 0
    assert summary["tokens_per_forward"]["p50"] is not None

    # A rerun of the finished job does nothing and says so.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo" / "data").iterdir()}
    capsys.readouterr()
    assert driver.run(cfg) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "demo" / "data").iterdir()}

    # A different config against the same output is refused, unless forced.
    changed = load_config(REPO / "configs" / "demo.yaml", [f"output.path={tmp_path / 'demo'}", "sampling.seed=5"])
    with pytest.raises(ConfigError, match="different config"):
        driver.run(changed)


def test_bad_rows_become_error_records(ray_local, tmp_path, job_config):
    prompts = [b"repeat 2 ab", None, b"", b"   ", b"\xff\xfe bad utf8", b"reverse " + b"x" * 60, b"reverse abc"]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.binary()), "n": list(range(len(prompts)))}), path)
    cfg = job_config(path, *FAST, "model.max_prompt_tokens=40")
    assert driver.run(cfg) == 0
    rows = {r["n"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert len(rows) == len(prompts)
    assert rows[0]["error"] is None and rows[0]["output_text"] == "ab ab"
    assert rows[6]["error"] is None and rows[6]["output_text"] == "cba"
    expect = {1: "prompt is null", 2: "prompt is empty", 3: "prompt is empty", 4: "not valid UTF-8",
              5: "the model accepts at most 40"}
    for n, msg in expect.items():
        assert rows[n]["finish_reason"] == "error" and msg in rows[n]["error"], rows[n]
        assert rows[n]["output_text"] is None
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["failed_rows"] == 5 and summary["rows"] == 7


def test_messages_column_and_id_column(ray_local, tmp_path, job_config):
    msgs = [[{"role": "user", "content": "reverse hello"}], [{"role": "user", "content": "repeat 3 xy"}],
            [{"role": "user"}]]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"conversation": msgs, "uid": [10, 11, 12]}), path)
    cfg = job_config(path, *FAST, "input.messages_column=conversation", "input.prompt_column=null",
                     "input.id_column=uid")
    assert driver.run(cfg) == 0
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert set(rows) == {"10", "11", "12"}
    assert rows["10"]["output_text"] == "olleh" and rows["11"]["output_text"] == "xy xy xy"
    assert rows["10"]["uid"] == 10 and rows["10"]["conversation"] == msgs[0]
    assert rows["12"]["finish_reason"] == "error" and "string role and a string content" in rows["12"]["error"]


def test_jsonl_content_parts_and_row_budgets_generate_and_a_bad_line_is_an_error_row(ray_local, tmp_path, job_config):
    parts = lambda *texts: [{"role": "user", "content": [{"type": "text", "text": t} for t in texts]}]
    lines = [
        {"conv": parts("reverse ", "hello"), "budget": None},
        {"conv": parts("repeat 3 xy"), "budget": 4},  # "xy xy xy" needs 8 tokens: cut at 4
        '{"conv": [{"role": "user", "content": [{"type": "text", "text": "rev',  # a truncated line
        {"conv": [{"role": "user", "content": [{"type": "image", "url": "a.png"}]}], "budget": None},
        {"conv": parts("reverse abc"), "budget": 0},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl.gz", lines, gz=True)
    cfg = job_config(path, *FAST, "input.format=jsonl", "input.messages_column=conv", "input.prompt_column=null",
                     "input.max_new_tokens_column=budget")
    assert driver.run(cfg) == 0
    rows = {int(r["id"].rsplit(":", 1)[1]): r for r in read_output(tmp_path / "out").to_pylist()}
    assert len(rows) == len(lines)  # rows out = lines in
    assert rows[0]["output_text"] == "olleh" and rows[0]["conv"][0]["content"][1]["text"] == "hello"  # carried as is
    assert rows[1]["output_text"] == "xy x" and rows[1]["finish_reason"] == "length" and rows[1]["budget"] == 4
    assert rows[1]["num_output_tokens"] == 4
    expect = {2: "input line 3: not valid JSON", 3: "image: ",  # its a.png is read on the replica: not there
              4: "budget is 0: input.max_new_tokens_column needs a positive integer"}
    for i, msg in expect.items():
        assert rows[i]["finish_reason"] == "error" and msg in rows[i]["error"], rows[i]
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["failed_rows"] == 3


def test_a_jobs_output_is_the_next_jobs_input(ray_local, tmp_path, job_config):
    words = ["hello", "batch", "diffusion"]
    first = write_prompts(tmp_path / "in.parquet", [f"reverse {w}" for w in words], word=words)
    assert driver.run(job_config(first, *FAST, f"output.path={tmp_path / 'one'}")) == 0
    # the second job reverses the first one's answers: its template reads the earlier output_text
    second = job_config(tmp_path / "one" / "data", *FAST, f"output.path={tmp_path / 'two'}", "input.prompt_column=null",
                        "input.template=reverse {{ output_text }}")
    assert driver.run(second) == 0
    out = read_output(tmp_path / "two")
    rows = {r["word"]: r for r in out.to_pylist()}
    assert {w: rows[w]["output_text"] for w in words} == {w: w for w in words}
    assert {w: rows[w]["prev_output_text"] for w in words} == {w: w[::-1] for w in words}
    assert all(r["prev_id"].startswith("in.parquet:") and r["id"] != r["prev_id"] for r in rows.values())
    names = out.column_names
    assert {"prev_finish_reason", "prev_num_output_tokens", "prompt", "word"} <= set(names)
    assert len(names) == len(set(names)) and names.count("output_text") == 1


def test_datasets_input_with_the_default_batch_size(ray_local, tmp_path, job_config):
    import datasets

    prompts = short_prompts(6)
    datasets.Dataset.from_dict({"prompt": prompts}).save_to_disk(str(tmp_path / "ds"))
    # engine.batch_size=auto (the default): planned without a batch size, sized by the replica
    assert driver.run(job_config(tmp_path / "ds", *FAST, "input.format=datasets", "engine.batch_size=auto")) == 0
    out = read_output(tmp_path / "out")
    assert sorted(out.column("prompt").to_pylist()) == sorted(prompts)
    assert sum(r["output_text"] == answer_for(r["prompt"]) for r in out.to_pylist()) >= 5


def test_two_replicas_write_every_id_exactly_once(ray_local, tmp_path, job_config):
    prompts = short_prompts(24)
    path = write_prompts(tmp_path / "in.parquet", prompts)
    cfg = job_config(path, *FAST, "replicas.num_replicas=2", "plan.shard_rows=3")
    assert driver.run(cfg) == 0
    out = read_output(tmp_path / "out")
    assert_exactly_once(out, [f"in.parquet:{i}" for i in range(len(prompts))])
    plan = json.loads((tmp_path / "out" / "_plan" / "manifest.json").read_text())
    assert len(plan["shards"]) >= 8 and len(list((tmp_path / "out" / "data").iterdir())) == len(plan["shards"])


def test_killed_replica_shard_is_requeued_and_exactly_once_holds(ray_local, tmp_path, job_config):
    prompts = short_prompts(24, seed=2)
    path = write_prompts(tmp_path / "in.parquet", prompts)
    cfg = job_config(path, *FAST, "replicas.num_replicas=2", "plan.shard_rows=2", "engine.batch_size=2")
    data = tmp_path / "out" / "data"
    t, result = start_job_until_first_commit(cfg, data)
    names = [a["name"] for a in ray_local.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("replica-")]
    assert names, "no replica actors found"
    ray_local.kill(ray_local.get_actor(names[0], namespace="dgbatch"), no_restart=False)
    t.join(timeout=600)
    assert result.get("code") == 0
    assert_exactly_once(read_output(tmp_path / "out"), [f"in.parquet:{i}" for i in range(len(prompts))])


def test_interrupted_driver_resumes_only_remaining_shards(tmp_path, toy_model_dir):
    import signal
    import subprocess
    import sys

    # Long answers (count) in many small shards, so the run is still going when it is interrupted.
    prompts = [e.prompt for e in sample_examples(48, 3, tasks=("count",))]
    path = write_prompts(tmp_path / "in.parquet", prompts)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dgbatch.cli", "run", str(REPO / "configs" / "demo.yaml"),
           f"model.path={toy_model_dir}", f"input.path={path}", f"output.path={out}", "plan.shard_rows=2",
           "engine.batch_size=2", "ray.num_cpus=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "data").exists() and len(list((out / "data").glob("*.parquet"))) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what `ray job stop` or a scheduler sends
    proc.communicate(timeout=120)
    done_before = {p.name for p in (out / "data").glob("*.parquet")}  # committed: not a commit's temp file
    total = len(json.loads((out / "_plan" / "manifest.json").read_text())["shards"])
    print(f"interrupted after {len(done_before)} of {total} shards")
    assert 2 <= len(done_before) < total, "the interruption came too late to test resume"
    assert not (out / "_SUCCESS").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming: {len(done_before)} of {total} shards already committed" in rerun.stdout
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_run_now"] == total - len(done_before)
    assert_exactly_once(read_output(out), [f"in.parquet:{i}" for i in range(len(prompts))])


def test_a_shard_that_keeps_failing_is_recorded_and_the_job_exits_nonzero(ray_local, tmp_path, job_config, capsys):
    path = write_prompts(tmp_path / "in.parquet", short_prompts(8, seed=4))
    cfg = job_config(path, *FAST, "plan.shard_rows=4", "plan.bucket_edges=[]", "replicas.max_shard_attempts=2")
    assert driver.run(cfg) == 0
    out = tmp_path / "out"
    broken, kept = break_one_shard(out)
    kept_bytes = (out / "data" / f"{kept}.parquet").read_bytes()
    capsys.readouterr()
    assert driver.run(cfg) == driver.EXIT_FAILED_SHARDS
    assert broken in capsys.readouterr().err
    summary = json.loads((out / "_summary.json").read_text())
    assert [f["shard"] for f in summary["failed_shards"]] == [broken]
    assert "failed 2 attempts" in summary["failed_shards"][0]["reason"]
    assert json.loads((out / "_failed" / f"{broken}.json").read_text())["shard"] == broken
    assert not (out / "_SUCCESS").exists()
    assert (out / "data" / f"{kept}.parquet").read_bytes() == kept_bytes
