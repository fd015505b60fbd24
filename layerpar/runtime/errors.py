"""The runtime's error a caller handles: a worker was lost (every part raises it, runtime/faults.py
recovers from it)."""


class WorkerError(RuntimeError):
    """A worker died or did not answer in time."""
