"""The LM decoding study (layerpar/bench/lm_scale.py) in its quick mode: `launch/scale.py --preset
lm-tiny` runs the depth pair on a real local Ray (its own process) and ends with one JSON line holding
decode_depth_ratio; every point's greedy tokens equal one process's. Bad settings exit 2 at once.

    .venv/bin/python -m pytest -q tests/bench/test_scale_lm.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerpar.bench.lm_scale import build
from layerpar.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _scale(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/scale.py", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.ray
def test_lm_tiny_ends_with_the_depth_ratio(tmp_path):
    proc = _scale("--preset", "lm-tiny", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("decode_depth_ratio", "serial_depth_ratio"):
        assert isinstance(summary[key], float) and summary[key] > 0, (key, summary)
    assert summary["tokens_match"] is True
    run_dir = Path(summary["run_dir"])
    result = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "report.md").stat().st_size > 0 and (run_dir / "results.csv").stat().st_size > 0
    rows = {(r["system"], r["N"], r["W"]) for r in result["rows"]}
    assert {("paraformer-workers", 1, 1), ("paraformer-workers", 2, 2), ("serial-1proc", 1, 1),
            ("serial-1proc", 2, 1), ("paraformer-1proc", 1, 1), ("paraformer-1proc", 2, 1)} <= rows
    assert all(r["tokens_match"] for r in result["rows"])
    pair = {(r["system"], r["N"], r["W"]): r for r in result["rows"] if r["depth_pair"]}
    ratio = pair[("paraformer-workers", 2, 2)]["p50_ms"] / pair[("paraformer-workers", 1, 1)]["p50_ms"]
    assert abs(ratio - summary["decode_depth_ratio"]) < 1e-3
    assert set(result["cost_model"]["hop_ms"]) == {"1", "2"}
    assert all("predicted_ms" in r for r in result["rows"])


@pytest.mark.parametrize("sets, words", [
    (["bench.tokens=1000"], "must fit bench.context"),
    (["bench.nope=1"], "unknown key bench.nope"),
    (["bench.systems=[warp]"], "unknown 'warp'"),
    (["bench.heads=5"], "multiple of heads"),
    (["bench.workers=[0]"], "positive integers"),
])
def test_lm_bad_settings_are_config_errors(sets, words):
    with pytest.raises(ConfigError, match=words):
        build("lm-tiny", sets)


def test_lm_bad_setting_exits_2_with_nothing_written(tmp_path):
    proc = _scale("--preset", "lm-tiny", "--out-dir", str(tmp_path), "--set", "bench.tokens=1000",
                  timeout=120)
    assert proc.returncode == 2
    assert "must fit bench.context" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written
