"""`ray job submit --working-dir . -- python launch/train.py ...` against a `ray start --head` cluster on
127.0.0.1: the job trains on the cluster's workers, its log ends with the run's JSON line, and the model
it trained is the single-process model of the same config (float64, where the distributed algebra is
exact to rounding: same test accuracy, weights within 1e-10), well above chance.

    .venv/bin/python -m pytest -q tests/cluster/test_job_submit.py
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from cluster_helpers import RAY, last_json, run, tail, train_cmd

from layerpar.train.checkpoint import load_checkpoint, model_state

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

# The tiny synthetic config (4 branches, 4 classes, 16 steps) in float64: the single-process run
# reaches 0.59 test accuracy (chance: 0.25) in seconds.
TRAIN_ARGS = ["--config", "tiny", "--set", "train.epochs=4", "--set", "model.dtype=float64"]


def _weights(summary: dict) -> dict[str, torch.Tensor]:
    return model_state(load_checkpoint(summary["checkpoint"]))


def test_ray_job_submit_trains_on_the_cluster(ray_head):
    env, dashboard = ray_head["env"], ray_head["dashboard"]
    out_dir = ray_head["root"] / "runs"
    job_id = f"layerpar-test-{uuid.uuid4().hex[:8]}"
    submit = run([RAY, "job", "submit", "--address", dashboard, "--submission-id", job_id,
                  "--working-dir", ".", "--",
                  "python", "launch/train.py", *TRAIN_ARGS, "--set", "parallel.workers=2",
                  "--out-dir", str(out_dir)],
                 env=env, timeout_s=180)
    assert submit.returncode == 0, f"ray job submit failed:\n{tail(submit.stdout)}"
    assert "succeeded" in submit.stdout.lower(), tail(submit.stdout)

    logs = run([RAY, "job", "logs", "--address", dashboard, job_id], env=env, timeout_s=60)
    assert logs.returncode == 0, tail(logs.stdout)
    summary = last_json(logs.stdout)
    assert summary["workers"] == 2 and len(summary["worker_nodes"]) == 2  # on the one node
    assert len(set(summary["worker_nodes"])) == 1
    assert summary["dataset"] == "synthetic" and summary["epochs"] == 4
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == out_dir and (run_dir / "result.json").is_file()

    # the job trained the model one process trains from the same config
    single = run(train_cmd(*TRAIN_ARGS, "--set", "parallel.workers=0",
                           "--out-dir", str(ray_head["root"] / "runs-single")), env=env, timeout_s=120)
    assert single.returncode == 0, tail(single.stdout)
    alone = last_json(single.stdout)
    assert summary["steps"] == alone["steps"] == 16
    assert summary["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=1e-12)
    assert summary["test_accuracy"] >= 0.5  # trained: chance is 0.25 on 4 classes
    a, b = _weights(summary), _weights(alone)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")

    # --working-dir uploaded the repository as the job's working directory, minus what .gitignore
    # names (the venv, runs/): Ray honours .gitignore (and .rayignore) when it packs a working_dir.
    unpacked = [p for p in ray_head["temp_dir"].glob(
        "session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert unpacked, "no unpacked working_dir under the head's session directory"
    assert (unpacked[0] / "launch" / "train.py").is_file()
    assert not (unpacked[0] / ".venv").exists() and not (unpacked[0] / "runs").exists()
