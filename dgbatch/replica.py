"""Model replicas: load the model once, then run whatever shards the driver hands over.

- `Replica`: one actor, one device (tp_size = ep_size = 1).
- `ReplicaRank`: one rank of a tensor/expert-parallel replica (one actor per device, all in one
  placement group). Rank 0 hosts the rendezvous store and leads: it reads the shard, broadcasts its
  requests, and alone commits the output. Every rank runs the same `EngineBackend` on the same
  requests; all-reduced activations are identical everywhere and each row's randomness derives from
  (seed, row id, canvas, step), so every rank makes the same decisions. Before the commit the ranks
  compare digests of their generations (`LockstepError` if they differ).

Both are plain Python; the driver wraps them with `ray.remote`. Shards are pulled, never
pre-assigned, so a faster replica simply runs more of them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle

from dgbatch.config import JobConfig

log = logging.getLogger(__name__)


class LockstepError(RuntimeError):
    """The ranks of a replica produced different generations: they are out of step."""


class GroupStillInStep(RuntimeError):
    """The leader failed a shard outside its generation (reading or committing it): every rank has
    returned, so the group can take the next shard without being rebuilt."""


def batch_size(cfg: JobConfig, model, params) -> int:
    """`engine.batch_size`, or for 'auto' what the memory model fits on this replica's device."""
    if cfg.engine.batch_size != "auto":
        return cfg.engine.batch_size
    from dgbatch.engine.backend import auto_batch_size
    from dgbatch.reference import LOGITS_BUFFERS

    reference = cfg.engine.backend == "reference"
    return auto_batch_size(model, params, fp32_logits_buffers=LOGITS_BUFFERS if reference else 2)


def build_backend(cfg: JobConfig, model, params, pad_id: int, eos_ids: list[int], batch: int):
    if cfg.engine.backend == "engine":
        from dgbatch.engine import EngineBackend

        return EngineBackend(model, params, batch, pad_id, eos_ids, compile=cfg.engine.compile)
    if cfg.engine.backend == "reference":
        from dgbatch.reference import ReferenceBackend

        return ReferenceBackend(model, params, batch, pad_id, eos_ids)
    raise ValueError(f"unknown engine.backend {cfg.engine.backend!r}")


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

        torch.set_num_threads(int(n))


def _load(cfg: JobConfig, mesh=None):
    """(model, tokenizer, params, pad_id, eos_ids), the model sharded for `mesh` when given."""
    from dgbatch import checkpoint

    model_dir = checkpoint.local_checkpoint(cfg.model, cfg.storage)
    tokenizer = checkpoint.load_tokenizer(model_dir)
    params = checkpoint.resolve_sampling(model_dir, cfg.sampling)
    pad_id, eos_ids = checkpoint.special_ids(model_dir, tokenizer)
    model = checkpoint.load_model(model_dir, cfg.model, mesh)  # with a mesh: only this rank's slices are read
    return model, tokenizer, params, pad_id, eos_ids


def with_retries(stats: dict) -> dict:
    """A shard's stats for the driver, with this process's storage retries since its last result."""
    from dgbatch.io import retry

    return {**stats, "storage_retries": retry.drain()}


def _shard_runner(cfg: JobConfig, root: str, job_meta: dict, backend, tokenizer, eos_ids, isolate_rows: bool = True):
    from dgbatch import checkpoint
    from dgbatch.filters import OutputFilter
    from dgbatch.io.fs import filesystem
    from dgbatch.io.layout import Layout
    from dgbatch.planning.images import RowImages
    from dgbatch.shard import ShardRunner

    fs, _ = filesystem(cfg.output.path, cfg.storage)
    images = RowImages(cfg.input, cfg.storage, checkpoint.local_checkpoint(cfg.model, cfg.storage))
    return ShardRunner(backend, tokenizer, fs, Layout(root), eos_ids, job_meta, cfg.input.id_column, isolate_rows,
                       OutputFilter.of(cfg.output), images)


class Replica:
    def __init__(self, cfg: JobConfig, root: str, job_meta: dict):
        _actor_logging(cfg)
        _apply_thread_limit()
        model, tokenizer, params, pad_id, eos_ids = _load(cfg)
        batch = batch_size(cfg, model, params)
        log.info("%s backend, batch size %d%s", cfg.engine.backend, batch,
                 " (auto: from the memory model)" if cfg.engine.batch_size == "auto" else "")
        backend = build_backend(cfg, model, params, pad_id, eos_ids, batch)
        self.runner = _shard_runner(cfg, root, job_meta, backend, tokenizer, eos_ids)

    def ready(self) -> bool:
        return True

    def run_shard(self, shard_id: str) -> dict:
        return with_retries(self.runner.run(shard_id))


