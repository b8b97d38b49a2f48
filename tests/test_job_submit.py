"""The real way users run it: `ray start --head`, then `ray job submit ... -- python -m jobs.generate`
(or `jobs.eval`), on one local cluster shared by the tests of this module."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dgbatch.config import load_config
from dgbatch.toy.tasks import answer_for
from tests.helpers import engine_reproduction, ray_head_ports, read_output

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head` cluster with token auth; yields submit(*entrypoint) -> CompletedProcess."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = lambda *a, **k: subprocess.run(list(a), check=False, env=env, cwd=REPO, capture_output=True, text=True, **k)
    try:
        run(ray_bin, "get-auth-token", "--generate", timeout=60)
        started = run(ray_bin, "start", "--head", "--num-cpus", "2", "--port", str(gcs), "--dashboard-host",
                      "127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats", *ray_head_ports(), timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 60
        while time.time() < deadline and run(ray_bin, "job", "list", "--address", address, timeout=60).returncode:
            time.sleep(1)

        def submit(*entrypoint: str) -> subprocess.CompletedProcess:
            deadline = time.time() + 120
            while True:
                job = run(ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--", *entrypoint,
                          timeout=900)
                # Under load the dashboard answers before its job agent is up (Ray says to try again).
                if "No available agent to submit job" not in job.stderr or time.time() > deadline:
                    return job
                time.sleep(2)

        yield submit
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
