"""Ray Train tier: the docs/FAILURES.md drill by hand beside a training run. `launch/chaos.py --rank 1`
(a separate process, connected to the run's Ray cluster) finds rank 1 of a running tiny Ray Train run
-- a RayTrainWorker actor, not an engine's named worker -- and SIGKILLs exactly that process; Ray Train
restarts the group and the run finishes."""

from __future__ import annotations

import json
import os
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


def test_chaos_cli_kills_a_training_rank(local_ray, tmp_path):
    # Long enough that the drill (a new process that connects to Ray) finds the run still going on a
    # quiet machine and a busy one: the 90 s time budget, not the epochs, ends it (12 epochs take ~3 s).
    cfg = tiny("parallel.workers=2", "train.epochs=100000", "train.max_minutes=1.5",
               "data.synthetic_size=480", "train.max_failures=2")
    out: dict = {}
    # A name of its own: Ray Train's state actor keeps the records of every earlier run on this Ray
    # instance (other tests' runs, some of them named "run"), and the drill picks the run by name.
    name = f"chaos-{uuid.uuid4().hex[:8]}"
    run = threading.Thread(target=lambda: out.update(result=run_training(cfg, tmp_path / name,
                                                                          progress=False)))
    run.start()
    try:
        deadline, ranks = time.monotonic() + 300, []
        while len(ranks) < 2 and run.is_alive() and time.monotonic() < deadline:
            ranks = find_train_ranks(name)
            time.sleep(0.5)
        assert sorted(r["rank"] for r in ranks) == [0, 1], ranks
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
        run.join(600)
    result = out["result"]
    assert result["failures"] >= 1  # Ray Train saw the lost rank and restarted the group
    assert result["worker_pids"][1][0] == killed["killed_pid"]  # the process that was rank 1
    assert result["stopped_early"] and result["epochs"] >= 1  # the time budget ended it, after the restart
