"""`ray job submit --working-dir . -- python launch/train.py ...` against a `ray start --head` cluster on
127.0.0.1: the job trains on the cluster's workers and its log ends with the run's JSON line.

    .venv/bin/python -m pytest -q tests/cluster/test_job_submit.py
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from cluster_helpers import RAY, last_json, run, tail

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

TRAIN_ARGS = ["--config", "digits", "--set", "train.epochs=1", "--set", "data.limit_train=256",
              "--set", "train.threads=1", "--set", "parallel.workers=2"]


def test_ray_job_submit_trains_on_the_cluster(ray_head):
    env, dashboard = ray_head["env"], ray_head["dashboard"]
    out_dir = ray_head["root"] / "runs"
    job_id = f"layerpar-test-{uuid.uuid4().hex[:8]}"
    submit = run([RAY, "job", "submit", "--address", dashboard, "--submission-id", job_id,
                  "--working-dir", ".", "--",
                  "python", "launch/train.py", *TRAIN_ARGS, "--out-dir", str(out_dir)],
                 env=env, timeout_s=180)
    assert submit.returncode == 0, f"ray job submit failed:\n{tail(submit.stdout)}"
    assert "succeeded" in submit.stdout.lower(), tail(submit.stdout)

    logs = run([RAY, "job", "logs", "--address", dashboard, job_id], env=env, timeout_s=60)
    assert logs.returncode == 0, tail(logs.stdout)
    summary = last_json(logs.stdout)
    assert summary["workers"] == 2 and len(summary["worker_nodes"]) == 2  # on the one node
    assert len(set(summary["worker_nodes"])) == 1
    assert summary["dataset"] == "digits" and summary["epochs"] == 1
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == out_dir and (run_dir / "result.json").is_file()

    # --working-dir uploaded the repository as the job's working directory, minus what .gitignore
    # names (the venv, runs/): Ray honours .gitignore (and .rayignore) when it packs a working_dir.
    unpacked = [p for p in ray_head["temp_dir"].glob(
        "session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert unpacked, "no unpacked working_dir under the head's session directory"
    assert (unpacked[0] / "launch" / "train.py").is_file()
    assert not (unpacked[0] / ".venv").exists() and not (unpacked[0] / "runs").exists()
