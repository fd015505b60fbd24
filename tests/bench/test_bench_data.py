"""launch/bench_data.py --quick: the streaming-vs-in-memory benchmark runs end to end on 600
Fashion-MNIST images (1x and 10x image folders made by make_folder) and ends with its JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerpar.data.sources import FASHION_ROOT

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path(FASHION_ROOT).is_dir(), reason="needs dataset-fashion-mnist (make datasets)")
def test_quick_bench_data_ends_with_its_json_line(tmp_path):
    proc = subprocess.run([sys.executable, "launch/bench_data.py", "--quick", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("peak_rss_ratio_10x_over_1x", "rank_rss_ratio_10x_over_1x",
                "streaming_over_memory_samples_per_s", "test_accuracy_memory", "test_accuracy_streaming",
                "measured", "loadavg_start", "loadavg_end"):
        assert key in summary, key
    assert summary["peak_rss_ratio_10x_over_1x"] > 0 and summary["streaming_over_memory_samples_per_s"] > 0
    # 10 copies of every training image (each split's validation share is held out of its own)
    assert 9.9 * summary["train_rows_1x"] < summary["train_rows_10x"] < 10.1 * summary["train_rows_1x"]
    runs = {r["run"]: r for r in summary["runs"]}
    assert set(runs) == {"memory-1x", "stream-1x", "stream-10x"}
    assert len({r["steps"] for r in runs.values()}) == 1  # the same steps in every run
    # same seeds, same batches and augmentation: the streamed run tests as the in-memory one does
    assert summary["test_accuracy_streaming"] == summary["test_accuracy_memory"]
    assert (tmp_path / "fmnist-10x-limit600" / "train").is_dir()  # cached for the next run
