"""Ray: placement groups, the branch-worker actor, the engine that drives the workers, and replica
groups of engines (ReplicaSet).

`from layerpar.runtime import Engine` imports Ray; `layerpar.runtime.backend` (the Backend protocol,
make_backend) does not, until a backend with workers is made.
"""

_LAZY = {"ClusterError": "layerpar.parallel.cluster", "Engine": "layerpar.runtime.engine",
         "WorkerError": "layerpar.runtime.errors", "PlacementError": "layerpar.runtime.placement",
         "ReplicaSet": "layerpar.runtime.replicas"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'layerpar.runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
