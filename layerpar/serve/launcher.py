"""`layerpar serve`: load a checkpoint into a backend and serve it until SIGTERM / SIGINT.

    layerpar serve --checkpoint runs/<run>                           # the run's latest checkpoint
    layerpar serve --checkpoint runs/<run>/checkpoints/step_0000420 --port 0 --metrics-port 9100
    layerpar serve --checkpoint runs/<run> --http-port 8000      # + Open Inference Protocol REST (/v2)
    layerpar serve --checkpoint runs/<run> --set parallel.workers=2 --set serve.max_wait_ms=2
    layerpar serve --config digits                                   # fresh (untrained) weights: demos

The config is the checkpoint's own (--config replaces it; --set overrides either). The bearer token
comes from the environment (LAYERPAR_SERVE_TOKEN) or a file (--set serve.token_file=PATH) only: never a
flag (it would show in `ps`) nor a config value (configs reach workers and run files). Serving reads and
verifies the checkpoint's weights only, never its optimizer state. The ports are checked before any
engine (or Ray) starts: one taken is one sentence and exit 2. Prints the address once it serves; the
last stdout line is one JSON object written when the server has stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import time
from pathlib import Path

from layerpar.config import ConfigError, load_config, with_overrides


def resolve(args) -> tuple[object, Path | None, dict]:
    """(config, checkpoint dir or None, manifest) from --checkpoint / --config / --set / flags."""
    ckpt_dir, manifest = None, {}
    if args.checkpoint:
        from layerpar.train.checkpoint import manifest_config, read_manifest, resolve_checkpoint

        ckpt_dir = resolve_checkpoint(args.checkpoint)
        manifest = read_manifest(ckpt_dir)
    if args.config or not args.checkpoint:
        cfg = load_config(args.config)
    else:
        cfg = manifest_config(manifest, ckpt_dir / "manifest.json")
    serve = {}
    for flag, key in (("host", "host"), ("port", "port"), ("metrics_port", "metrics_port"),
                      ("http_port", "http_port")):
        if getattr(args, flag) is not None:
            serve[key] = getattr(args, flag)
    cfg = _with_sets(cfg, args.set)
    return (cfg.replace(serve=serve) if serve else cfg), ckpt_dir, manifest


def _with_sets(cfg, sets: list[str]):
    """cfg with --set applied. Replica groups from a one-process checkpoint (parallel.workers 0, the
    README's `--set parallel.replicas=2`) get one worker per group unless --set says how many: a
    group is a whole model, and one worker holding every branch is the smallest one."""
    try:
        return with_overrides(cfg, sets)
    except ConfigError:
        if cfg.parallel.workers != 0 or any(s.strip().startswith("parallel.workers=") for s in sets):
            raise
        try:
            out = with_overrides(cfg, ["parallel.workers=1", *sets])
        except ConfigError:
            out = None
        if out is None or out.parallel.replicas < 2:
            raise
    print(f"note: the checkpoint was trained in one process (parallel.workers 0): serving "
          f"{out.parallel.replicas} replica groups of 1 worker (--set parallel.workers=W for more)",
          file=sys.stderr)
    return out


def check_port_free(host: str, port: int, what: str) -> None:
    """OSError (one sentence) unless host:port can be bound now; port 0 (any free one) always can.
    Checked before the engine starts so that a taken port is reported in a moment, not after Ray."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"{what} {host!r} is not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is free
        try:
            sock.bind(addr)
        except OSError as exc:
            flags = "--http-port" if what == "REST" else "--port / --metrics-port"
            raise OSError(f"cannot serve {what} on {host}:{port}: {exc.strerror}; stop whatever holds "
                          f"the port or choose another ({flags}, 0 for a free one)") from None


def classes_of(manifest: dict) -> list[str] | None:
    extra = manifest.get("extra") or {}
    classes = manifest.get("classes") or extra.get("classes")
    return [str(c) for c in classes] if classes else None


async def _serve(cfg, backend, *, classes, checkpoint_id, token, prefix_accuracy=None) -> dict:
    from layerpar.serve.auth import security_warnings
    from layerpar.serve.server import InferenceServer

    for warning in security_warnings(cfg.serve.host, token=token, tls=bool(cfg.serve.tls_cert)):
        print(f"warning: {warning}", file=sys.stderr)
    server = InferenceServer(cfg, backend, classes=classes, checkpoint_id=checkpoint_id, token=token or "",
                             prefix_accuracy=prefix_accuracy)
    address = await server.start()
    started = time.monotonic()
    print(f"serving layerpar.v1.Inference on {address}  (and inference.GRPCInferenceService)"
          + (f"  REST {server.http_url}/v2" if server.http_url else "")
          + (f"  metrics {server.metrics_url}" if server.metrics_url else "")
          + ("  (TLS)" if cfg.serve.tls_cert else "") + ("  (token required)" if token else ""),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"draining: finishing in-flight requests (at most {cfg.serve.drain_timeout_s:g}s)",
          file=sys.stderr, flush=True)
    finished = await server.stop()
    counts = {}
    for metric in server.metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = f"{sample.labels['method']}:{sample.labels['status']}"
                counts[key] = int(sample.value)
    return {"address": address, "http": server.http_url, "metrics": server.metrics_url,
            "served_s": round(time.monotonic() - started, 3),
            "drained": finished, "requests": counts, "engine_calls": server.batcher.calls,
            "rows_computed": server.batcher.rows_computed}


def load_weights_into(backend, ckpt_dir: Path | None):
    """The checkpoint's weights (verified) into a fresh backend; its optimizer state is never read,
    so a damaged optim.* file does not stop serving. Shuts the backend down if loading fails."""
    if ckpt_dir is None:
        return backend
    try:
        backend.load(ckpt_dir, weights_only=True)
    except BaseException:
        backend.shutdown()
        raise
    return backend


def serve_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="layerpar serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint directory, or a RUN_DIR (its latest checkpoint)")
    ap.add_argument("--config", help="YAML path or packaged config name (default: the checkpoint's)")
    ap.add_argument("--host", help="bind address (default serve.host = 127.0.0.1)")
    ap.add_argument("--port", type=int, help="gRPC port (0: a free one)")
    ap.add_argument("--metrics-port", type=int, help="Prometheus port (0: a free one, -1: off)")
    ap.add_argument("--http-port", type=int,
                    help="Open Inference Protocol REST port, /v2/... (0: a free one, -1: off; "
                         "default serve.http_port)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override, repeatable")
    args = ap.parse_args(argv)
    try:
        from layerpar.runtime.backend import make_backend
        from layerpar.serve.auth import resolve_token
        from layerpar.serve.prefixes import prefix_floor, run_prefix_accuracy
        from layerpar.train.checkpoint import CheckpointError

        cfg, ckpt_dir, manifest = resolve(args)
        token = resolve_token(cfg.serve.token_file)
        check_port_free(cfg.serve.host, cfg.serve.port, "gRPC")  # before Ray and the engine start
        if cfg.serve.metrics_port > 0:
            check_port_free(cfg.serve.metrics_host, cfg.serve.metrics_port, "metrics")
        if cfg.serve.http_port > 0:
            check_port_free(cfg.serve.host, cfg.serve.http_port, "REST")
        from layerpar.serve.lm_source import is_lm, serve_lm_main

        if is_lm(cfg):  # a language model: the Generate server (serve/generate_rpc.py)
            return serve_lm_main(cfg, ckpt_dir, manifest, token, args.set)
        if ckpt_dir is None:
            print("warning: no --checkpoint: serving freshly initialised (untrained) weights",
                  file=sys.stderr)
        checkpoint_id = f"{ckpt_dir.name}@step{manifest.get('step', '?')}" if ckpt_dir else ""
        accuracy = run_prefix_accuracy(ckpt_dir, manifest, cfg.model.num_branches)
        floor = prefix_floor(cfg, accuracy)  # refuses here, before Ray, when no prefix is good enough
        for line in floor.notes:
            print(line, file=sys.stderr)
        for line in floor.warnings:
            print(f"warning: {line}", file=sys.stderr)
        backend = load_weights_into(make_backend(cfg), ckpt_dir)
        if cfg.serve.threads > 0:  # the serving engine's own threads, not the run's train.threads
            import torch

            torch.set_num_threads(cfg.serve.threads)
    except (ConfigError, CheckpointError, OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"error": str(exc)}))
        return 2
    try:
        summary = asyncio.run(_serve(cfg, backend, classes=classes_of(manifest), checkpoint_id=checkpoint_id,
                                     token=token, prefix_accuracy=accuracy))
    except (OSError, RuntimeError) as exc:  # e.g. the port is taken
        summary = {"error": f"cannot serve on {cfg.serve.host}:{cfg.serve.port}: {exc}"}
        print(f"error: {summary['error']}", file=sys.stderr)
    finally:
        backend.shutdown()
    summary["checkpoint"] = str(ckpt_dir) if ckpt_dir else None
    print(json.dumps(summary))
    return 0 if "error" not in summary else 1
