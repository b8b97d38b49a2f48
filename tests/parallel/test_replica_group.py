"""Parallel replicas in the Ray pipeline: 2 ranks (tp_size=2, gloo, one CPU each) run shards, and a
rank killed mid-run brings its group down and back without losing or duplicating a row."""

from __future__ import annotations

import time

import pytest

from dgbatch import driver
from tests.helpers import (
    FAST,
    TP2,
    assert_exactly_once,
    break_one_shard,
    engine_reproduction,
    read_output,
    short_prompts,
    start_job_until_first_commit,
    write_prompts,
)


def _texts(root) -> dict[str, str]:
    out = read_output(root)
    return dict(zip(out.column("id").to_pylist(), out.column("output_text").to_pylist()))


def test_a_two_rank_replica_runs_shards_and_writes_what_one_rank_would(ray_local, tmp_path, job_config):
    prompts = short_prompts(12, seed=6)
    path = write_prompts(tmp_path / "in.parquet", prompts)
    cfg = job_config(path, *FAST, *TP2, "plan.shard_rows=4")
    assert driver.run(cfg) == 0
    assert_exactly_once(read_output(tmp_path / "out"), [f"in.parquet:{i}" for i in range(len(prompts))])
    assert _texts(tmp_path / "out") == engine_reproduction(cfg, tmp_path / "out")  # TP=1, in process
    deadline = time.time() + 30  # the driver killed every rank at the end (ray.kill is asynchronous)
    while _group_ranks(ray_local) and time.time() < deadline:
        time.sleep(0.5)
    assert not _group_ranks(ray_local)


def _group_ranks(ray) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "-rank" in a["name"])


def test_a_killed_rank_takes_its_group_down_and_the_shard_is_rerun_exactly_once(ray_local, tmp_path, job_config,
                                                                                caplog):
    prompts = short_prompts(24, seed=7)
    path = write_prompts(tmp_path / "in.parquet", prompts)
    cfg = job_config(path, *FAST, *TP2, "plan.shard_rows=2", "engine.batch_size=2")
    data = tmp_path / "out" / "data"
    t, result = start_job_until_first_commit(cfg, data)
    first = _group_ranks(ray_local)
    assert [n.split("-")[2] for n in first] == ["g1", "g1"], first  # replica-0-g1-<run>-rank{0,1}
    committed_before = len(list(data.iterdir()))
    ray_local.kill(ray_local.get_actor(first[1], namespace="dgbatch"))  # rank 1, mid-run
    t.join(timeout=600)
    assert result.get("code") == 0
    out = tmp_path / "out"
    assert_exactly_once(read_output(out), [f"in.parquet:{i}" for i in range(len(prompts))])
    assert committed_before < len(list((out / "data").iterdir())), "the job ended before the kill took effect"
    assert "replica group 0 torn down" in caplog.text  # and a new one started: the job finished
    assert "requeued" in caplog.text  # the shard it was running
    assert _texts(out) == engine_reproduction(cfg, out)


def test_a_shard_the_leader_cannot_read_fails_alone_and_the_group_stays_up(ray_local, tmp_path, job_config, caplog):
    path = write_prompts(tmp_path / "in.parquet", short_prompts(8, seed=4))
    cfg = job_config(path, *FAST, *TP2, "plan.shard_rows=4", "plan.bucket_edges=[]", "replicas.max_shard_attempts=2")
    assert driver.run(cfg) == 0
    out = tmp_path / "out"
    broken, _ = break_one_shard(out)
    caplog.clear()
    assert driver.run(cfg) == driver.EXIT_FAILED_SHARDS
    assert "failed 2 attempts" in (out / "_failed" / f"{broken}.json").read_text()
    assert "torn down" not in caplog.text  # the followers were released: no rebuild for a bad shard


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tp_size=3"], "parallel.tp_size=3 does not divide num_attention_heads=4"),
        (["parallel.ep_size=3"], "parallel.ep_size=3 does not divide num_experts=4"),
        (["parallel.tp_size=8"], "parallel.tp_size=8 does not divide num_attention_heads=4"),
    ],
)
def test_degrees_that_do_not_fit_the_model_fail_before_anything_starts(tmp_path, job_config, overrides, message):
    from dgbatch.config import ConfigError

    path = write_prompts(tmp_path / "in.parquet", short_prompts(2))
    cfg = job_config(path, *overrides)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        driver.run(cfg)
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "out").exists()  # not even the job manifest: nothing started
