"""The real way users run it: `ray start --head`, then `ray job submit ... -- python -m jobs.generate`
(or `jobs.eval`), on one local cluster shared by the tests of this module."""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from dgbatch.config import load_config
from dgbatch.metrics import TPF_BOUNDARIES
from dgbatch.toy.tasks import answer_for
from tests.helpers import engine_reproduction, ray_head_ports, read_output, write_prompts

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A running `ray start --head`: `head(*entrypoint)` submits a job and waits for it (CompletedProcess);
    `metrics()` is its node's Prometheus text."""

    def __init__(self, ray_bin: str, env: dict, address: str, metrics_port: int, gcs: str):
        self.ray_bin, self.env, self.address, self.metrics_port = ray_bin, env, address, metrics_port
        self.gcs = gcs  # what `ray.address` joins

    def __call__(self, *entrypoint: str) -> subprocess.CompletedProcess:
        deadline = time.time() + 120
        while True:
            job = subprocess.run([self.ray_bin, "job", "submit", "--address", self.address, "--working-dir", ".",
                                  "--", *entrypoint], check=False, env=self.env, cwd=REPO, capture_output=True,
                                 text=True, timeout=900)
            # Under load the dashboard answers before its job agent is up (Ray says to try again).
            if "No available agent to submit job" not in job.stderr or time.time() > deadline:
                return job
            time.sleep(2)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray job stop ID`, `ray list actors ...` against this head: the address goes after the two command words."""
        return subprocess.run([self.ray_bin, *args[:2], "--address", self.address, *args[2:]], check=False,
                              env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def logs(self, submitted: subprocess.CompletedProcess) -> str:
        """The log file `ray job logs` serves of a job `head(...)` submitted: its driver's output."""
        job_id = re.search(r"Job '(raysubmit_\w+)' submitted", submitted.stdout)[1]
        return (Path(self.env["RAY_TMPDIR"]) / "ray" / "session_latest" / "logs" / f"job-driver-{job_id}.log").read_text()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            return r.read().decode()


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head` cluster with token auth and a known metrics port; metrics reach it every second."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    gcs, dash, metrics = _free_port(), _free_port(), _free_port()
    # No AWS settings on the cluster's nodes (as on a cluster nobody gave them to): a job's storage
    # credentials reach its replicas only if the job brings them.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, "RAY_TMPDIR": ray_tmp,
           "RAY_AUTH_MODE": "token", "RAY_metrics_report_interval_ms": "1000",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = lambda *a, **k: subprocess.run(list(a), check=False, env=env, cwd=REPO, capture_output=True, text=True, **k)
    try:
        run(ray_bin, "get-auth-token", "--generate", timeout=60)
        started = run(ray_bin, "start", "--head", "--num-cpus", "2", "--port", str(gcs), "--dashboard-host",
                      "127.0.0.1", "--dashboard-port", str(dash), "--metrics-export-port", str(metrics),
                      "--disable-usage-stats", *ray_head_ports(), timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 60
        while time.time() < deadline and run(ray_bin, "job", "list", "--address", address, timeout=60).returncode:
            time.sleep(1)
        yield RayHead(ray_bin, env, address, metrics, f"127.0.0.1:{gcs}")
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)


@pytest.mark.slow
def test_ray_job_submit_runs_the_demo_job(ray_head, tmp_path):
    out = tmp_path / "out"
    job = ray_head("python", "-m", "jobs.generate", "configs/demo.yaml", f"output.path={out}",
                   "sampling.max_new_tokens=64")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()
    assert "summary:" in job.stdout
    rows = read_output(out).to_pylist()
    assert len(rows) == 96 and len({r["id"] for r in rows}) == 96
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == 96
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"output.path={out}", "sampling.max_new_tokens=64"])
    assert {r["id"]: r["output_text"] for r in rows} == engine_reproduction(cfg, out)
    assert sum(r["output_text"] == answer_for(r["prompt"]) for r in rows) >= 48


