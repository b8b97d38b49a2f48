"""How replicas are placed on the Ray cluster, as the driver sees them.

- `SingleReplica`: one actor (tp_size = ep_size = 1), spread over the cluster's nodes (a node lost takes
  as few replicas with it as can be). Ray restarts it when it dies (max_restarts=-1), on any node with
  room; the driver probes it until it answers again.
- `ReplicaGroup`: tp_size x ep_size rank actors gang-scheduled in one placement group (one bundle
  per rank: replicas.num_cpus CPUs, replicas.num_gpus GPUs, the accelerator type). Ranks are never
  restarted one by one: a process group cannot take a new member, so any failure tears the whole
  group down (every actor and the placement group) and the driver starts a new one.

A handle's methods return object refs; the driver's loop waits on them.
"""

from __future__ import annotations

from dgbatch.config import JobConfig

NAMESPACE = "dgbatch"


class SingleReplica:
    restartable = True  # Ray brings the actor back; its calls fail meanwhile

    def __init__(self, ray, index: int, run_id: str, cfg: JobConfig, root: str, meta: dict):
        from dgbatch.replica import Replica

        r = cfg.replicas
        self.ray = ray
        self.name = f"replica-{index}-{run_id}"
        self.actor = ray.remote(Replica).options(
            name=self.name, num_cpus=r.num_cpus, num_gpus=r.num_gpus, accelerator_type=r.accelerator_type,
            max_restarts=-1, max_task_retries=0, namespace=NAMESPACE, scheduling_strategy="SPREAD",
        ).remote(cfg, root, meta)  # fmt: skip

    def start(self) -> list:
        return []  # calls queue behind the actor's __init__: usable at once

    def run(self, shard_id: str) -> list:
        return [self.actor.run_shard.remote(shard_id)]

    def probe(self) -> list:
        return [self.actor.ready.remote()]

    def kill(self) -> None:
        self.ray.kill(self.actor)


class ReplicaGroup:
    restartable = False

    def __init__(self, ray, index: int, run_id: str, cfg: JobConfig, root: str, meta: dict):
        from dgbatch.replica import ReplicaRank

        self.ray, self.index, self.run_id = ray, index, run_id
        self.cfg, self.root, self.meta = cfg, root, meta
        self.world = cfg.parallel.world_size
        self.cls = ray.remote(ReplicaRank)
        self.generation = 0
        self.actors: list = []
        self.pg = None

    @property
    def name(self) -> str:
        return f"replica-{self.index}-g{self.generation}-{self.run_id}"

    def bundle(self) -> dict[str, float]:
        r = self.cfg.replicas
        b = {"CPU": r.num_cpus, "GPU": r.num_gpus}
        if r.accelerator_type:
            b[f"accelerator_type:{r.accelerator_type}"] = 0.001  # what Ray's accelerator_type option asks for
        return {k: v for k, v in b.items() if v}

    def start(self) -> list:
        """A new placement group and rank actors; returns one setup ref per rank (ready when all are)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.generation += 1
        r = self.cfg.replicas
        self.pg = placement_group([self.bundle()] * self.world, strategy=self.cfg.parallel.placement_strategy,
                                  name=self.name)
        self.actors = [
            self.cls.options(
                name=f"{self.name}-rank{rank}", namespace=NAMESPACE, num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                max_restarts=0, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(self.cfg, self.root, self.meta, rank)
            for rank in range(self.world)
        ]  # fmt: skip
        address = self.actors[0].rendezvous.remote()  # resolved by Ray before any setup runs
        return [a.setup.remote(address) for a in self.actors]

    def run(self, shard_id: str) -> list:
        """Every rank runs the shard; the first ref (the leader's) carries its stats."""
        return [a.run_shard.remote(shard_id) for a in self.actors]

    def kill(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.actors, self.pg = [], None

    def describe(self) -> str:
        return (f"{self.world} ranks x {self.bundle()} ({self.cfg.parallel.placement_strategy}, "
                f"tp_size={self.cfg.parallel.tp_size}, ep_size={self.cfg.parallel.ep_size})")


def make_replicas(ray, cfg: JobConfig, root: str, meta: dict, run_id: str) -> list:
    cls = ReplicaGroup if cfg.parallel.world_size > 1 else SingleReplica
    return [cls(ray, i, run_id, cfg, root, meta) for i in range(cfg.replicas.num_replicas)]
