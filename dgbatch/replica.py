"""A model replica: loads the model once, then runs whatever shards the driver hands it.

`Replica` is plain Python; the driver wraps it with `ray.remote`. Shards are pulled, never
pre-assigned, so a faster replica simply runs more of them.
"""

from __future__ import annotations

import logging
import os

from dgbatch.config import JobConfig

log = logging.getLogger(__name__)


def build_backend(cfg: JobConfig, model, params, pad_id: int, eos_ids: list[int]):
    if cfg.engine.backend == "engine":
        from dgbatch.engine import EngineBackend

        return EngineBackend(model, params, cfg.engine.batch_size, pad_id, eos_ids, compile=cfg.engine.compile)
    if cfg.engine.backend == "reference":
        from dgbatch.reference import ReferenceBackend

        return ReferenceBackend(model, params, cfg.engine.batch_size, pad_id, eos_ids)
    raise ValueError(f"unknown engine.backend {cfg.engine.backend!r}")


class Replica:
    def __init__(self, cfg: JobConfig, root: str, job_meta: dict):
        from dgbatch import checkpoint, redact
        from dgbatch.io.fs import filesystem
        from dgbatch.io.layout import Layout
        from dgbatch.shard import ShardRunner

        redact.install(cfg)
        self._apply_thread_limit()
        model_dir = checkpoint.local_checkpoint(cfg.model, cfg.storage)
        tokenizer = checkpoint.load_tokenizer(model_dir)
        params = checkpoint.resolve_sampling(model_dir, cfg.sampling)
        pad_id, eos_ids = checkpoint.special_ids(model_dir, tokenizer)
        model = checkpoint.load_model(model_dir, cfg.model)
        backend = build_backend(cfg, model, params, pad_id, eos_ids)
        fs, _ = filesystem(cfg.output.path, cfg.storage)
        self.runner = ShardRunner(backend, tokenizer, fs, Layout(root), eos_ids, job_meta, cfg.input.id_column)

    @staticmethod
    def _apply_thread_limit() -> None:
        # Ray sets OMP_NUM_THREADS to the actor's CPUs; torch reads it only at import, so apply it.
        n = os.environ.get("OMP_NUM_THREADS")
        if n and n.isdigit() and int(n) > 0:
            import torch

            torch.set_num_threads(int(n))

    def ready(self) -> bool:
        return True

    def run_shard(self, shard_id: str) -> dict:
        return self.runner.run(shard_id)