@pytest.mark.slow
def test_ray_job_submit_runs_the_toy_eval_and_a_rescore_with_a_user_scorer(ray_head, tmp_path):
    out = tmp_path / "eval"
    job = ray_head("python", "-m", "jobs.eval", "configs/eval-toy.yaml", f"output.path={out}")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "metrics: accuracy" in job.stdout
    metrics = json.loads((out / "_metrics.json").read_text())
    rows = read_output(out).to_pylist()
    assert len(rows) == metrics["n"] == 300 and metrics["error_rows"] == 0
    assert metrics["accuracy"] == sum(r["score"] for r in rows) / 300
    assert metrics["accuracy"] >= 0.85 and set(metrics["groups"]) == {"count", "repeat", "reverse"}
    # The user's scorer module travels in the working directory, like any code of the job.
    job = ray_head("python", "-m", "jobs.eval", "--rescore", str(out), "eval.scorer=examples.toy_scorers:word_overlap")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    partial = json.loads((out / "_metrics.json").read_text())
    assert partial["eval"]["scorer"] == "examples.toy_scorers:word_overlap"
    assert metrics["accuracy"] <= partial["accuracy"] < 1.0  # partial credit: at least exact match's


@pytest.mark.slow
def test_ray_job_stop_ends_the_job_cleanly_and_a_resubmit_resumes(ray_head, tmp_path):
    out, data = tmp_path / "out", tmp_path / "out" / "data"
    # 240 one-row shards (~15 s of work on a quiet machine, at one row a step): the stop lands mid-job even
    # though `ray job stop` takes seconds to start; the demo's 96 rows run in under 2 s.
    rows = 240
    prompts = write_prompts(tmp_path / "in.parquet", [f"repeat: {'abcdef'[i % 6] * (1 + i % 5)}" for i in range(rows)])
    args = ["python", "-m", "jobs.generate", "configs/demo.yaml", f"input.path={prompts}", f"output.path={out}",
            "plan.shard_rows=1", "engine.batch_size=1", "sampling.max_new_tokens=32"]
    sid = f"stop-{uuid.uuid4().hex[:8]}"
    job = ray_head.cli("job", "submit", "--no-wait", "--submission-id", sid, "--working-dir", ".", "--", *args)
    assert job.returncode == 0, job.stdout + job.stderr
    deadline = time.time() + 300
    while time.time() < deadline and not (data.exists() and len(list(data.glob("*.parquet"))) >= 2):
        time.sleep(0.2)
    stop = ray_head.cli("job", "stop", sid)  # SIGTERM to the entrypoint's processes; SIGKILL after 3 s
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = ray_head.cli("job", "status", sid)
    assert "was stopped" in status.stdout + status.stderr
    logs = ray_head.cli("job", "logs", sid).stdout
    committed = len(list(data.glob("*.parquet")))
    total = len(json.loads((out / "_plan" / "manifest.json").read_text())["shards"])
    assert f"interrupted: {committed} of {total} shards committed; rerun the same command to resume" in logs, logs[-3000:]
    assert "SIGTERM received" not in logs and "Traceback" not in logs, logs[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["shards_committed"] == committed < total
    actors = ray_head.cli("list", "actors", "--filter", "state=ALIVE", "--format", "json")
    assert "replica-" not in actors.stdout, "the stopped job's replicas are still alive"

    job = ray_head(*args)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert f"resuming: {committed} of {total} shards already committed" in job.stdout
    written = read_output(out).to_pylist()
    assert len(written) == rows and len({r["id"] for r in written}) == rows
# ---- watching a submitted job: its log, its _progress.json, its metrics ------------------------------

WATCHED_ROWS = 96


def metric_samples(text: str, name: str, job: str) -> list:
    """The samples of `name` (as exported) whose job label is `job`."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name and s.labels.get("job") == job]


def metric_sum(text: str, name: str, job: str) -> float:
    return sum(s.value for s in metric_samples(text, name, job))


@pytest.fixture(scope="module")
def watched_job(ray_head, tmp_path_factory):
    """One submitted job of one large shard, watched as it runs: what its _progress.json said, what
    `dgbatch status` and the metrics endpoint said meanwhile, and what they say once it is done."""
    from dgbatch.status import read_status
    from dgbatch.toy.tasks import sample_examples

    tmp = tmp_path_factory.mktemp("watched")
    out = tmp / "out"
    data = write_prompts(tmp / "in.parquet", [e.prompt for e in sample_examples(WATCHED_ROWS, 5)])
    result: dict = {}
    entry = ("python", "-m", "jobs.generate", "configs/demo.yaml", f"input.path={data}", f"output.path={out}",
             f"plan.shard_rows={WATCHED_ROWS}", "plan.bucket_edges=[]", "engine.batch_size=2",
             "output.progress_every_s=0.5")
    t = threading.Thread(target=lambda: result.setdefault("job", ray_head(*entry)))
    t.start()
    snapshots, statuses, scrapes = [], [], []
    while t.is_alive():
        try:
            snapshots.append(json.loads((out / "_progress.json").read_text()))  # a torn write fails here
        except FileNotFoundError:
            pass
        if snapshots and snapshots[-1]["state"] == "running" and 0 < snapshots[-1]["rows"]["done"] < WATCHED_ROWS:
            statuses.append(read_status(str(out)))
            scrapes.append(ray_head.metrics())
        time.sleep(0.2)
    t.join()
    job = result["job"]
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    summary = json.loads((out / "_summary.json").read_text())
    deadline = time.time() + 60  # the driver waited one export interval; the agent may lag behind it
    while True:
        final = ray_head.metrics()
        if metric_sum(final, "ray_dgbatch_rows_total", str(out)) >= summary["rows"] or time.time() > deadline:
            break
        time.sleep(1)
    return {"job": job, "log": ray_head.logs(job), "out": out, "snapshots": snapshots, "statuses": statuses,
            "scrapes": scrapes, "final": final, "summary": summary}


@pytest.mark.slow
def test_a_submitted_jobs_log_has_plain_progress_lines_that_advance_inside_its_one_shard(watched_job):
    log = watched_job["log"]  # what `ray job logs (--follow)` shows
    assert "summary: " in log
    assert "\x1b" not in log and "\r" not in log, "a terminal's bar or colours in a log file"
    lines = [line for line in log.splitlines() if line.startswith("rows ")]
    counts = [(int(m[1].replace(",", "")), int(m[2])) for m in
              (re.match(rf"rows ([\d,]+)/{WATCHED_ROWS} .*\| shards (\d+)/1 done", line) for line in lines) if m]
    assert len(counts) == len(lines) >= 3, lines
    assert any(0 < rows < WATCHED_ROWS and shards == 0 for rows, shards in counts), lines  # before the commit
    assert [r for r, _ in counts] == sorted(r for r, _ in counts) and counts[-1] == (WATCHED_ROWS, 1)


@pytest.mark.slow
def test_progress_json_is_rewritten_while_the_job_runs_and_status_reads_it(watched_job):
    from dgbatch.progress_file import ProgressRecord

    snaps = watched_job["snapshots"]
    running = [s for s in snaps if s["state"] == "running"]
    assert any(0 < s["rows"]["done"] < WATCHED_ROWS and s["shards"] == {"done": 0, "in_flight": 1, "failed": 0,
                                                                        "total": 1} for s in running)
    for s in snaps:  # each one a whole snapshot in the documented schema
        assert s["schema"] == 1 and ProgressRecord.from_dict(s).to_dict() == s
    assert len({s["updated_at_unix"] for s in running}) >= 3  # rewritten, not written once
    last = json.loads((watched_job["out"] / "_progress.json").read_text())
    assert last["state"] == "finished" and last["rows"] == {"done": WATCHED_ROWS, "total": WATCHED_ROWS}
    assert last["output_tokens"] == watched_job["summary"]["output_tokens"]
    st = watched_job["statuses"][0]  # `dgbatch status` while it ran
    assert st.state == "running" and "updated" in st.note and 0 < st.rows_done < WATCHED_ROWS
    assert st.shards_in_flight == 1 and st.rate_from == "_progress.json"


@pytest.mark.slow
def test_error_records_are_counted_on_the_metrics(ray_head, tmp_path):
    out = tmp_path / "out"
    data = write_prompts(tmp_path / "in.parquet", ["repeat: ab", None, "repeat: cd", None, "reverse: xyz"])
    job = ray_head("python", "-m", "jobs.generate", "configs/demo.yaml", f"input.path={data}", f"output.path={out}")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["failed_rows"] == 2 and summary["rows"] == 5
    deadline = time.time() + 60  # the agent may lag behind the driver's last export
    while (errors := metric_sum(ray_head.metrics(), "ray_dgbatch_error_rows_total", str(out))) < 2:
        assert time.time() < deadline, "the error rows never reached the metrics"
        time.sleep(1)
    assert errors == 2 and metric_sum(ray_head.metrics(), "ray_dgbatch_rows_total", str(out)) == 5


@pytest.mark.slow
def test_replicas_without_the_storage_credentials_stop_the_job_after_a_few_shards(ray_head, tmp_path, s3_server,
                                                                                   s3_bucket):
    """`dgbatch run` joins the cluster (`ray.address`) with S3 credentials in its own environment only: its
    replicas, on nodes without them, fail every shard alike. The job stops after
    `replicas.max_identical_failures` shards with that error (exit 2, one line), not after every attempt of
    every shard."""
    data = write_prompts(tmp_path / "in.parquet", [f"repeat: {'abcdef'[: 1 + i % 6]}" for i in range(24)])
    out = f"{s3_bucket}/job"
    env = {**ray_head.env, "PYTHONPATH": str(REPO), **s3_server.credentials()}  # the endpoint: in the config
    proc = subprocess.run([sys.executable, "-m", "dgbatch.cli", "run", "configs/demo.yaml", f"input.path={data}",
                           f"output.path={out}", f"ray.address={ray_head.gcs}", f"storage.endpoint_url={s3_server.endpoint_url}",
                           "plan.shard_rows=2", "replicas.max_identical_failures=4", "sampling.max_new_tokens=16"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("dgbatch: error:")]
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "4 different shards failed their first attempt in a row" in errors[0], errors[0]
    assert "Unable to locate credentials" in errors[0] and s3_server.secret not in proc.stdout + proc.stderr
    attempts = len(re.findall(r"shard \S+ attempt \d+ failed", proc.stdout + proc.stderr))
    assert attempts < 12, f"{attempts} failed attempts before the job stopped (12 shards, 3 attempts each)"
    print(errors[0], f"({attempts} failed attempts)")


@pytest.mark.slow
def test_metrics_reach_rays_metrics_export_and_agree_with_the_summary(watched_job):
    job, final, summary = str(watched_job["out"]), watched_job["final"], watched_job["summary"]
    generated = summary["rows"] - summary["failed_rows"]
    assert metric_sum(final, "ray_dgbatch_rows_total", job) == summary["rows"] == WATCHED_ROWS
    assert metric_sum(final, "ray_dgbatch_output_tokens_total", job) == summary["output_tokens"] > 0
    assert metric_sum(final, "ray_dgbatch_shards_done_total", job) == summary["shards"] == 1
    assert metric_sum(final, "ray_dgbatch_shards_failed_total", job) == 0
    assert metric_sum(final, "ray_dgbatch_replica_rows_total", job) == generated
    assert metric_sum(final, "ray_dgbatch_replica_output_tokens_total", job) == summary["output_tokens"]
    assert metric_sum(final, "ray_dgbatch_tokens_per_forward_count", job) == generated
    tpf = [r["tokens_per_forward"] for r in read_output(watched_job["out"]).to_pylist() if r["error"] is None]
    buckets = {float(s.labels["le"]): s.value for s in metric_samples(final, "ray_dgbatch_tokens_per_forward_bucket",
                                                                        job)}
    assert buckets == {le: sum(v <= le for v in tpf) for le in [*TPF_BOUNDARIES, float("inf")]}  # each row's TPF
    assert metric_sum(final, "ray_dgbatch_denoising_steps_per_canvas_count", job) >= generated
    replicas = {s.labels["replica"] for s in metric_samples(final, "ray_dgbatch_replica_rows_total", job)}
    assert len(replicas) == 1 and replicas.pop().startswith("replica-0-")
    # while it ran: the gauges
    mid = [m for m in watched_job["scrapes"] if metric_samples(m, "ray_dgbatch_slot_utilization", job)]
    assert mid, "no replica gauge was ever exported while the job ran"
    assert metric_sum(mid[-1], "ray_dgbatch_rows_planned", job) == WATCHED_ROWS
    assert 0 < metric_sum(mid[-1], "ray_dgbatch_slot_utilization", job) <= 1
    assert 0 < metric_sum(mid[-1], "ray_dgbatch_decoder_batch_size", job) <= 2
