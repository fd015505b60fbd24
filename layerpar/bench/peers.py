"""The peer benchmark (`launch/bench_serve.py --peers`): the same trained model served by layerpar and by
the servers people would otherwise use, every server alone in turn, one load generator, the same rows.

Servers (each its own process tree, started here and stopped by its PID):
  layerpar            launch/serve.py, one process (serve.threads torch threads)   OIP over gRPC
  layerpar_2x1        launch/serve.py, 2 replica groups x 1 worker (local Ray)      OIP over gRPC
  layerpar_noop       layerpar's server, the model replaced by a constant            OIP over gRPC
  triton              Triton (nvidia-pytriton), dynamic batcher, no queue delay      OIP over gRPC
  triton_noop         the same, the model replaced by a constant                    OIP over gRPC
  layerpar_ray_serve  layerpar's Ray Serve deployment, 1 replica x 1 worker         OIP REST via Serve
  ray_serve           plain Ray Serve, @serve.batch around the single-process model  HTTP via Serve
  ray_serve_noop      the same, the model replaced by a constant                    HTTP via Serve

Loads: C = 1, 8, 32 closed-loop clients of 1-image requests, then C = 8 of 8-image requests, of the
first test-split images; the client is tritonclient's gRPC client for the OIP servers and aiohttp for
HTTP (layerpar/serve/loadgen.py). Each row: throughput, p50, p99, errors and the server's CPU per
request: the CPU time (user + system, /proc) of the server's whole process tree over the run, divided
by the answered requests, and the cores it kept busy. Triton needs nvidia-pytriton, which lives in a
venv of its own (`make bench-peers-env`; docs/SERVING.md): without it the triton rows say why they
were skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LEVELS = [("c1", 1, 1), ("c8", 8, 1), ("c32", 32, 1), ("c8x8", 8, 8)]  # (key, clients, images/request)
SERVERS = ["layerpar", "layerpar_2x1", "layerpar_noop", "triton", "triton_noop", "layerpar_ray_serve",
           "ray_serve", "ray_serve_noop"]
NOOP_OF = {"layerpar": "layerpar_noop", "layerpar_2x1": "layerpar_noop", "triton": "triton_noop",
           "ray_serve": "ray_serve_noop", "layerpar_ray_serve": "ray_serve_noop"}
ADDRESS = re.compile(r"\bon (\S+:\d+)")
HEADER = "Inference-Header-Content-Length"


@dataclass
class Server:
    name: str
    protocol: str  # oip-grpc | oip-http | http
    cmd: list[str]
    env: dict = field(default_factory=dict)
    skipped: str | None = None


# ----------------------------------------------------------------------------- process trees


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(pid)
    return out


def tree(root: int) -> list[int]:
    """root and every process below it."""
    children, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system, and those of reaped children) of root's whole process tree."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in tree(root):
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in f[11:15])  # utime stime cutime cstime
    return total / tick


# ----------------------------------------------------------------------------- servers


def pytriton_python() -> tuple[str | None, str]:
    """(an interpreter that has pytriton, or None; how it was found / why not)."""
    if os.environ.get("LAYERPAR_PEERS_PYTHON"):
        return os.environ["LAYERPAR_PEERS_PYTHON"], "LAYERPAR_PEERS_PYTHON"
    venv = ROOT / ".venv-peers" / "bin" / "python"
    if venv.exists():
        return str(venv), str(venv.parent.parent.relative_to(ROOT))
    if importlib.util.find_spec("pytriton") is not None:
        return sys.executable, "this interpreter"
    return None, "nvidia-pytriton is not installed: run `make bench-peers-env` (docs/SERVING.md)"


def commands(model_file: str | None, source: list[str], sets: list[str], threads: int) -> dict[str, Server]:
    py, serve = sys.executable, str(ROOT / "launch" / "serve.py")
    peer = [py, "-m", "layerpar.bench.peer_servers"]
    base = [serve, *source, *sets, "--port", "0", "--metrics-port", "-1", "--set", f"serve.threads={threads}"]
    model = ["--model", model_file or "", "--threads", str(threads)]
    out = {
        "layerpar": Server("layerpar", "oip-grpc", [py, *base, "--set", "parallel.workers=0"]),
        "layerpar_2x1": Server("layerpar_2x1", "oip-grpc", [py, *base, "--set", "parallel.replicas=2",
                                                            "--set", "parallel.workers=1"]),
        "layerpar_noop": Server("layerpar_noop", "oip-grpc", [*peer, "layerpar-noop", *source, *sets]),
        "layerpar_ray_serve": Server("layerpar_ray_serve", "oip-http",
                                     [*peer, "ray-layerpar", *source, *sets]),
        "ray_serve": Server("ray_serve", "http", [*peer, "ray-plain", *model]),
        "ray_serve_noop": Server("ray_serve_noop", "http", [*peer, "ray-plain", *model, "--noop"]),
    }
    tpy, why = pytriton_python()
    libdir = subprocess.run([tpy, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True).stdout.strip() if tpy else ""
    env = {"LD_LIBRARY_PATH": ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)}
    for name, extra in (("triton", []), ("triton_noop", ["--noop"])):
        out[name] = Server(name, "oip-grpc", [tpy or "", "-m", "layerpar.bench.peer_servers", "triton",
                                              *model, *extra], env=env, skipped=None if tpy else why)
    return out


def start(server: Server, log_dir: Path, timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Start the server; wait for its "serving ... on HOST:PORT" line; (process, address)."""
    log = log_dir / f"{server.name}.log"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "PYTHONUNBUFFERED": "1", **server.env}
    with open(log, "wb") as out:
        proc = subprocess.Popen(server.cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        m = ADDRESS.search(log.read_text(errors="replace"))
        if m and "serving" in log.read_text(errors="replace"):
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-1500:]
    stop(proc)
    raise RuntimeError(f"{server.name} did not start (exit code {proc.returncode}); its log ends:\n{tail}")


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the PID, who it is."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the server's PID, wait; then SIGKILL whatever of its tree is left, PID by PID (only
    the very processes seen in the tree before: same PID and start time)."""
    pids = [(pid, _started(pid)) for pid in tree(proc.pid)]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for pid, started in pids[1:]:  # leftovers of the tree we started (e.g. a Ray worker that outlived it)
        if started is None or _started(pid) != started:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ----------------------------------------------------------------------------- loads


def oip_http_body(x: np.ndarray) -> tuple[bytes, dict]:
    """An OIP REST infer request with the binary tensor extension (Triton's client sends the same)."""
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return header + x.tobytes(), {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def load(server: Server, address: str, x: np.ndarray, clients: int, requests: int) -> dict:
    from layerpar.serve.loadgen import run_http_load, run_oip_load

    if server.protocol == "oip-grpc":
        return run_oip_load(address, x, concurrency=clients, requests=requests)
    if server.protocol == "oip-http":
        body, headers = oip_http_body(x)
        return run_http_load(f"http://{address}/v2/models/layerpar/infer", body, concurrency=clients,
                             requests=requests, headers=headers)
    return run_http_load(f"http://{address}/", x.tobytes(), concurrency=clients, requests=requests)


def answer(server: Server, address: str, x: np.ndarray, timeout_s: float = 10.0) -> np.ndarray:
    """One request's logits (B, classes), by the same protocol the load uses."""
    if server.protocol == "oip-grpc":
        import tritonclient.grpc as tc

        t = tc.InferInput("input", list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        with tc.InferenceServerClient(address) as client:
            return client.infer("layerpar", [t], client_timeout=timeout_s).as_numpy("logits")
    if server.protocol == "oip-http":
        body, headers = oip_http_body(x)
        req = urllib.request.Request(f"http://{address}/v2/models/layerpar/infer", body, headers)
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw, size = r.read(), int(r.headers.get(HEADER, 0))
        if size:
            return np.frombuffer(raw[size:], "<f4").reshape(x.shape[0], -1)
        (out,) = json.loads(raw)["outputs"]
        return np.asarray(out["data"], np.float32).reshape(out["shape"])
    req = urllib.request.Request(f"http://{address}/", x.tobytes())
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return np.frombuffer(r.read(), np.float32).reshape(x.shape[0], -1)


def wait_answering(server: Server, address: str, x: np.ndarray, timeout_s: float = 300.0) -> np.ndarray:
    end, last = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        try:
            return answer(server, address, x)
        except Exception as exc:  # noqa: BLE001 - not up yet: Ray Serve's replicas, Triton's model
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"{server.name} on {address} did not answer within {timeout_s:.0f}s: {last}")


def measure(server: Server, address: str, proc, xs: np.ndarray, requests: int, levels=LEVELS) -> dict:
    """Every level's load result plus the server tree's CPU over it."""
    load(server, address, xs[:1], 8, max(20, requests // 4))  # warm-up
    out = {}
    for key, clients, rows in levels:
        cpu0 = tree_cpu_s(proc.pid)
        r = load(server, address, xs[:rows], clients, requests)
        cpu = tree_cpu_s(proc.pid) - cpu0
        row = {k: r[k] for k in ("throughput_rps", "p50_ms", "p99_ms", "ok", "errors", "seconds")}
        row["clients"], row["images_per_request"] = clients, rows
        row["server_cpu_ms_per_request"] = round(1e3 * cpu / r["ok"], 3) if r["ok"] else None
        row["server_cores"] = round(cpu / r["seconds"], 2) if r["seconds"] else None
        out[key] = row
        print(f"[{server.name}] {key:5s} {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']} ms  "
              f"p99 {row['p99_ms']} ms  cpu {row['server_cpu_ms_per_request']} ms/req "
              f"({row['server_cores']} cores)  errors {row['errors']}", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------- the run


def prepare_model(args, log_dir: Path) -> tuple[list[str], str, dict, np.ndarray]:
    """(the --checkpoint/--config flags every layerpar server gets, the model file of the single-process
    peers, what was served, the first test-split images). No checkpoint: --quick serves fresh
    weights; otherwise one is trained here first (launch/train.py, one process)."""
    import torch

    from layerpar.data import load_dataset
    from layerpar.serve.launcher import load_weights_into, resolve
    from layerpar.train.local import LocalBackend

    checkpoint, trained = args.checkpoint, None
    if not checkpoint and not args.quick:
        cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", args.config or "digits",
               "--set", "parallel.workers=0", "--out-dir", str(log_dir / "runs"),
               *[a for s in args.set for a in ("--set", s)]]
        print(f"[peers] no --checkpoint: training one ({' '.join(cmd[1:])})", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
        trained = json.loads(done.stdout.strip().splitlines()[-1])
        checkpoint = trained["run_dir"]
    config = args.config or (None if checkpoint else "digits")
    source = (["--checkpoint", checkpoint] if checkpoint else []) + (["--config", config] if config else [])
    ns = argparse_ns(checkpoint, config, args.set)
    cfg, ckpt_dir, _ = resolve(ns)
    backend = load_weights_into(LocalBackend(cfg.replace(parallel={"workers": 0})), ckpt_dir)
    model_file = log_dir / "model.pt"
    torch.save({"config": cfg.to_dict(), "state": backend.model.state_dict()}, model_file)
    test = load_dataset(cfg).test
    xs = np.ascontiguousarray(test.x[:8].numpy(), np.float32)
    reference = backend.infer(torch.from_numpy(xs)).numpy()
    info = {"checkpoint": str(ckpt_dir) if ckpt_dir else None, "config": cfg.data.name,
            "trained_here": bool(trained), "test_accuracy": (trained or {}).get("test_accuracy"),
            "params": sum(p.numel() for p in backend.model.parameters()),
            "num_branches": cfg.model.num_branches}
    return source, str(model_file), info, (xs, reference)


def argparse_ns(checkpoint, config, sets):
    from types import SimpleNamespace

    return SimpleNamespace(checkpoint=checkpoint, config=config, set=list(sets), host=None, port=None,
                           metrics_port=None, http_port=None)


def run_peers(args) -> dict:
    """The whole benchmark; the JSON summary (its `peers` object: one entry per server)."""
    wanted = args.servers.split(",") if args.servers else SERVERS
    unknown = [s for s in wanted if s not in SERVERS]
    if unknown:
        raise ValueError(f"unknown server {unknown[0]!r}; known: {', '.join(SERVERS)}")
    # SIGTERM (a timeout, a scheduler) unwinds like Ctrl-C: the `finally` below stops the server it ran
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    requests = args.requests if args.requests else (60 if args.quick else 2000)
    threads = args.serve_threads
    with tempfile.TemporaryDirectory(prefix="layerpar-peers-") as tmp:
        log_dir = Path(tmp)
        source, model_file, info, (xs, reference) = prepare_model(args, log_dir)
        servers = commands(model_file, source, [a for s in args.set for a in ("--set", s)], threads)
        peers: dict[str, dict] = {}
        for name in SERVERS:
            server = servers[name]
            entry = {"protocol": server.protocol, "noop": name.endswith("_noop"),
                     "noop_row": NOOP_OF.get(name)}
            if name not in wanted:
                peers[name] = {**entry, "skipped": "not asked for (--servers)"}
                continue
            if server.skipped:
                peers[name] = {**entry, "skipped": server.skipped}
                print(f"[{name}] skipped: {server.skipped}", file=sys.stderr, flush=True)
                continue
            print(f"[{name}] starting: {' '.join(server.cmd[1:])}", file=sys.stderr, flush=True)
            try:
                proc, address = start(server, log_dir)
            except RuntimeError as exc:
                peers[name] = {**entry, "error": str(exc).splitlines()[0]}
                print(f"[{name}] {exc}", file=sys.stderr, flush=True)
                continue
            try:
                got = wait_answering(server, address, xs)
                if not entry["noop"]:
                    entry["max_abs_logit_diff"] = float(np.abs(got - reference).max())
                entry["levels"] = measure(server, address, proc, xs, requests)
            except Exception as exc:  # noqa: BLE001 - one server's failure is its row, not the run's end
                entry["error"] = f"{type(exc).__name__}: {exc}"
                print(f"[{name}] failed: {entry['error']}", file=sys.stderr, flush=True)
            finally:
                stop(proc)
            peers[name] = entry
    return {"benchmark": "serve_peers", "quick": bool(args.quick), "model": info,
            "requests_per_level": requests, "serve_threads": threads,
            "levels": {k: {"clients": c, "images_per_request": r} for k, c, r in LEVELS},
            "machine": {"cpus": os.cpu_count(), "loadavg": Path("/proc/loadavg").read_text().split()[:3]},
            "peers": peers, "targets": targets(peers)}


def _get(peers, name, level, key):
    return ((peers.get(name) or {}).get("levels") or {}).get(level, {}).get(key)


def _ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def targets(peers: dict) -> dict:
    """The issue's targets against Triton and plain Ray Serve (None where a row is missing)."""
    def over(name, other, level, key):
        return _ratio(_get(peers, name, level, key), _get(peers, other, level, key))

    out = {name: {"c32_throughput_over_triton": over(name, "triton", "c32", "throughput_rps"),
                  "c1_p50_over_triton": over(name, "triton", "c1", "p50_ms"),
                  "c8x8_throughput_over_triton": over(name, "triton", "c8x8", "throughput_rps"),
                  "c32_cpu_per_request_over_triton": over(name, "triton", "c32", "server_cpu_ms_per_request"),
                  "c32_throughput_over_ray_serve": over(name, "ray_serve", "c32", "throughput_rps")}
           for name in ("layerpar", "layerpar_2x1")}
    out["layerpar_ray_serve"] = {"c1_p50_over_ray_serve": over("layerpar_ray_serve", "ray_serve", "c1",
                                                               "p50_ms")}
    return out


def table(summary: dict) -> str:
    """README-ready markdown: one row per server, each level's throughput / p50 / p99 / CPU per request."""
    head = ["server", "protocol"] + [f"{k}: req/s, p50 / p99 ms, CPU ms/req" for k in summary["levels"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in summary["peers"].items():
        if "levels" not in e:
            why = e.get("skipped") or e.get("error") or "no result"
            if "not asked for" in why:
                continue
            lines.append(f"| {name} | {e['protocol']} | " + f"{why} |" + " |" * (len(head) - 3))
            continue
        cells = []
        for k in summary["levels"]:
            r = e["levels"][k]
            cells.append(f"{r['throughput_rps']:,.0f}, {r['p50_ms']:.1f} / {r['p99_ms']:.1f}, "
                         f"{r['server_cpu_ms_per_request']}" + (f" ({sum(r['errors'].values())} err)"
                                                                if r["errors"] else ""))
        lines.append(f"| {name} | {e['protocol']} | " + " | ".join(cells) + " |")
    m = summary["machine"]
    lines.append(f"\n{m['cpus']} CPUs, load average {' '.join(m['loadavg'])} at the end; "
                 f"{summary['requests_per_level']} requests per level; "
                 f"serve.threads {summary['serve_threads']}.")
    return "\n".join(lines)
