"""Load benchmark of the gRPC server: replica groups and dispatch-on-idle batching against a plain
single-process server, same model, in one run.

    python launch/bench_serve.py --config digits --requests 3000 --concurrency 1,8,32 --layouts 1x2,2x1
    python launch/bench_serve.py --checkpoint runs/<run> --layouts 1x2,2x1 --kill --slo
    python launch/bench_serve.py --config tiny --requests 200 --concurrency 1,8     # a quick smoke run

Every server runs as its own process on 127.0.0.1 and loads the same weights (the checkpoint, or the
config's seeded init); the clients run in this process. The baseline answers each request with one
forward pass in its own process (a thread pool, no batching, no Ray); each layout RxW is
`launch/serve.py` with R replica groups of W Ray workers (parallel.replicas, parallel.workers). For
each server and concurrency C (closed-loop clients): throughput, p50/p95/p99 and the batch sizes.

--kill: on the first layout with R >= 2, at C = 8: the steady-state p99, then a SIGKILL of one of the
server's branch workers (a process this run started) and the p99 of the requests sent between the
kill and the moment every group is whole again (the server's layerpar_replica_ready metrics).
--slo: the same layout, requests of --slo-rows test-split images: its unloaded p50 and its capacity
(C = 32), then an open-loop load of 2x that capacity, first without a target, then with
serve.latency_slo_ms at 3x the unloaded p50: the share of replies within the target, the mean branches
used and the accuracy of those replies beside the full model's on the same images (use a
progressively trained checkpoint: every prefix is then a classifier).
Progress and a table go to stderr; the last stdout line is one JSON object.

--peers: the peer benchmark instead (layerpar/bench/peers.py): the same trained model (--checkpoint;
none: a digits model is trained first, in one process) served by layerpar in one process and as 2
replica groups x 1 worker, layerpar's Ray Serve deployment, a plain Ray Serve deployment with
@serve.batch, and Triton (nvidia-pytriton, `make bench-peers-env`), each beside a no-op server of its
protocol; C = 1, 8, 32 of 1-image and C = 8 of 8-image requests: throughput, p50, p99 and the server
process tree's CPU per request. Prints a markdown table, then one JSON line whose `peers` object has an
entry per server (`triton`, `ray_serve`, `layerpar`, ...). --quick: 60 requests per level, and fresh
weights unless --checkpoint is given; --servers picks some of them.

    python launch/bench_serve.py --peers --checkpoint runs/<run>
    python launch/bench_serve.py --peers --quick --servers layerpar,layerpar_noop
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from layerpar.bench.peers import SERVERS as PEER_SERVERS
from layerpar.serve.client import Client
from layerpar.serve.loadgen import batch_histogram, histogram_delta, percentiles, run_load, run_open_loop

ROOT = Path(__file__).resolve().parents[1]
ADDRESS = re.compile(r"on (\S+:\d+)(?:\s+metrics (\S+))?")
READY = re.compile(r'^layerpar_replica_ready\{replica="(\d+)"\} (\S+)$', re.M)


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


def branch_workers(root_pid: int) -> list[int]:
    """Pids of the branch worker processes under root_pid (the server this run started)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root_pid]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                if b"ray::BranchWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
    return sorted(found)


def replicas_whole(metrics_url: str) -> bool:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    ready = READY.findall(text)
    return bool(ready) and all(float(v) == 1.0 for _, v in ready)


def closed_loop(kind: str, address: str, metrics_url: str | None, x, levels, requests) -> dict:
    run_load(address, x, concurrency=max(levels), requests=min(500, requests))  # warm-up
    results = {}
    for c in levels:
        before = batch_histogram(metrics_url) if metrics_url else None
        r = run_load(address, x, concurrency=c, requests=requests)
        if metrics_url:
            r["batches"] = histogram_delta(before, batch_histogram(metrics_url))
        results[str(c)] = r
        print(f"[{kind}] C={c:3d}: {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  "
              f"p95 {r['p95_ms']:7.2f}  p99 {r['p99_ms']:7.2f}  errors {r['errors']}"
              + (f"  mean batch {r['batches']['mean_batch_rows']}" if metrics_url else ""),
              file=sys.stderr, flush=True)
    return results