# ---- tensor / expert parallel replicas ------------------------------------------------------------


def generations_digest(gens) -> str:
    """What must agree across ranks: every row's tokens, forwards and finish reason."""
    rows = [(g.row_id, g.token_ids, g.num_decoder_forwards, g.finish_reason) for g in gens]
    return hashlib.sha256(pickle.dumps(rows)).hexdigest()


def check_lockstep(mesh, gens) -> None:
    digests = mesh.gather_objects(generations_digest(gens))
    if len(set(digests)) > 1:
        raise LockstepError(f"ranks of this replica generated different outputs (digests by rank: {digests})")


class _LeaderBackend:
    """The leader's side of a lockstep generation: broadcast the requests, generate, compare digests."""

    def __init__(self, backend, mesh):
        self.backend, self.mesh = backend, mesh
        self.released = False  # the followers have this shard's requests (or a None: nothing to do)
        self.generating = False

    def generate(self, requests):
        self.released = True
        self.generating = True
        self.mesh.broadcast_object(list(requests))
        gens = self.backend.generate(requests)
        check_lockstep(self.mesh, gens)
        self.generating = False
        return gens


class ReplicaRank:
    """One rank of a parallel replica. Lifecycle: `__init__` (cheap) -> rank 0's `rendezvous` ->
    every rank's `setup(address)` (joins the process group, loads and shards the model) -> `run_shard`
    on every rank at once, for each shard."""

    def __init__(self, cfg: JobConfig, root: str, job_meta: dict, rank: int):
        from dgbatch.parallel import ParallelDims

        _actor_logging(cfg)
        _apply_thread_limit()
        self.cfg, self.root, self.job_meta, self.rank = cfg, root, job_meta, rank
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

        p = self.cfg.parallel
        device = None
        if self.cfg.model.device != "cpu" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())  # Ray shows each rank its own GPU
            torch.cuda.set_device(device)
        backend = p.backend if p.backend != "auto" else default_backend(device or "cpu")
        store = self.store if self.rank == 0 else join_store(*address, self.dims.world, p.timeout_s)
        self.mesh = Mesh.init(self.dims, self.rank, store, backend, p.timeout_s, device)
        model, tokenizer, params, pad_id, eos_ids = _load(self.cfg, self.mesh)
        batch = min(self.mesh.gather_objects(batch_size(self.cfg, model, params)))  # ranks run in lockstep
        self.backend = build_backend(self.cfg, model, params, pad_id, eos_ids, batch)
        if self.mesh.is_leader:
            self.leader = _LeaderBackend(self.backend, self.mesh)
            self.runner = _shard_runner(self.cfg, self.root, self.job_meta, self.leader, tokenizer, eos_ids,
                                        isolate_rows=False)
        return {"rank": self.rank, "backend": backend, "device": str(next(model.parameters()).device),
                "batch_size": batch}

    def run_shard(self, shard_id: str) -> dict | None:
        """Every rank is called with the same shard; the leader's return value is the shard's stats."""
        return self._lead(shard_id) if self.mesh.is_leader else self._follow()

    def _lead(self, shard_id: str) -> dict:
        self.leader.released = self.leader.generating = False
        from dgbatch.io.fs import StorageUnavailable

        try:
            stats = self.runner.run(shard_id)
        except Exception as e:
            if self.leader.generating:  # mid-generation: the followers may be anywhere; rebuild the group
                raise
            if not self.leader.released:
                self.mesh.broadcast_object(None)
            if isinstance(e, StorageUnavailable):  # the job stops: the driver must see it as it is
                raise
            raise GroupStillInStep(f"{type(e).__name__}: {e}") from e
        if not self.leader.released:  # committed by an earlier attempt, or nothing to generate
            self.mesh.broadcast_object(None)
        return with_retries(stats)

    def _follow(self) -> None:
        requests = self.mesh.broadcast_object(None)  # None: the leader has nothing to generate
        if requests is not None:
            check_lockstep(self.mesh, self.backend.generate(requests) if requests else [])
