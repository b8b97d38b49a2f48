"""A pool of replicas: Ray and the replicas started once (the model loaded once per replica), shared by
every job run on it, one after another.

    with ReplicaPool(cfg) as pool:                  # starts (or joins) Ray, creates the replicas
        for partition_cfg in partitions:            # e.g. a backfill: same model, other input/output
            code = driver.run(partition_cfg, pool=pool)

A job may run on a pool when it has the pool's `model`, `engine`, `parallel` and `replicas` sections
(what a replica is built from); its input, output, sampling, plan and storage are its own, and
travel with each shard (`shard.JobContext`). `driver.run(cfg)` without a pool makes one for the job
and closes it at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from dgbatch.config import ConfigError, JobConfig
from dgbatch.errors import JobError
from dgbatch.replica import REPLICA_IMPORTS
from dgbatch.scheduler import JobObserver, Scheduler
from dgbatch.sizing import batch_size_bound

log = logging.getLogger("dgbatch")

POOL_SECTIONS = ("model", "engine", "parallel", "replicas")  # what the replicas are built from


def init_ray(cfg: JobConfig):
    import ray

    if ray.is_initialized():
        return ray
    if not sys.stdout.isatty():  # a log file (`ray job logs`): no colour codes in Ray's lines or the replicas'
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        logging.getLogger("ray._private.worker").addFilter(_PlainText())
    with _keeping_stop_handlers():
        if cfg.ray.address:
            with _joining(cfg.ray.address, cfg.ray.connect_timeout_s, "ray.address"):
                ray.init(address=cfg.ray.address, log_to_driver=True)
        elif os.environ.get("RAY_ADDRESS"):
            with _joining(os.environ["RAY_ADDRESS"], cfg.ray.connect_timeout_s, "RAY_ADDRESS"):
                ray.init(log_to_driver=True)  # under `ray job submit`, or a cluster the user pointed at
        else:
            start_local_ray(ray, cfg.ray.num_cpus)
    return ray


class RayUnreachable(JobError):
    """ray.address (or RAY_ADDRESS) does not answer."""


DEFAULT_PORTS = {"": 6379, "ray": 10001}  # the GCS; Ray Client's server


def check_reachable(address: str, timeout: float, what: str) -> None:
    """Open (and close) a TCP connection to a Ray address within `timeout`, so an address that refuses or does
    not answer fails in seconds (exit 2), where `ray.init` retries for minutes. 'auto' and 'local' name no host."""
    import socket

    scheme, _, rest = address.rpartition("://")
    if address in ("auto", "local") or scheme not in DEFAULT_PORTS:
        return  # another scheme (e.g. http:// of a job server) is Ray's to refuse
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        host, port = rest.rstrip("/"), str(DEFAULT_PORTS[scheme])
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise RayUnreachable(f"cannot reach the Ray cluster at {what} {address!r} ({host}:{port}): {why} within "
                             f"{timeout:g} s (ray.connect_timeout_s). Start it (`ray start --head`) or fix {what}: "
                             "the head's HOST:PORT (port 6379 by default)") from None


@contextlib.contextmanager
def _joining(address: str, timeout: float, what: str):
    """Join a cluster: its address answers within `timeout` (or exit 2), and what answers is a Ray GCS (Ray gives
    up on one that is not in about 20 s: one line too, not its traceback)."""
    check_reachable(address, timeout, what)
    if "://" not in address and address not in ("auto", "local") and not _gcs_answers(address, timeout):
        raise RayUnreachable(f"cannot join the Ray cluster at {what} {address!r}: something answers there, but no "
                             f"Ray GCS within {timeout:g} s (ray.connect_timeout_s); is it a Ray head's GCS address "
                             "(HOST:PORT, port 6379 by default)?")
    try:
        yield
    except ConnectionError as e:
        raise RayUnreachable(f"cannot join the Ray cluster at {what} {address!r}: {e}; is it a Ray head's GCS "
                             "address (HOST:PORT, port 6379 by default)?") from None


_GCS_PROBE = "import sys\nfrom ray._raylet import GcsClient\nGcsClient(address=sys.argv[1])\n"


def _gcs_answers(address: str, timeout: float) -> bool:
    """Whether a Ray GCS at `address` gives its cluster id within `timeout` (Ray's own client waits ~40 s, and
    `ray.init` longer). Only silence counts: an error (auth, another protocol) is left to `ray.init` to report.

    In a child process: a GcsClient made in this one connects on Ray's singleton IO context, and the
    `ray.init` that follows then waits forever for its own cluster id (seen on Ray 2.60)."""
    import subprocess

    try:
        subprocess.run([sys.executable, "-c", _GCS_PROBE, address], check=False, capture_output=True,
                       timeout=timeout + 5)  # + the child's imports
    except subprocess.TimeoutExpired:
        return False
    return True


def started_here(ray) -> bool:
    """Whether this process started the Ray it is connected to (a local Ray: no other node will join it)."""
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


@contextlib.contextmanager
def _keeping_stop_handlers():
    """Keep this process's SIGINT / SIGTERM handlers (the CLI's clean stop) across `ray.init`, which replaces
    SIGTERM's twice: with `sys.exit` in Python, then with its C++ failure handler, which aborts (exit 134)."""
    stops = (signal.SIGINT, signal.SIGTERM)
    kept = {s: signal.getsignal(s) for s in stops} if threading.current_thread() is threading.main_thread() else {}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)


