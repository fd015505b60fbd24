"""Ray placement: one bundle per worker, strategy from config, and a clear refusal when the cluster
cannot fit the request."""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries it


class PlacementError(RuntimeError):
    """The cluster cannot place the requested workers."""


def worker_bundle(pcfg) -> dict[str, float]:
    bundle = {"CPU": float(pcfg.cpus_per_worker)}
    if pcfg.gpus_per_worker > 0:
        bundle["GPU"] = float(pcfg.gpus_per_worker)
    return bundle


def place_workers(pcfg, node_id: str | None = None) -> PlacementGroup:
    """Reserve one bundle per worker; raise PlacementError within parallel.placement_timeout_s.
    node_id: every bundle on that node (a replica group sent to its own node; Ray's node-id label)."""
    bundle = worker_bundle(pcfg)
    pin = [{NODE_ID_LABEL: node_id} for _ in range(pcfg.workers)] if node_id is not None else None
    pg = placement_group([dict(bundle) for _ in range(pcfg.workers)], strategy=pcfg.placement,
                         bundle_label_selector=pin)
    ready, _ = ray.wait([pg.ready()], timeout=pcfg.placement_timeout_s)
    if not ready:
        remove_placement_group(pg)
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        raise PlacementError(
            f"could not place {pcfg.workers} workers of {bundle} with strategy {pcfg.placement} "
            f"within {pcfg.placement_timeout_s:g}s; the cluster has {have} on {nodes} node(s). "
            "Lower parallel.workers / cpus_per_worker / gpus_per_worker, relax parallel.placement, "
            "or add nodes."
        )
    return pg


def current_group_bundles(pcfg) -> PlacementGroup:
    """The placement group this process runs in, for an engine whose workers take its bundles 1..W
    (parallel.placement_group `current`: a Ray Serve replica, in bundle 0 of its own group)."""
    pg = ray.util.get_current_placement_group()
    if pg is None:
        raise PlacementError("parallel.placement_group is 'current' but this process runs in no placement "
                             "group; use 'own', or create the engine inside a Ray Serve replica that has "
                             "placement_group_bundles")
    if len(pg.bundle_specs) < pcfg.workers + 1:
        raise PlacementError(f"the current placement group has {len(pg.bundle_specs)} bundles; "
                             f"{pcfg.workers} workers need {pcfg.workers + 1} (bundle 0 is the caller's)")
    return pg


def node_alive(node_id: str) -> bool:
    """Whether the Ray node with this id is in the cluster and alive."""
    return any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())


def bundle_strategy(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=True)


def release(pg: PlacementGroup | None) -> None:
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001 - the cluster may already be gone at teardown
            pass


def replica_nodes(pcfg, replicas: int) -> list[str | None]:
    """The node each replica group is pinned to: groups spread over the alive nodes that can hold a
    whole group, when there are several and the group itself packs on one node (PACK, STRICT_PACK);
    else None (each group placed by parallel.placement alone)."""
    if replicas < 2 or pcfg.placement not in ("PACK", "STRICT_PACK"):
        return [None] * replicas
    need = {k: v * pcfg.workers for k, v in worker_bundle(pcfg).items()}
    fits = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive")
                  and all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items()))
    if len(fits) < 2:
        return [None] * replicas
    return [fits[r % len(fits)] for r in range(replicas)]
