"""Ray Train tier: the README's Tune command as written (`launch/tune.py --config tiny --lr ...
--weight-decay ...`; tiny trains in one process, parallel.workers = 0) runs a 2-trial grid end to end:
one-process trials in their own Ray workers, each reporting to Tune and writing a run directory. And a
trial that reported nothing (Result.metrics None) still gets its row instead of a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray import tune

from layerpar.train.tune import trial_row

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_readme_tune_command_with_tiny(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "tune.py"), "--config", "tiny", "--lr", "1e-3,3e-3",
           "--weight-decay", "0.05", "--set", "train.epochs=1", "--out-dir", str(tmp_path)]
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local Ray, as on a laptop
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    trials = out["trials"]
    assert sorted(t["params"]["train.lr"] for t in trials) == [1e-3, 3e-3]
    for t in trials:
        assert "error" not in t, t
        assert 0.0 <= t["val_accuracy"] <= 1.0 and t["steps"] == 4  # the tiny train split, 32 rows a batch
        result = json.loads((Path(t["run_dir"]) / "result.json").read_text())
        assert result["trainer"] == "local" and result["epochs"] == 1
    assert out["best"]["val_accuracy"] == max(t["val_accuracy"] for t in trials)


def test_trial_without_metrics_gets_a_row(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"lr": 1e-3, "weight_decay": 0.05}))
    r = tune.Result(metrics=None, checkpoint=None, error=None, path=str(tmp_path))
    row = trial_row(r, tmp_path)
    assert row == {"params": {"train.lr": 1e-3, "train.weight_decay": 0.05}, "val_accuracy": None,
                   "test_accuracy": None, "steps": None, "run_dir": None}
