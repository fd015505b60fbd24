"""Shared test fixtures, kept minimal. Tier-specific fixtures (local Ray, gloo groups) live beside
their tests."""

import os

import pytest

# test files start longest first under xdist (tests/suite_order.py says why)
from suite_order import pytest_collection_modifyitems, pytest_configure  # noqa: F401

# Ray listens on loopback only and its CLI clients send the auth token (docs/CLUSTER.md): set before
# any test imports ray, in this process and every process it starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray Train v2's controller polls its worker group every 2 s by default, and a tiny run spends most of
# its time waiting for those polls (a 5-batch run: 21 s -> 12.6 s at 0.25 s). Polls that have not
# answered are awaited at the next one, never failed, so a short interval cannot flake.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray starts its workers at niceness 15 unless told otherwise (parallel/cluster.py tells it for the
# embedded default; the tiers' fixtures call ray.init themselves). Beside two busy CPU loops of
# niceness 0, a niced worker got ~1/30 of a core: importing torch took over a minute and engine
# start-ups missed their 65 s limit. At niceness 0 the workers share the cores fairly.
os.environ.setdefault("RAY_worker_niceness", "0")
# The suite is CPU-bound on 2 cores (docs/TESTING.md, "Where the time goes"): a Ray Train run costs
# ~25 s of CPU however small its model, mostly processes Ray starts for it. Three of them, and two log
# writers, serve what no test reads: the preemption watcher (an actor polling node drain state), Ray
# Train's Prometheus metrics, its state actor (the dashboard's Train view; the two tests that read it
# ask for the `state_tracking` fixture) and its structured JSON logs. Off, a run takes ~3.5 s less CPU.
for _flag in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_METRICS_ENABLED",
              "RAY_TRAIN_ENABLE_STATE_TRACKING", "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING",
              "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING"):
    os.environ.setdefault(_flag, "0")


@pytest.fixture
def tiny_cfg():
    """The packaged `tiny` config: a 4-branch width-16 Para-Former on synthetic data, 1 thread."""
    from layerpar.config import load_config

    return load_config("tiny")


@pytest.fixture
def one_thread():
    """Workers run one torch thread; a reference model compared with them bit for bit must add its
    floats the same way."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
