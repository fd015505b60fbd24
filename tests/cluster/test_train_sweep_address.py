"""`launch/scale.py --preset train --address ...` joins the cluster it is pointed at (a `ray start --head`
on 127.0.0.1, stopped by pid): the run's figures name that cluster's GCS address, no local Ray is
started; an address nobody listens on is one error line and exit 2; asking for GPUs where the cluster
has none is one error line and exit 2 before any Ray Train group waits for them. The two cases that
need a cluster share one head (module_ray_head): one `ray start` instead of a head and a local Ray.

    .venv/bin/python -m pytest -q tests/cluster/test_train_sweep_address.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cluster_helpers import REPO, free_ports, last_json, ray_env, run, tail

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def scale_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "scale.py"), "--preset", "train-tiny", *args]


def test_gpus_asked_where_there_are_none(module_ray_head, tmp_path):
    # a GPU-less cluster (the head, on this machine): the sweep must refuse, not wait for GPUs forever
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    head = module_ray_head
    proc = run(scale_cmd("--address", head["gcs"], "--set", "parallel.gpus_per_worker=1",
                         "--out-dir", str(tmp_path / "runs")), env=head["env"], timeout_s=240)
    assert proc.returncode == 2, tail(proc.stdout)
    error = last_json(proc.stdout)["error"]
    assert error.startswith("parallel.gpus_per_worker=1 needs 2 GPUs for D = 2 ranks but the Ray "
                            f"cluster at {head['gcs']} has 0"), error
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_train_sweep_joins_the_given_cluster(module_ray_head):
    ray_head = module_ray_head
    out_dir = ray_head["root"] / "runs"
    # D = 1 only: one Ray Train group on the head proves the joining; the D = 2 systems and their
    # equality with the one process are tests/bench/test_train_sweep.py's, on a local Ray
    proc = run(scale_cmd("--address", ray_head["gcs"], "--set", "bench.devices=[1]",
                         "--out-dir", str(out_dir)), env=ray_head["env"], timeout_s=480)
    assert proc.returncode == 0, tail(proc.stdout)
    summary = last_json(proc.stdout)
    result = json.loads((Path(summary["run_dir"]) / "results.json").read_text())
    meta = result["meta"]
    # the driver joined the head's GCS, not a Ray of its own
    assert meta["address"] == ray_head["gcs"]
    assert meta["cluster"]["gcs_address"] == ray_head["gcs"]
    assert meta["cluster"]["resources"]["CPU"] == 3  # the head's --num-cpus, not this machine's
    rows = [r for r in result["rows"] if not r.get("calibration")]
    assert [r["system"] for r in rows] == ["one-process"] and all(r["backend"] == "gloo" for r in rows)


def test_unreachable_address_is_one_error_line(cluster_root):
    (port,) = free_ports(1)  # nothing listens there
    proc = run(scale_cmd("--address", f"127.0.0.1:{port}", "--out-dir", str(cluster_root / "runs")),
               env=ray_env(cluster_root), timeout_s=120)
    assert proc.returncode == 2, tail(proc.stdout)
    assert last_json(proc.stdout)["error"].startswith(f"cannot reach the Ray cluster at '127.0.0.1:{port}'")
    assert "Traceback" not in proc.stdout
    assert not (cluster_root / "runs").exists()

