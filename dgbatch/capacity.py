"""What the Ray cluster can hold, for placing replicas.

Checked once Ray is up, before any replica is created: a replica that no node could ever hold (a GPU asked
for on a CPU cluster, an accelerator type no node has) fails the job at once, naming what each replica asks
for and what the nodes have, instead of waiting for resources that will never come. Where more nodes may
come (a cluster dgbatch joined: an autoscaler may add them) a replica waits for its resources, at most
`replicas.placement_timeout_s`, and then fails the job naming what is missing (`shortfall`).

Plain functions over resource dicts (`placeable`), and two that ask Ray (`node_shapes`, `shortfall`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dgbatch.config import JobConfig, ReplicasSection
from dgbatch.errors import JobError

log = logging.getLogger("dgbatch")

ACCELERATOR_PREFIX = "accelerator_type:"
CONFIG_KEYS = {"CPU": "replicas.num_cpus", "GPU": "replicas.num_gpus"}


class PlacementError(JobError):
    """No node can hold a replica (now, or within replicas.placement_timeout_s)."""


def replica_bundle(r: ReplicasSection) -> dict[str, float]:
    """The resources one replica actor (one rank of a parallel replica) asks for."""
    b = {"CPU": r.num_cpus, "GPU": r.num_gpus}
    if r.accelerator_type:
        b[f"{ACCELERATOR_PREFIX}{r.accelerator_type}"] = 0.001  # what Ray's accelerator_type option asks for
    return {k: v for k, v in b.items() if v}


@dataclass(frozen=True)
class Shape:
    """A node's total resources: a live node's, or a node type the autoscaler may add (`may_add`)."""

    label: str
    resources: dict
    may_add: bool = False


def fits(bundle: dict[str, float], resources: dict) -> bool:
    return all(resources.get(k, 0) >= v for k, v in bundle.items())


def placeable(bundle: dict[str, float], count: int, strategy: str, shapes: list[Shape]) -> bool:
    """Could `count` bundles (one replica's ranks) ever be placed with `strategy` on nodes of these shapes,
    with nothing else running? STRICT_PACK: all on one node; STRICT_SPREAD: each on its own node; PACK and
    SPREAD: anywhere, so each must fit some node and together they must fit the nodes."""
    if count == 1 or strategy in ("PACK", "SPREAD"):
        if not any(fits(bundle, s.resources) for s in shapes):
            return False
        if count == 1 or any(s.may_add and fits(bundle, s.resources) for s in shapes):
            return True
        room = sum(_how_many(bundle, s.resources) for s in shapes)
        return room >= count
    if strategy == "STRICT_PACK":
        return any(fits({k: v * count for k, v in bundle.items()}, s.resources) for s in shapes)
    # STRICT_SPREAD
    if any(s.may_add and fits(bundle, s.resources) for s in shapes):
        return True
    return sum(fits(bundle, s.resources) for s in shapes) >= count


def _how_many(bundle: dict[str, float], resources: dict) -> int:
    return int(min(resources.get(k, 0) // v for k, v in bundle.items())) if bundle else 1 << 30


def node_shapes(ray) -> list[Shape]:
    """The live nodes' totals, and the node types the cluster's autoscaler reports it may add (none where it
    reports nothing: a cluster without an autoscaler, or one whose autoscaler does not say)."""
    shapes = [Shape(n.get("NodeManagerAddress") or n.get("NodeID", "?")[:8], dict(n.get("Resources") or {}))
              for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state  # what Ray Data asks too (is_autoscaling_enabled)

        config = state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - an internal API: without it, only the live nodes are known
        log.debug("the autoscaler's node types could not be read (%s)", e)
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        if group.max_count != 0 and group.resources:
            shapes.append(Shape(f"node type {group.name!r} (autoscaler)", dict(group.resources), may_add=True))
    return shapes


def describe(resources: dict) -> str:
    """`{CPU: 2, GPU: 1, accelerator_type:H100: 1}`: the resources a replica can ask for, not memory or node ids."""
    keep = {k: v for k, v in resources.items() if k in CONFIG_KEYS or k.startswith(ACCELERATOR_PREFIX)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"


def _asked(cfg: JobConfig, bundle: dict[str, float]) -> str:
    world, p = cfg.parallel.world_size, cfg.parallel
    keys = [CONFIG_KEYS.get(k, "replicas.accelerator_type") for k in bundle]
    what = f"each replica asks for {describe(bundle)} ({', '.join(keys)})"
    if world > 1:
        what += f" per rank, {world} ranks placed {p.placement_strategy} (parallel.placement_strategy)"
    return what


def check_placeable(ray, cfg: JobConfig, may_grow: bool) -> None:
    """Raise PlacementError when no node of the cluster could ever hold one replica. `may_grow`: nodes may
    still join (a cluster dgbatch did not start): then only the autoscaler's node types can rule it out, and a
    replica that does not fit the nodes there now waits (`replicas.placement_timeout_s`); this says so."""
    bundle = replica_bundle(cfg.replicas)
    world, strategy = cfg.parallel.world_size, cfg.parallel.placement_strategy
    shapes = node_shapes(ray)
    if placeable(bundle, world, strategy, shapes):
        return
    nodes = [s for s in shapes if not s.may_add]
    have = "; ".join(f"{s.label} {describe(s.resources)}" for s in shapes) or "no live node"
    if may_grow and not any(s.may_add for s in shapes):
        log.warning("no node of the Ray cluster can hold a replica now: %s; its %d node(s) have: %s. Waiting for "
                    "nodes to join, at most %g s (replicas.placement_timeout_s)", _asked(cfg, bundle), len(nodes),
                    have, cfg.replicas.placement_timeout_s)
        return
    raise PlacementError(f"no node of the Ray cluster can hold a replica: {_asked(cfg, bundle)}, but its "
                         f"{len(nodes)} node(s) have: {have}. Lower those settings, or run on a cluster that has "
                         f"such nodes (ray.address)")


def shortfall(ray, cfg: JobConfig) -> str:
    """What one replica asks for against what the cluster has free now, for a replica that waited too long."""
    bundle = replica_bundle(cfg.replicas)
    try:
        free, total = ray.available_resources(), ray.cluster_resources()
    except Exception:  # noqa: BLE001 - the message still says what was asked for
        free, total = {}, {}
    missing = {k: v for k, v in bundle.items() if free.get(k, 0) < v * cfg.parallel.world_size}
    return (f"{_asked(cfg, bundle)}; free in the cluster now: {describe({k: free.get(k, 0) for k in bundle})} of "
            f"{describe({k: total.get(k, 0) for k in bundle})}; short of {', '.join(sorted(missing)) or 'nothing'} "
            "(other jobs or replicas hold them, or no node has them)")