def kill_phase(proc, address: str, metrics_url: str, x, requests: int) -> dict:
    """C = 8: steady p99, then the p99 of requests sent between a worker's SIGKILL and recovery."""
    steady = run_load(address, x, concurrency=8, requests=requests)
    pids = branch_workers(proc.pid)
    if not pids:
        return {"error": "no branch worker process found under the server"}
    window: dict[str, float] = {}

    def killer() -> None:
        time.sleep(0.5)
        window["kill"] = time.monotonic()
        os.kill(pids[-1], signal.SIGKILL)
        end = time.monotonic() + 60
        while replicas_whole(metrics_url) and time.monotonic() < end:  # until the loss is seen
            time.sleep(0.02)
        while not replicas_whole(metrics_url):  # and until the group is back
            time.sleep(0.05)
        window["whole"] = time.monotonic()

    t = threading.Thread(target=killer)
    t.start()
    out = {"steady": {k: steady[k] for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")}}
    samples, errors = [], {}
    while t.is_alive() or not samples:  # load until the killed group is whole again
        r = run_load(address, x, concurrency=8, requests=400, record=True)
        samples += r["samples"]
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    t.join()
    inside = [lat for sent, lat in samples if window["kill"] <= sent <= window["whole"]]
    out["recovery"] = {"seconds": round(window["whole"] - window["kill"], 2), "requests": len(inside),
                       "errors": errors, "killed_pid": pids[-1], **percentiles(inside)}
    out["p99_recovery_over_steady"] = round(out["recovery"]["p99_ms"] / steady["p99_ms"], 2) \
        if inside else None
    print(f"[kill] steady p99 {steady['p99_ms']:.2f} ms; recovery window {out['recovery']['seconds']} s, "
          f"{len(inside)} requests, p99 {out['recovery']['p99_ms']} ms, errors {errors}",
          file=sys.stderr, flush=True)
    return out


def slo_phase(cmd: list[str], args) -> dict:
    """The latency target at 3x the unloaded p50, offered 2x capacity, on test-split images: requests
    of --slo-rows images, so that the engine (which a prefix makes cheaper), not the gRPC front end
    (which it does not), is what the load saturates. The same load without the target beside it."""
    from layerpar.data import load_dataset
    from layerpar.serve.launcher import resolve

    cfg = resolve(argparse.Namespace(checkpoint=args.checkpoint, config=args.config, set=args.set,
                                     host=None, port=None, metrics_port=None))[0]
    test = load_dataset(cfg).test
    xs, ys, rows = test.x.numpy(), test.y.numpy(), args.slo_rows
    out: dict = {"rows_per_request": rows}
    proc, address, _ = start_server(cmd)
    try:
        with Client(address) as client:
            client.wait_ready(300)
            full = np.concatenate([client.predict(xs[j: j + 64]).predicted for j in range(0, len(xs), 64)])
        x = xs[:rows]
        run_load(address, x, concurrency=8, requests=200)  # warm-up
        unloaded = run_load(address, x, concurrency=1, requests=300)
        capacity = run_load(address, x, concurrency=32, requests=1000)
        out.update(unloaded_p50_ms=unloaded["p50_ms"], capacity_rps=capacity["throughput_rps"],
                   slo_ms=round(3 * unloaded["p50_ms"], 2))
        rate, n = 2 * capacity["throughput_rps"], max(400, int(10 * capacity["throughput_rps"]))
        out["no_target"] = _open_loop_result(run_open_loop(address, xs, rate=rate, requests=n, rows=rows),
                                             out["slo_ms"], ys, full)
    finally:
        stop_server(proc)
    proc, address, _ = start_server([*cmd, "--set", f"serve.latency_slo_ms={out['slo_ms']}"])
    try:
        with Client(address) as client:
            client.wait_ready(300)
        run_load(address, xs[:rows], concurrency=8, requests=200)  # warm-up: the planner learns
        out["target"] = _open_loop_result(run_open_loop(address, xs, rate=rate, requests=n, rows=rows),
                                          out["slo_ms"], ys, full)
    finally:
        stop_server(proc)
    for kind in ("no_target", "target"):
        r = out[kind]
        print(f"[slo] {kind}: target {out['slo_ms']} ms (3x unloaded p50 {out['unloaded_p50_ms']} ms), "
              f"offered {r['rate_offered']} req/s = 2x capacity {out['capacity_rps']}: "
              f"{r['within_slo']:.2%} within ({r['within_slo_server_side']:.2%} server-side), p50/p99 "
              f"{r['p50_ms']}/{r['p99_ms']} ms (server {r['server_p50_ms']}/{r['server_p99_ms']}), "
              f"mean branches {r['mean_branches_used']}, "
              f"accuracy {r['accuracy_of_replies']} (full model {r['full_model_accuracy_same_images']}), "
              f"errors {r['errors']}", file=sys.stderr, flush=True)
    return out


def _open_loop_result(r: dict, slo_ms: float, ys: np.ndarray, full: np.ndarray) -> dict:
    replies = r.pop("replies")
    if not replies:
        return {**r, "within_slo": 0.0, "within_slo_server_side": 0.0, "server_p50_ms": None,
                "server_p99_ms": None, "mean_branches_used": None, "accuracy_of_replies": None,
                "full_model_accuracy_same_images": None}
    lat = np.array([q[1] for q in replies]) * 1e3
    rows = np.concatenate([np.arange(q[0], q[0] + len(q[2])) for q in replies])
    pred = np.concatenate([q[2] for q in replies])
    used = np.array([q[3] for q in replies])
    server = np.array([q[4] for q in replies])
    return {**r, "within_slo": round(float((lat <= slo_ms).mean()), 4),
            "within_slo_server_side": round(float((server <= slo_ms).mean()), 4),
            "server_p50_ms": round(float(np.percentile(server, 50)), 3),
            "server_p99_ms": round(float(np.percentile(server, 99)), 3),
            "mean_branches_used": round(float(used.mean()), 2),
            "accuracy_of_replies": round(float((pred == ys[rows]).mean()), 4),
            "full_model_accuracy_same_images": round(float((full[rows] == ys[rows]).mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint or RUN_DIR served by every server")
    ap.add_argument("--config", help="config (when no checkpoint, or to replace the checkpoint's)")
    ap.add_argument("--set", action="append", default=[], help="config override for every server")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,32", help="comma-separated client counts")
    ap.add_argument("--layouts", default="1x2", help="comma-separated RxW: R replica groups of W workers")
    ap.add_argument("--rows", type=int, default=1, help="images per request")
    ap.add_argument("--baseline-threads", type=int, default=32, help="handler threads of the baseline")
    ap.add_argument("--kill", action="store_true", help="SIGKILL a worker of the first R >= 2 layout at C=8")
    ap.add_argument("--slo", action="store_true", help="latency target run at 2x capacity (see above)")
    ap.add_argument("--slo-rows", type=int, default=64, help="images per request in the --slo run")
    ap.add_argument("--peers", action="store_true", help="the peer benchmark (see above)")
    ap.add_argument("--quick", action="store_true", help="--peers: a short smoke round")
    ap.add_argument("--servers", help="--peers: comma-separated subset of " + ",".join(PEER_SERVERS))
    ap.add_argument("--serve-threads", type=int, default=1,
                    help="--peers: torch threads of every single-process model (layerpar's serve.threads)")
    args = ap.parse_args()
    if args.peers:
        sys.exit(peers_main(args, ap))
    levels = [int(c) for c in args.concurrency.split(",")]
    layouts = [tuple(int(v) for v in lay.split("x")) for lay in args.layouts.split(",")]
    source = (["--checkpoint", args.checkpoint] if args.checkpoint else []) + \
             (["--config", args.config] if args.config else [])
    sets = [a for s in args.set for a in ("--set", s)]
    commands = {"baseline": [sys.executable, "-m", "layerpar.serve.baseline", *source, *sets, "--port", "0",
                             "--threads", str(args.baseline_threads)]}
    for r, w in layouts:
        commands[f"{r}x{w}"] = [sys.executable, str(ROOT / "launch/serve.py"), *source, *sets, "--port", "0",
                                "--metrics-port", "0", "--set", f"parallel.replicas={r}",
                                "--set", f"parallel.workers={w}"]
    results: dict[str, dict] = {}
    info, extra = {}, {}
    kill_layout = next((f"{r}x{w}" for r, w in layouts if r >= 2), None)
    for kind, cmd in commands.items():
        print(f"[{kind}] starting: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        proc, address, metrics_url = start_server(cmd)
        try:
            with Client(address) as client:
                if kind != "baseline":  # the baseline has no health service
                    client.wait_ready(300)
                info = client.model_info()
            x = np.random.default_rng(0).standard_normal((args.rows, *info["input_shape"]), np.float32)
            results[kind] = closed_loop(kind, address, metrics_url, x, levels, args.requests)
            if args.kill and kind == kill_layout:
                extra["kill"] = {"layout": kind, **kill_phase(proc, address, metrics_url, x, args.requests)}
        finally:
            stop_server(proc)
    if args.slo:
        slo_layout = kill_layout or f"{layouts[0][0]}x{layouts[0][1]}"
        extra["slo"] = {"layout": slo_layout, **slo_phase(commands[slo_layout], args)}
    print(json.dumps(summarise(results, levels, info, args, extra)))


def peers_main(args, ap) -> int:
    from layerpar.bench.peers import run_peers, table

    if args.serve_threads < 1:
        ap.error(f"--serve-threads ({args.serve_threads}) must be >= 1")
    if args.requests == ap.get_default("requests"):
        args.requests = 0  # the peer benchmark's own default (2000; --quick: 60)
    try:
        summary = run_peers(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(summary))
    print(json.dumps(summary))
    return 0


def summarise(results: dict, levels: list[int], info: dict, args, extra: dict) -> dict:
    top, base = str(max(levels)), results["baseline"]
    layouts = [k for k in results if k != "baseline"]
    out = {"model": {k: info.get(k) for k in ("model_kind", "num_branches", "transport", "params",
                                              "input_shape", "checkpoint_id")},
           "requests": args.requests, "rows_per_request": args.rows, "concurrency": levels,
           "results": results, "ratios": {}, **extra}
    for lay in layouts:
        r = results[lay]
        over = r[top]["throughput_rps"] / base[top]["throughput_rps"]
        ratios = {f"throughput_c{top}_over_baseline": round(over, 2)}
        if "1" in r:
            ratios["unloaded_p50_over_baseline"] = round(r["1"]["p50_ms"] / base["1"]["p50_ms"], 2)
            ratios[f"p99_c{top}_over_own_unloaded_p50"] = round(r[top]["p99_ms"] / r["1"]["p50_ms"], 2)
        out["ratios"][lay] = ratios
    if "2x1" in results and "1x2" in results:
        out["ratios"][f"2x1_over_1x2_throughput_c{top}"] = round(
            results["2x1"][top]["throughput_rps"] / results["1x2"][top]["throughput_rps"], 2)
    return out


if __name__ == "__main__":
    main()
