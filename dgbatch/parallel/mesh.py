"""The process groups of one replica: the whole world and the tp group of each rank.

`Mesh.init` joins `torch.distributed` through a TCPStore that rank 0 hosts (it binds a free port
itself, so there is no probe-then-bind race) and builds the groups; `Mesh.local` is a mesh without
processes, for planning, memory arithmetic and tests of the sharding math (its collectives are
no-ops, so a module then returns its rank's partial sum).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dgbatch.parallel.dims import ParallelDims


def host_store(host: str, world: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free port of `host` (read it back from `store.port`)."""
    return dist.TCPStore(host, 0, world, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def join_store(host: str, port: int, world: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, world, False, datetime.timedelta(seconds=timeout_s))


def default_backend(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class Mesh:
    dims: ParallelDims
    rank: int
    tp_group: object | None = None  # None: no processes (Mesh.local)
    world_group: object | None = None
    control_group: object | None = None  # gloo: object broadcasts and digests stay off the GPU
    backend: str | None = None
    _owned: bool = field(default=False, repr=False)

    @property
    def ep_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def tp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @staticmethod
    def local(dims: ParallelDims, rank: int = 0) -> Mesh:
        return Mesh(dims, rank)

    @staticmethod
    def init(
        dims: ParallelDims, rank: int, store: dist.Store, backend: str, timeout_s: float, device: torch.device | None = None
    ) -> Mesh:
        """Join the replica's process group (every rank calls this, with the same dims)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {"device_id": device} if backend == "nccl" and device is not None else {}
        dist.init_process_group(backend, store=store, rank=rank, world_size=dims.world, timeout=timeout, **kwargs)
        world = dist.group.WORLD
        control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else world
        tp_group = world if dims.tp == dims.world else None
        if tp_group is None:
            for e in range(dims.ep):  # every rank creates every group, in the same order
                g = dist.new_group(dims.tp_group_ranks(e), timeout=timeout)
                if e == dims.coords(rank)[0]:
                    tp_group = g
        return Mesh(dims, rank, tp_group, world, control, backend, _owned=True)

    def destroy(self) -> None:
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
            self._owned = False

    # ---- control messages (CPU, pickled objects) ----------------------------------------------

    def broadcast_object(self, obj=None):
        """The leader's `obj` on every rank."""
        if self.world_group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_group is None:
            return [obj]
        out = [None] * self.dims.world
        dist.all_gather_object(out, obj, group=self.control_group)
        return out
