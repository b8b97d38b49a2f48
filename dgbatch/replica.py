"""Model replicas: load the model once, then run whatever shards of whatever job the driver hands over.

- `Replica`: one actor, one device (tp_size = ep_size = 1).
- `ReplicaRank`: one rank of a tensor/expert-parallel replica (one actor per device, all in one
  placement group). Rank 0 hosts the rendezvous store and leads: it reads the shards, decides what
  enters the batch (the lockstep loop of `dgbatch.stream` broadcasts it), and alone commits. Every
  rank runs the same `EngineBackend` on the same requests in the same order; all-reduced activations
  are identical everywhere and each row's randomness derives from (seed, row id, canvas, step), so
  every rank makes the same decisions. Before a commit the ranks compare digests of the shard's
  generations (`LockstepError` if they differ).

Both are plain Python; `dgbatch.placement` wraps them with `ray.remote` as threaded actors. A shard
arrives with its job (`shard.JobContext`: output root, job metadata, sampling, longest prompt, the
input settings its rows' images need), so a replica serves any job of its model and engine settings;
several shards are in flight at once and stream through one engine (`dgbatch.stream`). Shards are
pulled, never pre-assigned, so a faster replica simply runs more of them.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import TYPE_CHECKING

from dgbatch.config import JobConfig
from dgbatch.generation import SamplingParams
from dgbatch.shard import JobContext
from dgbatch.stream import LockstepError, StreamBroken  # noqa: F401 - re-exported: what a replica raises

if TYPE_CHECKING:
    from dgbatch.metrics import ReplicaReporter
    from dgbatch.stream import ShardStream

log = logging.getLogger(__name__)

# What a replica imports before its model loads (~4.5 s of one core). A local Ray's workers import the same
# as they start (`pool.LOCAL_RAY_SYSTEM_CONFIG`), so there `_load` finds them imported.
REPLICA_IMPORTS = ("torch", "transformers.models.diffusion_gemma.modeling_diffusion_gemma")


class Backends:
    """Builds the replica's streaming backend for a job (`stream.BackendFactory`), from the loaded model."""

    def __init__(self, cfg: JobConfig, model, pad_id: int, eos_ids: list[int]):
        self.cfg, self.model, self.pad_id, self.eos_ids = cfg, model, pad_id, eos_ids

    def batch_size(self, params: SamplingParams, longest_prompt: int) -> int:
        from dgbatch.sizing import batch_size

        return batch_size(self.cfg.engine, self.model, params, longest_prompt)

    def build(self, params: SamplingParams, batch_size: int):
        if self.cfg.engine.backend == "engine":
            from dgbatch.engine import EngineBackend

            return EngineBackend(self.model, params, batch_size, self.pad_id, self.eos_ids,
                                 compile=self.cfg.engine.compile, share_prefixes=self.cfg.engine.share_prefixes)
        if self.cfg.engine.backend == "reference":
            from dgbatch.reference import ReferenceBackend
            from dgbatch.stream import BatchStream

            return BatchStream(ReferenceBackend(self.model, params, batch_size, self.pad_id, self.eos_ids))
        raise ValueError(f"unknown engine.backend {self.cfg.engine.backend!r}")


def _actor_logging(cfg: JobConfig) -> None:
    """dgbatch's INFO lines from this actor reach the driver's console (Ray forwards its stderr),
    scrubbed of the job's secrets."""
    from dgbatch import redact

    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dgbatch").setLevel(logging.INFO)
    redact.install(cfg)


def _apply_thread_limit() -> None:
    # Ray sets OMP_NUM_THREADS to the actor's CPUs; torch reads it only at import, so apply it.
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        import torch

        torch.set_num_threads(int(n))  # the loop thread started later uses it too


def _load(cfg: JobConfig, mesh=None, timings: dict | None = None):
    """(model, tokenizer, pad_id, eos_ids, model_dir), the model sharded for `mesh` when given. `timings` gets
    how long the imports (torch, transformers, the tokenizer) and the model load took."""
    timings = timings if timings is not None else {}
    t0 = time.time()
    for name in REPLICA_IMPORTS:  # timed here, apart from the model load
        importlib.import_module(name)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its carriage returns would land in the job's log

    from dgbatch import checkpoint

    model_dir = checkpoint.local_checkpoint(cfg.model, cfg.storage)
    tokenizer = checkpoint.load_tokenizer(model_dir)
    pad_id, eos_ids = checkpoint.special_ids(model_dir, tokenizer)
    _apply_thread_limit()
    timings["imports_s"] = round(time.time() - t0, 3)
    t1 = time.time()
    model = checkpoint.load_model(model_dir, cfg.model, mesh)  # with a mesh: only this rank's slices are read
    timings["model_load_s"] = round(time.time() - t1, 3)
    return model, tokenizer, pad_id, eos_ids, model_dir


def with_retries(stats: dict) -> dict:
    """A shard's stats for the driver, with this process's storage retries since its last result."""
    from dgbatch.io import retry

    return {**stats, "storage_retries": retry.drain()}


