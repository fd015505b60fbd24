"""The training sweep: a tiny run (float64, D = 1 and 2) writes its files, every system's weights after
its steps equal the single process's (layerpar 1x2 and 2x1, DDP), and the bytes each rank's
collectives counted are what the cost model's ring rules say for that layout; across a shaped link
the counted bytes are checked against the bytes the link measured (tc), an independent figure.

    .venv/bin/python -m pytest -q tests/bench/test_train_sweep.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerpar.bench.train_costmodel import ModelShape, ddp_traffic, mesh_traffic
from layerpar.bench.train_sweep import build, layouts_for
from layerpar.config import ConfigError

pytestmark = pytest.mark.ray


def test_tiny_training_sweep(tmp_path):
    # its own process: it starts a local Ray sized for the sweep, as launch/scale.py does
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "launch/scale.py", "--preset", "train-tiny", "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = Path(summary["run_dir"])
    for name in ("results.csv", "results.json", "report.md", "samples_by_devices.png",
                 "predicted_vs_measured.png"):
        assert (run_dir / name).stat().st_size > 0, name
    result = json.loads((run_dir / "results.json").read_text())
    rows, shape = result["rows"], ModelShape(**{k: v for k, v in result["shape"].items() if k != "params"})
    # one process also runs with half the branches and on half the rows: the cost model's calibration
    assert sorted(r["layout"] for r in rows if r.get("calibration")) == ["one-process@B/2",
                                                                          "one-process@N/2"]
    rows = [r for r in rows if not r.get("calibration")]
    assert {(r["system"], r["R"], r["W"], r["D"]) for r in rows} == {
        ("one-process", 1, 1, 1), ("layerpar", 1, 2, 2), ("layerpar", 2, 1, 2), ("ddp", 2, 1, 2)}
    for r in rows:
        # float64: the same algebra as the one process, to rounding
        assert r["max_weight_diff"] <= 1e-10, r
        assert r["step_ms"] > 0 and r["samples_per_s"] > 0
        assert r["compute_ms"] >= 0 and r["collectives_ms"] >= 0
        want = ddp_traffic(r["D"], shape) if r["system"] == "ddp" else mesh_traffic(r["R"], r["W"], shape)
        assert r["bytes"] == pytest.approx(want["bytes"], rel=1e-12), r
    one = next(r for r in rows if r["system"] == "one-process")
    assert one["bytes"] == 0 and one["collectives_ms"] == 0
    # 1x2 moves pooled rows, DDP every gradient
    by = {(r["system"], r["W"]): r["bytes"] for r in rows if r["D"] == 2}
    assert summary["bytes_ratio_ddp_over_layerpar"]["2"] == by["ddp", 1] / by["layerpar", 2] > 5
    report = (run_dir / "report.md").read_text()
    assert "## Cost model" in report and "Extrapolation to 64 devices" in report
    assert result["meta"]["link"] == {"skipped": "bench.link is empty"}


def test_layouts_and_settings():
    assert layouts_for(4, 8) == [(1, 4), (2, 2), (4, 1)]
    assert layouts_for(8, 4) == [(2, 4), (4, 2), (8, 1)]  # W <= N
    assert layouts_for(1, 8) == [(1, 1)]
    with pytest.raises(ConfigError, match="including 1"):
        build("train", ["bench.devices=[2,4]"])
    with pytest.raises(ConfigError, match="unknown key bench.nope"):
        build("train", ["bench.nope=1"])


@pytest.mark.dist
def test_training_systems_across_a_shaped_link(tmp_path):
    """What the sweep's slow-link part runs: layerpar 1x2, 2x1 and DDP on two ranks in two network
    namespaces (a 1 Gbit/s tbf veth), the group formed from the torchrun variables; rank 0 reports
    every rank's figures, and the bytes are the ring rules'."""
    from layerpar.bench import netns
    from layerpar.bench.train_sweep import shape_of

    if (reason := netns.available()) is not None:
        pytest.skip(reason)
    cfg, _ = build("train-tiny", [])
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cfg": cfg.to_dict(), "layouts": [[1, 2], [2, 1]], "ddp": True,
                                "warmup": 1, "rounds": 1, "steps": 2}))
    with netns.ShapedLink(rate="1gbit") as link:
        out = link.run_ranks([sys.executable, "-m", "layerpar.bench.train_systems", str(spec)],
                             timeout_s=240)
    ranks, shape = out[0]["ranks"], shape_of(cfg)
    assert [r["rank"] for r in ranks] == [0, 1] and out[1] == {"rank": 1}
    for r in ranks:
        assert all(r[k]["steps_taken"] == 3 for k in ("1x2", "2x1", "ddp", "ddp-compute"))
        # counted (the ring rules, as the comm layer and DDP's hook add them up) against measured
        # (what this rank's veth end sent, tc's counter): every counted byte must cross the wire, and
        # the wire adds at most 10% (TCP/IP + Ethernet headers: ~5% of a 1448-byte segment) plus
        # 2 KiB a step (acknowledgements, gloo's message headers, one barrier per round)
        for name, rule in (("1x2", mesh_traffic(1, 2, shape)), ("2x1", mesh_traffic(2, 1, shape)),
                           ("ddp", ddp_traffic(2, shape)), ("ddp-compute", {"bytes": 0.0})):
            counted, measured = r[name]["bytes"], r[name]["wire_bytes"]
            assert counted == rule["bytes"], (name, counted)
            assert counted <= measured <= 1.10 * counted + 2048, (name, counted, measured)
