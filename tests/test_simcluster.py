"""The multi-node tests (tests/simcluster/: replicas spread over nodes, a node removed mid-job, the seeded chaos
run) in a fresh pytest process: see tests/conftest.py's SIMCLUSTER_ENV for why not in this one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_multi_node_tests_pass_in_a_process_of_their_own():
    env = {**os.environ, "DGBATCH_SIMCLUSTER": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=900", "-rfE",
                           "tests/simcluster"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1400,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-3000:]
