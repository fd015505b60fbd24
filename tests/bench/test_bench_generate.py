"""launch/bench_generate.py --quick as a real process: the streaming Generate server under 1 and 2
concurrent clients, ending with one JSON line of the documented shape (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "launch/bench_generate.py")


def test_bench_generate_quick_json_shape():
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--concurrency", "1", "2", "--rounds", "1",
                           "--max-tokens", "4"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bench"] == "generate" and out["quick"] is True and out["max_tokens"] == 4
    assert out["model"]["kind"] == "paraformer_lm" and out["model"]["params"] > 0
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2]
    for lv in out["levels"]:
        assert lv["errors"] == [] and lv["generations"] == lv["concurrency"]
        assert lv["tokens"] == 4 * lv["concurrency"] and lv["tokens_per_s"] > 0
        for key in ("ms_per_token_p50", "ms_per_token_p99", "ttft_ms_p50", "ttft_ms_p99", "wall_s"):
            assert lv[key] >= 0
        assert lv["ms_per_token_p99"] >= lv["ms_per_token_p50"] and lv["decode_calls"] >= 4
    assert len(out["machine"]["loadavg"]) == 3


def test_bench_generate_bad_input_exit_2():
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--rounds", "0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr
