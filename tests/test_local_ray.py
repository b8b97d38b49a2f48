"""A Ray that dgbatch starts for a local run listens on 127.0.0.1 only (GCS, raylet, workers, agents)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to list sockets")
def test_local_ray_listens_on_loopback_only():
    ray_tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "local_ray_sockets.py"), "--json"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    processes = {s["process"] for s in found["sockets"]}
    assert {"gcs_server", "raylet"} <= processes, found  # the listing really saw Ray's own servers
    assert any(p.startswith("ray::") for p in processes), found  # and its workers / agents
    assert found["exposed"] == [], f"Ray processes listening beyond loopback: {found['exposed']}"
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_local_rays_workers_start_with_the_replica_imports_done(ray_local):
    """A replica's imports (torch, the model class: ~4.5 s here) run as its worker process starts, while Ray
    finishes starting and the driver plans, not in the replica's __init__."""
    import uuid

    from dgbatch.replica import REPLICA_IMPORTS

    @ray_local.remote
    def imported_at_entry(names):
        return {n: n in sys.modules for n in names}

    fresh = {"env_vars": {"DGBATCH_TEST_FRESH_WORKER": uuid.uuid4().hex}}  # a new worker process, no task before
    seen = ray_local.get(imported_at_entry.options(runtime_env=fresh).remote(REPLICA_IMPORTS), timeout=300)
    assert seen == dict.fromkeys(REPLICA_IMPORTS, True)
