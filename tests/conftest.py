"""Shared test fixtures, one section per concern; add new sections below (imports in the block at the top)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import (
    DEMO_CONFIG,
    MIXED_PROMPTS,
    TOY_MODEL,
    S3Server,
    SimCluster,
    s3_answers,
    stop_process_group,
    weed_binary,
    weed_command,
)

# The simulated multi-node cluster's tests run in a pytest process of their own (tests/test_simcluster.py):
# in a process that already ran an in-process Ray (`ray_local`), a driver joining the simulated cluster
# waited forever in ray.init for the GCS's cluster id (Ray 2.60); in a fresh process it does not.
SIMCLUSTER_ENV = "DGBATCH_SIMCLUSTER"
collect_ignore_glob = [] if os.environ.get(SIMCLUSTER_ENV) else ["simcluster/*"]


# ---------------------------------------------------------------------------------------------
# S3: a real SeaweedFS server (`weed mini`), one per test session, on 127.0.0.1 and free ports.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = weed_binary()
    key, secret = "dgbatch-test", f"secret-{uuid.uuid4().hex}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    for attempt in range(2):  # a free port can be taken between probing and binding: retry once
        data = tmp_path_factory.mktemp("seaweedfs")
        log_path = data / "weed.log"
        args, s3_port = weed_command(weed, data)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args, cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        url = f"http://127.0.0.1:{s3_port}"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not s3_answers(url):
            time.sleep(0.2)
        if proc.poll() is None and s3_answers(url):
            break
        stop_process_group(proc)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        if attempt == 1:
            pytest.fail(f"SeaweedFS S3 did not answer at {url} within 60 s.\ncommand: {' '.join(args)}\n{tail}")
    try:
        yield S3Server(endpoint_url=url, key=key, secret=secret, log_path=log_path)
    finally:
        stop_process_group(proc)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket: 's3://<unique name>'."""
    return s3_server.make_bucket()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> S3Server:
    """The standard AWS environment pointing at the test server, for code that reads it."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


# ---------------------------------------------------------------------------------------------
# Pipeline: the shipped toy checkpoint, a local Ray cluster, small Parquet inputs, job configs.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def toy_model_dir() -> Path:
    if not (TOY_MODEL / "model.safetensors").is_file():
        pytest.fail(f"toy checkpoint missing at {TOY_MODEL}; it is committed to the repo (git lfs is not used)")
    return TOY_MODEL


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process pipeline tests (2 CPUs, like the CI machine), on 127.0.0.1 only."""
    import ray

    from dgbatch.pool import start_local_ray

    start_local_ray(ray, 2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def job_config(tmp_path: Path, toy_model_dir: Path):
    """Build a JobConfig over the toy model, writing to tmp_path/out unless told otherwise."""
    from dgbatch.config import load_config

    def make(input_path: Path | str, *overrides: str):
        base = {
            "model": {"path": str(toy_model_dir)},
            "input": {"path": str(input_path)},
            "output": {"path": str(tmp_path / "out")},
            "engine": {"batch_size": 16},
            "plan": {"shard_rows": 8},
        }
        return load_config(None, list(overrides), base=base)

    return make


# ---------------------------------------------------------------------------------------------
# Finished job outputs, for what reads an output (status, report, other readers): made once per session.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_output(ray_local, tmp_path_factory) -> Path:
    """The output of a real run of configs/demo.yaml (96 rows, 6 shards). Do not modify it: copy it."""
    from dgbatch import driver
    from dgbatch.config import load_config

    out = tmp_path_factory.mktemp("demo") / "out"
    assert driver.run(load_config(DEMO_CONFIG, [f"output.path={out}"])) == 0
    return out


@pytest.fixture(scope="session")
def mixed_output(ray_local, tmp_path_factory, toy_model_dir) -> Path:
    """A finished job of 12 rows with 5 error rows (null, empty, blank, two too long) in 4 shards."""
    from dgbatch import driver
    from dgbatch.config import load_config

    tmp = tmp_path_factory.mktemp("mixed")
    path = tmp / "in.parquet"
    pq.write_table(pa.table({"prompt": pa.array(MIXED_PROMPTS, pa.binary()), "n": list(range(len(MIXED_PROMPTS)))}),
                   path)
    cfg = load_config(None, ["sampling.max_new_tokens=32", "model.max_prompt_tokens=40", "plan.shard_rows=3"], base={
        "model": {"path": str(toy_model_dir)}, "input": {"path": str(path)}, "output": {"path": str(tmp / "out")},
        "engine": {"batch_size": 4}})
    assert driver.run(cfg) == 0
    return tmp / "out"


# ---------------------------------------------------------------------------------------------
# Multi-node: a simulated cluster (`ray.cluster_utils.Cluster`): a head and worker raylets on this
# machine, 1 CPU each. A job joins it with `ray.address=<address>`.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sim_cluster():
    """A head and two worker nodes, 1 CPU each, shared by the session's multi-node tests (a test that removes
    a node adds one back)."""
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    sim = SimCluster(temp_dir)
    try:
        sim.add_node()
        sim.add_node()
        sim.cluster.wait_for_nodes()
        yield sim
    finally:
        sim.cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
