"""The peer benchmark (`launch/bench_serve.py --peers`) end to end, in its --quick form: layerpar's
one-process server and its no-op twin, each a real server process on 127.0.0.1 started and stopped by
PID, loaded over the Open Inference Protocol by tritonclient's gRPC client. Checks the JSON line's
shape (a `peers` object with `triton` and `ray_serve` entries, the layerpar rows with every level's
throughput, p50, p99 and server CPU per request), never the timings. Triton and Ray Serve are not run
here (Triton needs `make bench-peers-env`); their entries must say why they were skipped.

    .venv/bin/python -m pytest -q tests/bench/test_bench_peers.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc")

ROOT = Path(__file__).resolve().parents[2]
LEVELS = {"c1", "c8", "c32", "c8x8"}


def bench(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "bench_serve.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_quick_peers_run_reports_layerpar_and_noop_rows_with_cpu_per_request():
    done = bench("--peers", "--quick", "--config", "tiny", "--requests", "24",
                 "--servers", "layerpar,layerpar_noop")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert any(line.startswith("| layerpar | oip-grpc |") for line in lines)  # the markdown table
    peers = summary["peers"]
    assert {"triton", "ray_serve", "layerpar", "layerpar_noop", "layerpar_2x1"} <= set(peers)
    for name in ("triton", "ray_serve", "layerpar_2x1", "layerpar_ray_serve"):
        assert peers[name]["skipped"], name  # a reason, not a silent gap
    for name in ("layerpar", "layerpar_noop"):
        levels = peers[name]["levels"]
        assert set(levels) == LEVELS
        for key, row in levels.items():
            assert row["ok"] == 24 and row["errors"] == {}, (name, key, row)
            assert row["throughput_rps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
            assert row["server_cpu_ms_per_request"] is not None and row["server_cpu_ms_per_request"] >= 0
    assert levels["c8x8"]["images_per_request"] == 8 and levels["c32"]["clients"] == 32
    assert peers["layerpar"]["noop_row"] == "layerpar_noop"
    assert peers["layerpar"]["max_abs_logit_diff"] < 1e-4  # the server answers with the same model
    assert set(summary["targets"]) >= {"layerpar", "layerpar_2x1", "layerpar_ray_serve"}
    assert summary["machine"]["cpus"] >= 1 and len(summary["machine"]["loadavg"]) == 3


def test_unknown_server_name_is_one_sentence_and_exit_2():
    done = bench("--peers", "--quick", "--servers", "layerpar,tritonn", timeout=120)
    assert done.returncode == 2
    assert "unknown server 'tritonn'" in done.stderr and "Traceback" not in done.stderr