class Serving:
    """What the driver calls on a process that runs a replica's stream: a single-device replica, or the
    leader of a parallel one (whose shards every rank runs with it)."""

    stream: ShardStream
    reporter: ReplicaReporter
    timings: dict

    def run_shard(self, shard_id: str, job: JobContext) -> dict:
        """Run and commit one shard; its stats."""
        return with_retries(self.stream.run_shard(shard_id, job))

    def progress(self) -> dict[str, tuple[int, int]]:
        return self.stream.progress()

    def flush_metrics(self) -> None:
        """Record the metrics of what happened since the last report now (before the actor is killed)."""
        self.reporter.report()

    def stats(self) -> dict:
        return {**self.stream.stats.to_dict(), **self.timings}


class Replica(Serving):
    """A single-device replica: its model is loaded in `__init__` (as soon as the driver creates it)."""

    def __init__(self, cfg: JobConfig):
        self.timings = {"process_start": process_start(), "init_at": time.time()}
        _actor_logging(cfg)
        model, tokenizer, pad_id, eos_ids, model_dir = _load(cfg, timings=self.timings)
        self.stream = _stream(cfg, Backends(cfg, model, pad_id, eos_ids), tokenizer, eos_ids,
                              model_dir=model_dir).start()
        self.reporter = _reporter(self.stream)
        self.timings["ready_at"] = time.time()

    def ready(self) -> dict:
        """Start-up timings (the process start, when __init__ began and ended, imports and model load) and
        which process this is."""
        return {**self.timings, **this_process()}



def _reporter(stream):
    """The replica's metrics reporter, labelled with its actor's name (a parallel replica's: its group's)."""
    import ray

    from dgbatch.metrics import ReplicaReporter

    name = ray.get_runtime_context().get_actor_name() or f"pid-{os.getpid()}"
    return ReplicaReporter(stream, name.removesuffix("-rank0")).start()


def _stream(cfg: JobConfig, factory: Backends, tokenizer, eos_ids, **kwargs):
    from dgbatch.stream import ShardStream

    return ShardStream(factory, tokenizer, eos_ids, **kwargs)


def this_process() -> dict:
    """The node and pid of this process: the driver waits for it to exit before it counts the commits."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def process_start() -> float | None:
    """When this process started (time.time()), from /proc; None where that cannot be read."""
    from pathlib import Path

    try:
        ticks = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# ---- tensor / expert parallel replicas ------------------------------------------------------------


class ReplicaRank(Serving):
    """One rank of a parallel replica. Lifecycle: `__init__` (cheap) -> rank 0's `rendezvous` ->
    every rank's `setup(address)` (joins the process group, loads and shards the model; the leader
    starts its loop) -> every follower's `follow` (runs the loop until the group is torn down) ->
    `run_shard` on the leader, several at once."""

    def __init__(self, cfg: JobConfig, rank: int):
        from dgbatch.parallel import ParallelDims

        self.timings = {"process_start": process_start(), "init_at": time.time()}
        _actor_logging(cfg)
        self.cfg, self.rank = cfg, rank
        self.dims = ParallelDims(cfg.parallel.tp_size, cfg.parallel.ep_size)
        self.store = None
        self.mesh = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: host the rendezvous store on a free port of this node; returns (host, port)."""
        import ray

        from dgbatch.parallel.mesh import host_store

        host = ray.util.get_node_ip_address()
        self.store = host_store(host, self.dims.world, self.cfg.parallel.timeout_s)
        return host, self.store.port

    def setup(self, address: tuple[str, int]) -> dict:
        import torch

        from dgbatch.parallel.mesh import Mesh, default_backend, join_store
        from dgbatch.stream import MeshLockstep

        p = self.cfg.parallel
        device = None
        if self.cfg.model.device != "cpu" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())  # Ray shows each rank its own GPU
            torch.cuda.set_device(device)
        backend = p.backend if p.backend != "auto" else default_backend(device or "cpu")
        store = self.store if self.rank == 0 else join_store(*address, self.dims.world, p.timeout_s)
        self.mesh = Mesh.init(self.dims, self.rank, store, backend, p.timeout_s, device)
        model, tokenizer, pad_id, eos_ids, model_dir = _load(self.cfg, self.mesh, self.timings)
        # The ranks' collectives must never wait longer than the timeout: an idle leader ticks sooner.
        self.stream = _stream(self.cfg, Backends(self.cfg, model, pad_id, eos_ids), tokenizer, eos_ids,
                              lockstep=MeshLockstep(self.mesh), isolate_rows=False,
                              heartbeat_s=min(5.0, p.timeout_s / 4), model_dir=model_dir)
        if self.mesh.is_leader:
            self.stream.start()
            self.reporter = _reporter(self.stream)
        self.timings["ready_at"] = time.time()
        return {"rank": self.rank, "backend": backend, "device": str(next(model.parameters()).device),
                **self.timings, **this_process()}

    def follow(self) -> None:
        """A follower: the leader's loop, step for step, until the group is torn down."""
        self.stream.follow()

