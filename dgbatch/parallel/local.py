"""Run a function on every rank of a replica as local processes (gloo on 127.0.0.1): for tests and
benchmarks on one machine. The parent hosts the rendezvous store on a free port, so nothing races
for it. Ray replica groups (`dgbatch.replica`) use the same `Mesh.init`, with rank 0 hosting it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dgbatch.parallel.dims import ParallelDims
from dgbatch.parallel.mesh import Mesh, host_store, join_store

HOST = "127.0.0.1"


def _rank_main(rank: int, fn: Callable, dims: ParallelDims, port: int, timeout_s: float, out: str, args: tuple):
    torch.set_num_threads(int(os.environ.get("DGBATCH_RANK_THREADS", "1")))
    mesh = Mesh.init(dims, rank, join_store(HOST, port, dims.world, timeout_s), "gloo", timeout_s)
    try:
        result = fn(mesh, *args)
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
        dist.barrier(group=mesh.world_group)  # no rank tears its sockets down while another still uses them
    finally:
        mesh.destroy()


def run_local(fn: Callable, dims: ParallelDims, *args, timeout_s: float = 120.0) -> list:
    """fn(mesh, *args) on each of dims.world spawned processes; returns their results in rank order.

    fn must be importable (a module-level function); a rank that raises fails the call."""
    store = host_store(HOST, dims.world, timeout_s)
    with tempfile.TemporaryDirectory(prefix="dgbatch-ranks-") as out:
        mp.start_processes(
            _rank_main, (fn, dims, store.port, timeout_s, out, args), nprocs=dims.world, join=True, start_method="spawn"
        )
        return [pickle.loads(Path(out, f"rank{r}.pkl").read_bytes()) for r in range(dims.world)]
