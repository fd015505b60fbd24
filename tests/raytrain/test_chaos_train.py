"""Ray Train tier: the docs/FAILURES.md drill by hand beside a training run. `launch/chaos.py --rank 1`
(a separate process, connected to the run's Ray cluster) finds rank 1 of a running tiny Ray Train run
-- a RayTrainWorker actor, not an engine's named worker -- and SIGKILLs exactly that process; Ray Train
restarts the group and the run finishes.

Event-driven, not budget-driven: once the run has trained an epoch, the test SIGSTOPs both ranks, so the
run is still there however long the drill takes to start and connect (the drill reads Ray Train's state
actor, which is not stopped, and SIGKILL ends a stopped process; Ray Train's health check waits 10 min
for a worker that does not answer, longer than the drill's 300 s); rank 0 goes on after the kill. The run
then ends by its epochs, a few seconds after the restart, not by a time budget long enough for a slow
drill (which the restarted attempt spent again in full: 116 s on a quiet machine, 145 s under load)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray

from layerpar.runtime.chaos import find_train_ranks
from layerpar.train.loop import run_training
from tests.raytrain.conftest import tiny

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


EPOCHS = 24  # ~6 s of training on a quiet machine: the run cannot end between its first epoch and the stop


def stop_ranks(ranks: list[dict], sig: int) -> None:
    for r in ranks:
        try:
            os.kill(r["pid"], sig)
        except ProcessLookupError:  # the killed rank
            pass


def test_chaos_cli_kills_a_training_rank(local_ray, state_tracking, tmp_path):
    cfg = tiny("parallel.workers=2", f"train.epochs={EPOCHS}", "data.synthetic_size=480",
               "train.max_failures=2")
    out: dict = {}
    # A name of its own: Ray Train's state actor keeps the records of every earlier run on this Ray
    # instance (other tests' runs, some of them named "run"), and the drill picks the run by name.
    name = f"chaos-{uuid.uuid4().hex[:8]}"
    metrics = tmp_path / name / "metrics.jsonl"
    run = threading.Thread(target=lambda: out.update(result=run_training(cfg, tmp_path / name,
                                                                          progress=False)))
    run.start()
    ranks: list[dict] = []
    try:
        # the run is training (an epoch recorded) and both ranks are known: stop them there
        deadline = time.monotonic() + 300
        while run.is_alive() and time.monotonic() < deadline:
            if metrics.is_file() and metrics.read_text().strip():
                ranks = find_train_ranks(name)
                if len(ranks) == 2:
                    break
            time.sleep(0.1)
        assert sorted(r["rank"] for r in ranks) == [0, 1], (ranks, run.is_alive())
        stop_ranks(ranks, signal.SIGSTOP)
        assert find_train_ranks(name) == ranks, "the run ended before the drill"
        address = ray.get_runtime_context().gcs_address
        drill = subprocess.run([sys.executable, str(ROOT / "launch" / "chaos.py"), "--rank", "1",
                                "--engine", f"train-{name}", "--address", address],
                               capture_output=True, text=True, timeout=300, cwd=ROOT,
                               env={**os.environ, "RAY_ADDRESS": ""})
        assert drill.returncode == 0, drill.stderr[-2000:]
        killed = json.loads(drill.stdout.strip().splitlines()[-1])
        assert killed["rank"] == 1 and killed["signal"] == "SIGKILL"
        assert killed["killed_pid"] == next(r["pid"] for r in ranks if r["rank"] == 1)
    finally:
        stop_ranks(ranks, signal.SIGCONT)  # rank 0 goes on (and finds its peer gone)
        run.join(600)
    result = out["result"]
    assert result["failures"] >= 1  # Ray Train saw the lost rank and restarted the group
    assert result["worker_pids"][1][0] == killed["killed_pid"]  # the process that was rank 1
    assert result["worker_pids"][1][-1] != killed["killed_pid"]  # a new rank 1 finished the run
    assert result["epochs"] == EPOCHS and not result["stopped_early"]  # every epoch, after the restart
