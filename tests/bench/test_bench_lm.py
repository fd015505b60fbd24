"""launch/bench_lm.py --quick as a real process: the quality study at a tiny size (the serial GPT, the
Para-Former LM joint and progressive, each trained by the loop for a few seconds) ends with its table
and one JSON line of the documented shape; bad arguments exit 2. No timing or quality is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "launch/bench_lm.py")


def test_bench_lm_quick_json_shape():
    proc = subprocess.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True, timeout=180,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["study"] == "lm_quality" and out["budget_s"] == 3.0 and len(out["loadavg"]) == 3
    assert [(r["kind"], r["mode"]) for r in out["rows"]] == [
        ("serial_lm", "joint"), ("paraformer_lm", "joint"), ("paraformer_lm", "progressive")]
    params = {r["params"] for r in out["rows"]}
    assert len(params) == 1  # equal parameters, by construction
    for r in out["rows"]:
        assert r["width"] == 16 and r["branch_depth"] == 1 and r["steps"] > 0 and 0 < r["val_bpb"] < 10
        assert len(r["val_prefix_bpb"]) == (2 if r["kind"] == "paraformer_lm" else 1)
        assert r["ratio_to_serial"] == round(r["val_bpb"] / out["rows"][0]["val_bpb"], 4)
    assert set(out["summary"]) >= {"joint_best_ratio", "progressive_best_ratio", "best_ratio",
                                   "within_target"}
    assert any(line.startswith("paraformer_lm progressive") for line in lines)  # the table


def test_bench_lm_bad_shapes_exit_2():
    proc = subprocess.run([sys.executable, SCRIPT, "--shapes", "4by1"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--shapes" in proc.stderr
