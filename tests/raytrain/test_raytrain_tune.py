"""Ray Train tier: a Ray Tune sweep of 2 tiny trials (train.lr) over the same TorchTrainer: both trials
finish, report to Tune and write ordinary run directories; the best one is picked by val_accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerpar.train.tune import sweep
from tests.raytrain.conftest import tiny

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_two_trial_sweep(local_ray, tmp_path):
    cfg = tiny("parallel.workers=1", "train.epochs=1", f"train.out_dir={tmp_path}")
    out = sweep(cfg, lrs=[1e-3, 3e-3], weight_decays=[0.05], concurrent=2, name="sweep")
    assert out["sweep_dir"] == str(tmp_path / "sweep")
    trials = out["trials"]
    assert sorted(t["params"]["train.lr"] for t in trials) == [1e-3, 3e-3]
    for t in trials:
        assert "error" not in t, t
        assert 0.0 <= t["val_accuracy"] <= 1.0 and t["steps"] == 4  # the final report reached Tune
    assert out["best"]["val_accuracy"] == max(t["val_accuracy"] for t in trials)
    runs = [p for p in (tmp_path / "sweep").iterdir() if (p / "result.json").is_file()]
    assert len(runs) == 2
    for run in runs:
        result = json.loads((run / "result.json").read_text())
        assert result["trainer"].startswith("ray.train.torch.TorchTrainer") and result["epochs"] == 1


def test_tune_cli_help_and_bad_input():
    help_ = subprocess.run([sys.executable, str(ROOT / "launch" / "tune.py"), "--help"],
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "train.lr x train.weight_decay" in help_.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "launch" / "tune.py"), "--config", "tiny",
                          "--set", "model.heads=3"],  # must divide model.dim (16)
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") \
        and len(bad.stderr.strip().splitlines()) == 1
