"""The runtime's errors a caller handles: a worker was lost (every part raises it, runtime/faults.py
recovers from it), and an engine that is recovering and was asked not to wait (a replica set sends
the call elsewhere)."""


class WorkerError(RuntimeError):
    """A worker died or did not answer in time."""


class Recovering(WorkerError):
    """The engine is recovering a lost worker and the caller asked not to wait for it."""
