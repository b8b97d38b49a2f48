"""A seeded chaos run: a job of 50 shards on a simulated three-node cluster, writing to the real S3 server
through injected storage faults (timeouts, SlowDown, 5xx, resets, torn uploads: tests/faults.py), while
replicas are killed at random and a whole node is removed. At the end the output ids are the input ids,
each exactly once, and `_summary.json` accounts for every storage retry and every shard attempt lost.

    DGBATCH_SIMCLUSTER=1 pytest tests/simcluster/test_chaos.py               # CI: 50 shards, 2 kills, 1 node removed, seed 0, fault rate 0.08
    DGBATCH_SIMCLUSTER=1 DGBATCH_SOAK=1 pytest tests/simcluster/test_chaos.py -s  # soak: 400 shards, a kill every few seconds, a node
                                                  # removed (and added back) three times, a fresh seed
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from dgbatch.io.retry import KINDS
from tests.faults import FaultSpec, read_log, reported
from tests.helpers import REPO, read_output, write_prompts

SOAK = bool(os.environ.get("DGBATCH_SOAK"))
SEED = random.SystemRandom().randrange(2**31) if SOAK else 0
SHARDS, KILLS, NODE_LOSSES, FAULT_RATE = (400, 30, 3, 0.08) if SOAK else (50, 2, 1, 0.08)


class Chaos:
    """Kills replica processes and removes nodes at seeded random moments while the job runs (in the main
    thread: Ray starts a node only there); remembers every process it took down (their storage retries
    died with them)."""

    def __init__(self, sim, committed, rng: random.Random, proc: subprocess.Popen):
        self.sim, self.committed, self.rng, self.proc = sim, committed, rng, proc
        self.killed: set[int] = set()
        self.kills = self.node_losses = 0
        self.events: list[str] = []

    def run(self) -> None:
        # Spread the events over the job's first half: each waits for a few more commits, then a random pause
        # (over the whole job, a loaded machine's job could finish before the last event was due).
        todo = ["kill"] * KILLS + ["node"] * NODE_LOSSES
        self.rng.shuffle(todo)
        every = max(SHARDS // (2 * (len(todo) + 1)), 2)
        for i, event in enumerate(todo):
            while self.proc.poll() is None and self.committed() < every * (i + 1):
                time.sleep(0.2)
            time.sleep(self.rng.uniform(0, 1.5))
            # An event waits until it has something to hit (a replica between restarts has no process yet).
            while self.proc.poll() is None and not self.strike(event):
                time.sleep(0.2)
            if self.proc.poll() is not None:
                return

    def strike(self, event: str) -> bool:
        """Kill a replica or remove a node that hosts one; False when none is there to hit right now."""
        hosts = {n: r for n in self.sim.nodes() if (r := self.sim.replicas_on(n))}
        workers = sorted((n for n in hosts if n is not self.sim.cluster.head_node), key=lambda n: n.unique_id)
        if event == "kill" and hosts:
            victim = self.rng.choice(sorted((p for r in hosts.values() for p in r), key=lambda p: p.pid))
            try:
                os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:  # it died on its own between the listing and the kill
                return False
            self.killed.add(victim.pid)
            self.kills += 1
            self.events.append(f"killed replica pid {victim.pid} at {self.committed()} commits")
            return True
        if event == "node" and workers:
            node = self.rng.choice(workers)
            self.killed.update(p.pid for p in hosts[node])
            self.sim.remove_node(node)
            self.node_losses += 1
            self.events.append(f"removed a node ({len(hosts[node])} replica(s)) at {self.committed()} commits")
            self.sim.add_node()  # a replacement joins, as an autoscaler's would
            return True
        return False


def test_a_seeded_chaos_run_loses_and_duplicates_nothing_and_accounts_for_every_retry(
        sim_cluster, s3_server, s3_bucket, tmp_path, toy_model_dir):
    rows = SHARDS * 2
    rng = random.Random(SEED)
    prompts = [f"repeat: {''.join(rng.choice('abcdef') for _ in range(rng.randint(1, 6)))}" for _ in range(rows)]
    inp = write_prompts(tmp_path / "in.parquet", prompts)
    out_url = f"{s3_bucket}/chaos"
    log = tmp_path / "faults.jsonl"
    spec = FaultSpec(seed=SEED, rate=FAULT_RATE, paths=r"/(data|_commits|_plan)(/|$)", log=str(log))
    env = {**os.environ, "PYTHONPATH": str(REPO), **spec.env()}
    sim_cluster.faults_file.write_text(env["DGBATCH_FAULTS"])  # the replicas' processes read it
    cmd = [sys.executable, "-m", "dgbatch.cli", "run", str(REPO / "configs" / "demo.yaml"),
           f"model.path={toy_model_dir}", f"input.path={inp}", f"output.path={out_url}",
           f"ray.address={sim_cluster.address}", "plan.shard_rows=2", "plan.bucket_edges=[]",
           "engine.batch_size=2", "sampling.max_new_tokens=12", "replicas.num_replicas=2",
           "replicas.max_shard_attempts=10", "storage.retries=10", "storage.retry_max_s=60",
           # the cluster's nodes have no AWS environment: the settings travel with the job
           f"storage.key={s3_server.key}", f"storage.secret={s3_server.secret}",
           f"storage.endpoint_url={s3_server.endpoint_url}", "storage.region=us-east-1"]
    print(f"chaos seed {SEED}: {SHARDS} shards, {KILLS} kills, {NODE_LOSSES} node losses, fault rate {FAULT_RATE}")
    import s3fs

    storage = {"key": s3_server.key, "secret": s3_server.secret, "endpoint_url": s3_server.endpoint_url}
    fs = s3fs.S3FileSystem(**storage, skip_instance_cache=True, use_listings_cache=False)

    def committed() -> int:
        try:
            return sum(p.endswith(".parquet") for p in fs.ls(f"{out_url}/data", detail=False, refresh=True))
        except FileNotFoundError:
            return 0

    with open(tmp_path / "job.out", "w+") as out, open(tmp_path / "job.err", "w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        chaos = Chaos(sim_cluster, committed, rng, proc)
        try:
            chaos.run()
            proc.wait(timeout=3600 if SOAK else 900)
        finally:
            sim_cluster.faults_file.unlink()
            if proc.poll() is None:
                proc.kill()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    print("\n".join(chaos.events))
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert chaos.kills == KILLS and chaos.node_losses == NODE_LOSSES, chaos.events

    ids = read_output(out_url, **storage).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == rows, f"{len(ids)} rows out, {len(set(ids))} distinct, {rows} in"
    assert set(ids) == {f"in.parquet:{i}" for i in range(rows)}

    summary = json.loads(fs.cat_file(f"{out_url}/_summary.json"))
    entries = read_log(log)
    faults = [e for e in entries if "kind" in e]
    counted, unreported = reported(entries)
    retried = summary["retries"]["storage"]
    print(f"{len(faults)} faults injected, {len(unreported)} in killed processes before they could report them; "
          f"summary: {summary['retries']}")
    assert len(faults) >= 10, "too few faults to say anything"
    assert {e["pid"] for e in unreported} <= chaos.killed, "a process that lived left retries unreported"
    assert retried["total"] == len(counted) == sum(e["drained"] for e in entries if "drained" in e)
    assert retried["gave_up"] == 0 and sum(retried[k] for k in KINDS) == retried["total"]
    for kind in ("timeout", "throttled", "server_error"):
        assert retried[kind] == sum(f["kind"] == kind for f in counted)
    assert retried["connection"] == sum(f["kind"] in ("connection", "torn") for f in counted)
    assert summary["retries"]["shard_attempts"] >= 1
    assert summary["rows"] == rows and summary["failed_shards"] == [] and summary["shards"] == SHARDS
