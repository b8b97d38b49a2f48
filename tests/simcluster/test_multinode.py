"""On a multi-node cluster (simulated: several raylets on this machine, `sim_cluster`), replicas spread over
the nodes, a whole node lost mid-job loses no row, and a local output path is refused unless every node
shares it (output.shared_filesystem)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO, read_output, write_prompts


def _cmd(toy_model_dir: Path, inp: Path, out: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dgbatch.cli", "run", str(REPO / "configs" / "demo.yaml"),
            f"model.path={toy_model_dir}", f"input.path={inp}", f"output.path={out}", f"ray.address={address}",
            "plan.shard_rows=2", "plan.bucket_edges=[]", "engine.batch_size=2", "sampling.max_new_tokens=16",
            "replicas.num_replicas=2", *extra]


def test_a_local_output_on_a_multi_node_cluster_is_refused_unless_declared_shared(sim_cluster, tmp_path,
                                                                                  toy_model_dir):
    inp = write_prompts(tmp_path / "in.parquet", ["repeat: ab"] * 4)
    done = subprocess.run(_cmd(toy_model_dir, inp, tmp_path / "out", sim_cluster.address), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("dgbatch: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "is a local path, but the Ray cluster has 3 nodes" in lines[0]
    assert "output.shared_filesystem=true" in lines[0]
    assert not (tmp_path / "out" / "data").exists()  # no replica wrote anything


def test_replicas_spread_over_nodes_and_a_node_removed_mid_job_loses_no_row(sim_cluster, tmp_path, toy_model_dir):
    prompts = [f"count: {'abcdefghi'[: 1 + i % 9]}" for i in range(40)]
    inp = write_prompts(tmp_path / "in.parquet", prompts)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(toy_model_dir, inp, out, sim_cluster.address, "output.shared_filesystem=true"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hosts: dict = {}
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        hosts = {n: r for n in sim_cluster.nodes() if (r := sim_cluster.replicas_on(n))}
        if len(list((out / "data").glob("*.parquet"))) >= 2 and sum(map(len, hosts.values())) == 2:
            break
        time.sleep(0.2)
    assert len(hosts) == 2, f"two replicas on {len(hosts)} node(s): not spread"
    victim = next(n for n in hosts if n is not sim_cluster.cluster.head_node)
    sim_cluster.remove_node(victim)  # the whole node: its raylet, its workers, the replica on it
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        sim_cluster.add_node()  # back to three nodes for the next test
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    ids = read_output(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == {f"in.parquet:{i}" for i in range(40)}
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == 40 and summary["failed_shards"] == []
    assert summary["retries"]["shard_attempts"] >= 1, "the lost node's shard should have run again"
