"""Load benchmark of the gRPC server: dynamic batching vs a plain single-process server, same model.

    python launch/bench_serve.py --config digits --set parallel.workers=0 --requests 2000
    python launch/bench_serve.py --checkpoint runs/<run> --concurrency 1,8,32 --requests 3000
    python launch/bench_serve.py --config digits --requests 2000         # batched server on 2 Ray workers
    python launch/bench_serve.py --config tiny --requests 200 --concurrency 1,8    # a quick smoke run

Both servers run as their own processes on 127.0.0.1 and load the same weights (the checkpoint, or the
config's seeded init); the closed-loop clients run in this process. The baseline answers each request
with one forward pass in its own process (a thread pool, no batching, no Ray); the batched server is
`launch/serve.py` on whatever backend the config picks. For each server and concurrency C: throughput,
p50/p95/p99 latency and, for the batched server, the batch-size histogram scraped from its metrics.
Target: at C=32 the batched server has >= 3x the baseline's throughput with p99 under 4x its unloaded
(C=1) p50. Progress and a table go to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from layerpar.serve.client import Client
from layerpar.serve.loadgen import batch_histogram, histogram_delta, run_load

ROOT = Path(__file__).resolve().parents[1]
ADDRESS = re.compile(r"on (\S+:\d+)(?:\s+metrics (\S+))?")


def start_server(cmd: list[str]) -> tuple[subprocess.Popen, str, str | None]:
    """Start a server process; wait for its "serving ... on HOST:PORT" line."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if m := ADDRESS.search(line):
            return proc, m.group(1), m.group(2)
    proc.wait()
    raise SystemExit(f"server did not start: {' '.join(cmd)} (exit code {proc.returncode})")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint or RUN_DIR served by both servers")
    ap.add_argument("--config", help="config (when no checkpoint, or to replace the checkpoint's)")
    ap.add_argument("--set", action="append", default=[], help="config override for both servers")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,32", help="comma-separated client counts")
    ap.add_argument("--rows", type=int, default=1, help="images per request")
    ap.add_argument("--baseline-threads", type=int, default=32, help="handler threads of the baseline")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    source = (["--checkpoint", args.checkpoint] if args.checkpoint else []) + \
             (["--config", args.config] if args.config else [])
    sets = [a for s in args.set for a in ("--set", s)]
    commands = {
        "baseline": [sys.executable, "-m", "layerpar.serve.baseline", *source, *sets, "--port", "0",
                     "--threads", str(args.baseline_threads)],
        "batched": [sys.executable, str(ROOT / "launch/serve.py"), *source, *sets, "--port", "0",
                    "--metrics-port", "0"],
    }
    results: dict[str, dict] = {}
    info = {}
    for kind, cmd in commands.items():
        print(f"[{kind}] starting: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        proc, address, metrics_url = start_server(cmd)
        try:
            with Client(address) as client:
                if kind == "batched":
                    client.wait_ready(300)
                info = client.model_info()
            x = np.random.default_rng(0).standard_normal((args.rows, *info["input_shape"]), np.float32)
            run_load(address, x, concurrency=max(levels), requests=min(500, args.requests))  # warm-up
            results[kind] = {}
            for c in levels:
                before = batch_histogram(metrics_url) if metrics_url else None
                r = run_load(address, x, concurrency=c, requests=args.requests)
                if metrics_url:
                    r["batches"] = histogram_delta(before, batch_histogram(metrics_url))
                results[kind][str(c)] = r
                print(f"[{kind}] C={c:3d}: {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  "
                      f"p95 {r['p95_ms']:7.2f}  p99 {r['p99_ms']:7.2f}  errors {r['errors']}"
                      + (f"  mean batch {r['batches']['mean_batch_rows']}" if metrics_url else ""),
                      file=sys.stderr, flush=True)
        finally:
            stop_server(proc)

    top = str(max(levels))
    base, batched = results["baseline"], results["batched"]
    summary = {
        "model": {k: info.get(k) for k in ("model_kind", "num_branches", "workers", "transport", "params",
                                           "input_shape", "checkpoint_id")},
        "requests": args.requests, "rows_per_request": args.rows, "concurrency": levels,
        "results": results,
        f"speedup_c{top}": round(batched[top]["throughput_rps"] / base[top]["throughput_rps"], 2),
    }
    if "1" in batched:
        ratio = batched[top]["p99_ms"] / batched["1"]["p50_ms"]
        summary[f"p99_c{top}_over_unloaded_p50"] = round(ratio, 2)
        summary[f"p99_c{top}_over_baseline_unloaded_p50"] = round(
            batched[top]["p99_ms"] / base["1"]["p50_ms"], 2)
        summary["target_met"] = summary[f"speedup_c{top}"] >= 3 and ratio < 4
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
