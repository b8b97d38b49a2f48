"""Storage faults are retried in one place (dgbatch/io/retry.py), bounded, counted, and exactly-once
commits stay exact; a store that stays down stops the job early and a rerun resumes.

The faults come from tests/faults.py, wrapped around the real filesystems (local, and the SeaweedFS
S3 server); the jobs are real `dgbatch run` processes with their own local Ray.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dgbatch.config import StorageSection
from dgbatch.io import retry
from dgbatch.io.commit import put_exclusive, read_json, write_json
from dgbatch.io.fs import StorageUnavailable, filesystem, raw_filesystem
from dgbatch.io.retry import RetryingFileSystem, RetryPolicy, kind_of
from tests.faults import FaultSpec, FaultyFileSystem, read_log
from tests.helpers import REPO, read_output, write_prompts

FAST = RetryPolicy(retries=8, max_s=20.0)


def faulty(fs, tmp_path: Path, **spec) -> tuple[RetryingFileSystem, Path]:
    log = tmp_path / f"faults-{len(list(tmp_path.glob('faults-*')))}.jsonl"
    return RetryingFileSystem(FaultyFileSystem(fs, FaultSpec(log=str(log), **spec)), FAST), log


def s3(s3_server, url: str):
    st = StorageSection(key=s3_server.key, secret=s3_server.secret, endpoint_url=s3_server.endpoint_url)
    return raw_filesystem(url, st)


def test_each_transient_kind_is_retried_and_counted_and_the_call_succeeds(tmp_path):
    retry.drain()
    fs, log = faulty(raw_filesystem(str(tmp_path))[0], tmp_path, rate=0.4, seed=1, max_per_call=2,
                     kinds=["timeout", "throttled", "server_error", "connection"])
    (tmp_path / "a").mkdir()
    n = 120  # which calls fail hangs on their paths (tmp_path's too): enough calls that every kind comes up
    for i in range(n):
        (tmp_path / "a" / f"{i}.txt").write_text(str(i))
    got = [fs.cat_file(str(tmp_path / "a" / f"{i}.txt")) for i in range(n)]
    assert got == [str(i).encode() for i in range(n)]
    assert len(fs.ls(str(tmp_path / "a"))) == n
    faults = read_log(log)
    counts = retry.drain()
    assert {f["kind"] for f in faults} == {"timeout", "throttled", "server_error", "connection"}
    assert sum(counts.get(k, 0) for k in retry.KINDS) == len(faults) > 10
    for kind in retry.KINDS:
        assert counts.get(kind, 0) == sum(f["kind"] == kind for f in faults)


def test_errors_that_say_something_about_the_request_are_not_retried(tmp_path):
    retry.drain()
    fs = RetryingFileSystem(raw_filesystem(str(tmp_path))[0], FAST)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(str(tmp_path / "missing"))
    for err in (FileNotFoundError("x"), PermissionError("x"), OSError(errno.ENOSPC, "No space left on device"),
                OSError(errno.EROFS, "Read-only file system"), OSError(errno.EINVAL, "PreconditionFailed"),
                OSError(errno.EIO, "Input/output error on /data/f000503.parquet"), ValueError("x")):
        assert kind_of(err) is None, err
    assert retry.drain() == {}


def test_a_store_that_stays_down_fails_the_call_in_bounded_time_naming_it(tmp_path):
    down = tmp_path / "down"
    down.touch()
    fs = RetryingFileSystem(FaultyFileSystem(raw_filesystem(str(tmp_path))[0], FaultSpec(down_file=str(down))),
                            RetryPolicy(retries=50, max_s=1.5))
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable) as e:
        fs.info(str(tmp_path / "x"))
    assert time.monotonic() - t0 < 5
    line = e.value.line()
    assert "storage kept failing: info " in line and "storage.retry_max_s=1.5" in line
    assert "ConnectionRefusedError" in line
    assert retry.drain()["gave_up"] == 1


def test_a_retried_exclusive_create_that_meets_its_own_object_counts_as_created_on_s3(s3_server, s3_bucket,
                                                                                       tmp_path):
    raw, root = s3(s3_server, s3_bucket)
    # Each create's first attempt tears (half the time the PUT lands and only its response is lost);
    # its retry does not.
    fs, log = faulty(raw, tmp_path, rate=1.0, kinds=["torn"], paths=r"/k\d+$", max_per_call=1)
    retry.drain()
    created = []
    for i in range(12):
        data = f"payload {i}".encode()
        created.append(put_exclusive(fs, f"{root}/k{i}", data))
        assert raw.cat_file(f"{root}/k{i}") == data
        assert put_exclusive(fs, f"{root}/k{i}", b"another writer") is False  # a second writer still loses
    counts = retry.drain()
    landed = counts.get("own_object", 0)
    assert created == [True] * 12
    assert 0 < landed < 12, "the seeded tears should include both: landed and lost"
    torn = [f for f in read_log(log) if f["kind"] == "torn"]
    assert len(torn) == 12 and sum(counts.get(k, 0) for k in retry.KINDS) == len(read_log(log))


def test_a_torn_replacing_upload_leaves_a_partial_object_that_the_retry_replaces_on_s3(s3_server, s3_bucket,
                                                                                      tmp_path):
    raw, root = s3(s3_server, s3_bucket)
    fs, log = faulty(raw, tmp_path, rate=1.0, kinds=["torn"], max_per_call=1)
    seen = []
    real_pipe = raw.pipe_file

    def spy(path, data, **kw):
        seen.append(len(data))
        return real_pipe(path, data, **kw)

    raw.pipe_file = spy
    try:
        value = {"rows": list(range(200))}
        write_json(fs, f"{root}/_commits/x.json", value)
    finally:
        del raw.pipe_file
    blob = (json.dumps(value, indent=2) + "\n").encode()
    assert seen == [len(blob) // 2, len(blob)], "first half an object, then the whole one"
    assert read_json(raw, f"{root}/_commits/x.json") == value
    assert [f["kind"] for f in read_log(log)] == ["torn"]


def test_filesystem_wraps_every_filesystem_in_the_retry_layer_with_the_configured_policy(tmp_path):
    fs, _ = filesystem(str(tmp_path), StorageSection(retries=2, retry_max_s=3.5))
    assert isinstance(fs, RetryingFileSystem) and fs.policy == RetryPolicy(2, 3.5)
    assert fs.exists(str(tmp_path)) and fs.protocol == ("file", "local")


# ---- whole jobs -----------------------------------------------------------------------------------


def _cmd(toy_model_dir: Path, inp: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dgbatch.cli", "run", str(REPO / "configs" / "demo.yaml"),
            f"model.path={toy_model_dir}", f"input.path={inp}", f"output.path={out}", "plan.shard_rows=2",
            "engine.batch_size=2", "ray.num_cpus=2", "sampling.max_new_tokens=16", *extra]


def _env(s3_server, spec: FaultSpec) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **s3_server.env(), **spec.env()}


def test_a_store_that_stays_down_stops_the_job_early_with_one_line_and_a_rerun_resumes(
        s3_server, s3_bucket, tmp_path, toy_model_dir):
    prompts = [f"repeat: {'abcdefgh'[: 1 + i % 8]}" for i in range(16)]
    inp = write_prompts(tmp_path / "in.parquet", prompts)
    out = f"{s3_bucket}/job"
    down = tmp_path / "store-is-down"
    spec = FaultSpec(down_file=str(down), paths=r"/(data|_commits|_plan)(/|$)")
    cmd = _cmd(toy_model_dir, inp, out, "storage.retries=20", "storage.retry_max_s=3")
    env = _env(s3_server, spec)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    raw, root = s3(s3_server, out)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(_data_files(raw, root)) < 2:
        time.sleep(0.2)
    down.touch()  # the store goes down for good, mid-job
    t_down = time.monotonic()
    stdout, stderr = proc.communicate(timeout=240)
    stopped_after = time.monotonic() - t_down
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dgbatch: error:")]
    assert proc.returncode == 2, stdout + stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "storage kept failing" in lines[0] and "The job stopped early" in lines[0], lines[0]
    assert "rerun the same command" in lines[0]
    committed = len(_data_files(raw, root))
    assert 2 <= committed < 8
    assert stopped_after < 60, f"the job took {stopped_after:.0f} s to stop after the store went down"
    print(f"stopped {stopped_after:.1f} s after the store went down, {committed} of 8 shards committed: {lines[0]}")

    down.unlink()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming: {committed} of 8 shards already committed" in rerun.stdout
    table = read_output(out, key=s3_server.key, secret=s3_server.secret, endpoint_url=s3_server.endpoint_url)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(f"in.parquet:{i}" for i in range(16))


def _data_files(raw, root: str) -> list[str]:
    raw.invalidate_cache()
    try:
        return [p for p in raw.ls(f"{root}/data", detail=False) if p.endswith(".parquet")]
    except FileNotFoundError:
        return []


def test_the_planning_tasks_storage_retries_are_counted_in_the_summary(s3_server, s3_bucket, tmp_path,
                                                                       toy_model_dir):
    """Four input fragments are planned by Ray tasks, writing their shards through injected faults: every
    fault any process met (driver, planning workers, replica) is one retry in `_summary.json`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = tmp_path / "in.parquet"  # four row groups: four fragments, planned by Ray tasks
    pq.write_table(pa.table({"prompt": [f"repeat: {'abcdefgh'[: 1 + i % 8]}" for i in range(16)]}), inp,
                   row_group_size=4)
    out = f"{s3_bucket}/planned"
    log = tmp_path / "faults.jsonl"
    spec = FaultSpec(seed=3, rate=0.4, paths=r"/_plan(/|$)", log=str(log))
    # 16 one-row shards: ~40 calls under _plan/, so the draws (which hang on the paths) meet every process
    cmd = _cmd(toy_model_dir, inp, out, "plan.fragment_rows=4", "plan.shard_rows=1", "storage.retries=20",
               "storage.retry_max_s=60")
    job = subprocess.run(cmd, env=_env(s3_server, spec), capture_output=True, text=True, timeout=600, check=False)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    raw, root = s3(s3_server, out)
    summary = json.loads(raw.cat_file(f"{root}/_summary.json"))
    faults = [e for e in read_log(log) if "kind" in e]
    assert len(faults) >= 5, "too few faults to say anything"
    assert len({e["pid"] for e in faults}) >= 3, "the faults should reach the planning workers too"
    assert summary["retries"]["storage"]["total"] == len(faults), (summary["retries"], len(faults))
    assert summary["retries"]["storage"]["gave_up"] == 0 and summary["rows"] == 16
