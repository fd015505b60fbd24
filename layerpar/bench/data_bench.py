"""Streaming vs in-memory training data, measured (launch/bench_data.py is the command line).

Fashion-MNIST is written as an image folder of PNGs (python -m layerpar.data.make_folder: 70 k images)
and at 10x (--copies 10: 600 k training PNGs), cached under --work-dir and reused. Then three runs of
`launch/train.py` (one process, a world of one: the same loop every Ray Train rank runs), each a
subprocess whose process tree is sampled for memory:

    memory-1x     data.streaming=false on the 1x folder (every image decoded into the rank)
    stream-1x     data.streaming=true  on the 1x folder (Ray Data reads as it trains)
    stream-10x    data.streaming=true  on the 10x folder, the same number of steps

All three train the same number of steps (one epoch of the 1x training split, or --steps), same seeds:
at 1x streaming and in-memory draw the same batches and augmentation bit for bit, so their test
accuracies should agree. What is measured:
- peak RSS of the rank: the training process's own VmRSS (the rank: model, optimizer, its dataset
  in memory or its streaming catalog and plan), and its whole process tree's proportional set size
  (PSS, from /proc/PID/smaps_rollup: shared pages split between the processes that map them, so the
  Ray object store is counted once) -- the rank plus the local Ray it started (GCS, raylet, the Ray
  Data decode workers): everything this rank's data costs on its node. Sampled every 0.25 s.
- training samples/s: batch size / (data + step time per step), from the run's own phase clock
  (startup, loading, validation and checkpoints excluded).
- test accuracy of each run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WORK_DIR = "~/.cache/layerpar/bench_data"


def folder(work: Path, copies: int, limit: int) -> Path:
    """The Fashion-MNIST image folder at `copies`x (limit: the first `limit` training images), written
    once under `work` and reused."""
    name = f"fmnist-{copies}x" + (f"-limit{limit}" if limit else "")
    out = work / name
    if (out / "train").is_dir():
        return out
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "layerpar.data.make_folder", str(out), "--copies", str(copies)]
    if limit:
        cmd += ["--limit", str(limit)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip()
        raise RuntimeError(err.splitlines()[-1] if err else "make_folder failed")
    return out


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _field(path: str, key: str) -> int:
    """A kB field of a /proc file, in bytes (0 if the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples a process's VmRSS and its process tree's summed PSS until stopped; keeps the peaks."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.rank_peak = self.tree_peak = 0
        self.tree_size = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        kids, tree, todo = _children(), [], [self.pid]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo.extend(kids.get(p, []))
        self.rank_peak = max(self.rank_peak, _field(f"/proc/{self.pid}/status", "VmRSS:"))
        pss = sum(_field(f"/proc/{p}/smaps_rollup", "Pss:") for p in tree)
        if pss > self.tree_peak:
            self.tree_peak, self.tree_size = pss, len(tree)

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def train_run(name: str, root: Path, *, streaming: bool, limit: int, out: Path, sets: list[str],
              config: str) -> dict:
    """One launch/train.py run in a subprocess, its memory sampled; the run's result and figures."""
    args = ["data.name=folder", f"data.root={root}", f"data.streaming={str(streaming).lower()}",
            "train.epochs=1", f"data.limit_train={limit}", "train.max_minutes=0", "parallel.workers=0",
            *sets]
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", config, "--out-dir", str(out),
           "--quiet", *[a for s in args for a in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = TreeMemory(proc.pid)
    mem.start()
    stdout, stderr = proc.communicate()
    mem.stop()
    if proc.returncode != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"
        raise RuntimeError(f"{name}: {last}")
    result = json.loads(stdout.strip().splitlines()[-1])
    phase = result["phases"][0]
    batch = _batch(config, sets)
    per_step_ms = phase["data_ms"] + phase["step_ms"]
    return {"run": name, "streaming": streaming, "root": str(root), "steps": result["steps"],
            "samples_per_s": round(batch * 1e3 / per_step_ms, 1) if per_step_ms else None,
            "data_ms": round(phase["data_ms"], 2), "step_ms": round(phase["step_ms"], 2),
            "test_accuracy": result["test_accuracy"], "rank_peak_rss_mb": round(mem.rank_peak / 2**20, 1),
            "tree_peak_pss_mb": round(mem.tree_peak / 2**20, 1), "tree_processes": mem.tree_size,
            "wall_s": round(time.perf_counter() - t0, 1)}


def _batch(config: str, sets: list[str]) -> int:
    from layerpar.config import load_config

    return load_config(config, sets).train.batch_size


def train_rows(root: Path, config: str, sets: list[str]) -> int:
    """Training-split rows of a folder (the driver's check: a listing, no decoding)."""
    from layerpar.config import load_config
    from layerpar.data.streaming_catalog import check_dataset

    cfg = load_config(config, ["data.name=folder", f"data.root={root}", "data.streaming=true", *sets])
    return len(check_dataset(cfg).rows["train"])


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def run(*, work: Path, quick: bool, steps: int, config: str, sets: list[str], say) -> dict:
    """The three runs and the summary (see the module)."""
    limit = 600 if quick else 0
    if quick:
        sets = ["model.dim=32", "model.mlp_dim=64", "model.num_branches=2", "train.batch_size=64", *sets]
    load_start = loadavg()
    say(f"image folders under {work} (made once, then reused)")
    one, ten = folder(work, 1, limit), folder(work, 10, limit)
    rows = train_rows(one, config, sets)
    batch = _batch(config, sets)
    use = min(rows, steps * batch) if steps else rows  # the same steps for every run
    runs = []
    for name, root, streaming in (("memory-1x", one, False), ("stream-1x", one, True),
                                  ("stream-10x", ten, True)):
        say(f"{name}: training {-(-use // batch)} steps ...")
        runs.append(train_run(name, root, streaming=streaming, limit=use, out=work / "runs", sets=sets,
                              config=config))
    mem, s1, s10 = runs
    return {
        "bench": "data", "quick": quick, "config": config, "sets": sets, "train_rows_1x": rows,
        "train_rows_10x": train_rows(ten, config, sets), "steps": s1["steps"], "batch_size": batch,
        "runs": runs,
        "peak_rss_ratio_10x_over_1x": round(s10["tree_peak_pss_mb"] / s1["tree_peak_pss_mb"], 3),
        "rank_rss_ratio_10x_over_1x": round(s10["rank_peak_rss_mb"] / s1["rank_peak_rss_mb"], 3),
        "streaming_over_memory_samples_per_s": round(s1["samples_per_s"] / mem["samples_per_s"], 3),
        "test_accuracy_memory": mem["test_accuracy"], "test_accuracy_streaming": s1["test_accuracy"],
        "test_accuracy_diff": round(abs(mem["test_accuracy"] - s1["test_accuracy"]), 4),
        "measured": "peak_rss_ratio: the rank's process tree (rank + its local Ray: GCS, raylet, Ray Data "
                    "decode workers) summed PSS, 10x over 1x, streaming; rank_rss_ratio: the rank "
                    "process's own VmRSS; samples/s: batch / (data + step time) per step, from the "
                    "run's phase clock; accuracy: test split after the same steps, same seeds",
        "loadavg_start": load_start, "loadavg_end": loadavg(), "cpus": os.cpu_count(),
    }


def table(summary: dict) -> str:
    head = f"{'run':<11} {'steps':>5} {'samples/s':>10} {'data ms':>8} {'step ms':>8} {'rank RSS MB':>11} " \
           f"{'tree PSS MB':>11} {'procs':>5} {'test acc':>8}"
    lines = [head, "-" * len(head)]
    for r in summary["runs"]:
        lines.append(f"{r['run']:<11} {r['steps']:>5} {r['samples_per_s']:>10} {r['data_ms']:>8} "
                     f"{r['step_ms']:>8} {r['rank_peak_rss_mb']:>11} {r['tree_peak_pss_mb']:>11} "
                     f"{r['tree_processes']:>5} {r['test_accuracy']:>8.4f}")
    lines.append(f"peak memory 10x / 1x (streaming): tree {summary['peak_rss_ratio_10x_over_1x']}, rank "
                 f"{summary['rank_rss_ratio_10x_over_1x']}; samples/s streaming / in-memory at 1x: "
                 f"{summary['streaming_over_memory_samples_per_s']}; test accuracy diff "
                 f"{summary['test_accuracy_diff']}; load average {summary['loadavg_start']} -> "
                 f"{summary['loadavg_end']}")
    return "\n".join(lines)