LOCAL_HOST = "127.0.0.1"
# A local Ray's workers import what a replica imports before its model loads as they start, while Ray
# finishes starting, rather than in the replica's __init__; and no worker is started for the driver beside
# the replica's, to import the same on the same cores (BENCHMARKS.md, issue 13).
LOCAL_RAY_SYSTEM_CONFIG = {"preload_python_modules": list(REPLICA_IMPORTS), "prestart_worker_first_driver": False}


def start_local_ray(ray, num_cpus: int | None, log_to_driver: bool = True) -> None:
    """A Ray for this machine alone: every process it starts (GCS, raylet, workers, dashboard agent,
    runtime-env agent) listens on 127.0.0.1 only.

    Ray binds its gRPC servers to 127.0.0.1 exactly when the node's IP is 127.0.0.1, but `ray.init`
    turns a 127.0.0.1 `_node_ip_address` into the machine's address unless Ray is in its single-machine
    mode (`ray_constants.ENABLE_RAY_CLUSTER` false, as on macOS and Windows). That switch is set only
    while this node starts, so nothing else in the process (a `ray start` it runs later) inherits it.
    scripts/local_ray_sockets.py and tests/test_local_ray.py list the sockets of what Ray started.
    """
    from ray._private import ray_constants

    # Ray turns token auth on for a new local cluster (good) and says so on every run (noise): keep the
    # protection, drop that one line. Its other auth messages (e.g. auth turned off) still show.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TokenAuthNotice())
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host=LOCAL_HOST, _node_ip_address=LOCAL_HOST,
                 log_to_driver=log_to_driver, _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


