"""Ray: placement groups, the branch-worker actor, and the engine that drives the workers."""

from layerpar.runtime.engine import ClusterError, Engine, WorkerError
from layerpar.runtime.placement import PlacementError

__all__ = ["ClusterError", "Engine", "PlacementError", "WorkerError"]
