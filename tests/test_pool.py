"""Several jobs on one replica pool (the model loaded once), as a backfill runs its partitions."""

from __future__ import annotations

import pytest

from dgbatch import driver
from dgbatch.config import ConfigError
from dgbatch.pool import ReplicaPool
from dgbatch.toy.tasks import sample_examples
from tests.helpers import engine_reproduction, read_output, write_prompts

FAST = ["sampling.max_new_tokens=32"]


def test_jobs_run_one_after_another_on_one_pool_load_the_model_once(ray_local, tmp_path, job_config):
    parts = []
    for i in range(2):
        prompts = [e.prompt for e in sample_examples(10, 30 + i, tasks=("reverse", "repeat"))]
        path = write_prompts(tmp_path / f"part-{i}.parquet", prompts)
        parts.append(job_config(path, *FAST, f"output.path={tmp_path / f'out-{i}'}", f"sampling.seed={i}",
                                "plan.shard_rows=4"))
    with ReplicaPool(parts[0]) as pool:
        loaded = []
        for cfg in parts:
            assert driver.run(cfg, pool=pool) == 0
            loaded.append([(s["process_start"], s["ready_at"]) for s in pool.stats()])
        with pytest.raises(ConfigError, match="model section"):
            driver.run(job_config(tmp_path / "part-0.parquet", "model.dtype=bfloat16",
                                  f"output.path={tmp_path / 'other'}"), pool=pool)
    assert loaded[0] == loaded[1]  # the same replica process, loaded once, ran both jobs
    for i, cfg in enumerate(parts):
        out = read_output(tmp_path / f"out-{i}")
        texts = dict(zip(out.column("id").to_pylist(), out.column("output_text").to_pylist()))
        assert len(texts) == 10 and texts == engine_reproduction(cfg, tmp_path / f"out-{i}")


def test_after_a_pool_kills_its_replicas_none_of_their_processes_writes_again(ray_local, tmp_path):
    """Ray's quirk, worked around in `pool.wait_exited`: a killed actor's refs fail before its process has
    exited, and a thread of it goes on writing meanwhile (a replica's commit landed after the driver had
    counted them). Here an actor writes a file every moment on a thread; once the pool's wait returns, no
    file may appear."""
    import os
    import time

    from dgbatch.pool import wait_exited

    @ray_local.remote
    class Writer:
        def go(self, folder: str) -> dict:
            import threading

            from dgbatch.replica import this_process

            def loop():
                n = 0
                while True:
                    n += 1
                    with open(f"{folder}/{n}.tmp", "w") as f:
                        f.write("x")
                    os.rename(f"{folder}/{n}.tmp", f"{folder}/{n}")

            threading.Thread(target=loop, daemon=True).start()
            return this_process()

        def ping(self) -> None:
            pass

    folder = tmp_path / "out"
    folder.mkdir()
    w = Writer.remote()
    me = ray_local.get(w.go.remote(str(folder)))
    while len(os.listdir(folder)) < 50:
        time.sleep(0.01)
    ray_local.kill(w)
    ray_local.wait([w.ping.remote()], timeout=10)  # Ray has it dead: here its thread still writes (the quirk)
    wait_exited(ray_local, [(me["node_id"], me["pid"])], time.time() + 10)
    written = set(os.listdir(folder))
    time.sleep(0.5)
    assert set(os.listdir(folder)) == written, "a killed replica's process wrote after the pool's wait"