class _PlainText(logging.Filter):
    """Ray's "Connected to Ray cluster. View the dashboard at ..." without its colour codes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()), ()
        return True


class _TokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def shards_in_flight(batch_size: int | str, shard_rows: float) -> int:
    """Shards a replica holds at once: two, or enough that about two batches of rows are always queued
    behind its slots (small shards), at most MAX_SHARDS_IN_FLIGHT."""
    from dgbatch.placement import MAX_SHARDS_IN_FLIGHT

    batch = batch_size_bound(batch_size)
    return max(2, min(MAX_SHARDS_IN_FLIGHT, 1 + math.ceil(2 * batch / max(shard_rows, 1))))


class ReplicaPool:
    """Ray and `cfg.replicas.num_replicas` replicas of `cfg`'s model and engine, starting at once (the
    model loads while the caller goes on, e.g. plans), or with `start=False` at the first `start` or
    `run` (a backfill whose partitions are all complete starts neither Ray nor a model); `run` waits
    for the replicas as it needs them."""

    def __init__(self, cfg: JobConfig, *, start: bool = True):
        self.cfg = cfg
        self.ray = None
        self.handles: list = []
        self.timings: dict = {}
        self.closed = False
        self.cluster_outlives_us = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))  # not a local Ray of ours
        if start:
            self.start()

    @property
    def started(self) -> bool:
        return self.ray is not None

    def start(self) -> None:
        """Start Ray (or join it) and create the replicas; nothing when already started."""
        from dgbatch.capacity import check_placeable
        from dgbatch.placement import make_replicas

        if self.started:
            return
        if self.closed:
            raise RuntimeError("this replica pool is closed")
        cfg = self.cfg
        t0 = time.time()
        ray = init_ray(cfg)
        check_placeable(ray, cfg, may_grow=not started_here(ray))  # no node could ever hold one: exit 2 now
        self.ray = ray
        self.timings = {"ray_init_s": round(time.time() - t0, 3), "ray_up_at": time.time()}
        self.run_id = uuid.uuid4().hex[:8]
        self.handles = make_replicas(self.ray, cfg, self.run_id)
        if cfg.parallel.world_size > 1:
            print(f"starting {len(self.handles)} replica group(s) of {self.handles[0].describe()} "
                  f"(actors replica-N-gG-{self.run_id}-rankR, namespace dgbatch)", flush=True)
        else:
            print(f"starting {len(self.handles)} replica(s) (names replica-N-{self.run_id}, namespace dgbatch)",
                  flush=True)
        self.scheduler = Scheduler(self.handles, max_attempts=cfg.replicas.max_shard_attempts,
                                   max_identical=cfg.replicas.max_identical_failures)
        self.scheduler.start()

    def check(self, cfg: JobConfig) -> None:
        """Refuse a job whose replicas would be different ones."""
        diff = [s for s in POOL_SECTIONS if getattr(cfg, s) != getattr(self.cfg, s)]
        if diff:
            raise ConfigError(f"this job's {', '.join(diff)} section(s) differ from the replica pool's: a pool "
                              f"runs jobs of one model and engine ({', '.join(POOL_SECTIONS)}); use another pool")

    def run(self, job, shards: list, *, observer: JobObserver | None = None) -> dict[str, str]:
        """Run one job's shards (`ShardMeta`s) on the pool; returns those that failed for good (id -> reason).
        `observer` hears what happens to them (`scheduler.JobObserver`)."""
        self.start()
        depth = shards_in_flight(self.cfg.engine.batch_size, sum(s.rows for s in shards) / max(len(shards), 1))
        return self.scheduler.run([s.shard_id for s in shards], job, self._wait, depth=depth, observer=observer)

    def _wait(self, refs: list, timeout: float) -> list:
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)  # short: Ctrl-C stays prompt
        if ready:
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        return ready

    def stats(self, timeout: float = 10.0) -> list[dict]:
        """Each live replica's stream stats and start-up timings (empty where a replica does not answer)."""
        out = []
        for h in self.handles:
            ref = h.stats()
            try:
                out.append(self.ray.get(ref, timeout=timeout) if ref is not None else {})
            except Exception:  # noqa: BLE001 - stats are for logs and benchmarks; a dead replica has none
                out.append({})
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.started and self.cluster_outlives_us:
                self._flush_metrics()
            # A replica still finishing a commit would add a shard after the driver's last word on them.
            processes = [h.process for h in self.handles if h.process is not None]
            gone = [r for h in self.handles for r in h.kill()]
            deadline = time.time() + 10
            if gone:
                self.ray.wait(gone, num_returns=len(gone), timeout=10)
            wait_exited(self.ray, processes, deadline)

    def _flush_metrics(self) -> None:
        """On a cluster that outlives this driver, the replicas record their last metrics and everyone
        waits one export interval, so Ray exports them before the processes exit (`dgbatch.metrics`)."""
        from dgbatch.metrics import export_interval_s

        refs = [r for r in (h.flush_metrics() for h in self.handles) if r is not None]
        if refs:  # a dead replica's call fails: it has nothing to flush
            self.ray.wait(refs, num_returns=len(refs), timeout=10)
        wait = export_interval_s() + 0.5
        log.info("waiting %.1f s for Ray to export the job's last metrics", wait)
        time.sleep(wait)

    def __enter__(self) -> ReplicaPool:  # noqa: PYI034 - py3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_exited(ray, processes: list[tuple[str, int]], deadline: float) -> None:
    """Ray has a killed actor dead before its process exits, and a thread of it can still write a whole
    commit in between (tests/test_signals.py saw one land after the driver counted): so the replicas'
    processes, (node id, pid), on this node are waited for. One on another node cannot be (Ray has no call
    for it); there the window is Ray's."""
    if not processes:
        return
    here = ray.get_runtime_context().get_node_id()
    pids = [pid for node, pid in processes if node == here]
    while pids and time.time() < deadline:
        pids = [pid for pid in pids if _running(pid)]
        if pids:
            time.sleep(0.05)
    if pids:
        log.warning("replica process(es) %s still ran after they were killed", ", ".join(map(str, pids)))


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie does not: it has exited, its parent has not reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): running, as far as can be told


class Background:
    """`fn()` on a thread; `result()` waits for it and returns its value or raises its exception."""

    def __init__(self, fn: Callable, name: str):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
