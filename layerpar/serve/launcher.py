"""`layerpar serve`: load a checkpoint into a backend and serve it until SIGTERM / SIGINT.

    layerpar serve --checkpoint runs/<run>                           # the run's latest checkpoint
    layerpar serve --checkpoint runs/<run>/checkpoints/step_0000420 --port 0 --metrics-port 9100
    layerpar serve --checkpoint runs/<run> --set parallel.workers=2 --set serve.max_wait_ms=2
    layerpar serve --config digits                                   # fresh (untrained) weights: demos

The config is the checkpoint's own (--config replaces it; --set overrides either). The token can come
from the environment (LAYERPAR_SERVE_TOKEN) so that it does not show in `ps`. Prints the address once
it serves; the last stdout line is one JSON object written when the server has stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from layerpar.config import ConfigError, from_dict, load_config, with_overrides


def resolve(args) -> tuple[object, Path | None, dict]:
    """(config, checkpoint dir or None, manifest) from --checkpoint / --config / --set / flags."""
    ckpt_dir, manifest = None, {}
    if args.checkpoint:
        from layerpar.train.checkpoint import read_manifest, resolve_checkpoint

        ckpt_dir = resolve_checkpoint(args.checkpoint)
        manifest = read_manifest(ckpt_dir)
    if args.config or not args.checkpoint:
        cfg = load_config(args.config)
    else:
        cfg = from_dict(manifest["config"])
    serve = {}
    for flag, key in (("host", "host"), ("port", "port"), ("metrics_port", "metrics_port")):
        if getattr(args, flag) is not None:
            serve[key] = getattr(args, flag)
    token = args.token or os.environ.get("LAYERPAR_SERVE_TOKEN")
    if token:
        serve["token"] = token
    cfg = with_overrides(cfg, args.set)
    return (cfg.replace(serve=serve) if serve else cfg), ckpt_dir, manifest


def classes_of(manifest: dict) -> list[str] | None:
    extra = manifest.get("extra") or {}
    classes = manifest.get("classes") or extra.get("classes")
    return [str(c) for c in classes] if classes else None


async def _serve(cfg, backend, *, classes, checkpoint_id) -> dict:
    from layerpar.serve.auth import security_warnings
    from layerpar.serve.server import InferenceServer

    for warning in security_warnings(cfg.serve.host, token=cfg.serve.token, tls=bool(cfg.serve.tls_cert)):
        print(f"warning: {warning}", file=sys.stderr)
    server = InferenceServer(cfg, backend, classes=classes, checkpoint_id=checkpoint_id)
    address = await server.start()
    started = time.monotonic()
    print(f"serving layerpar.v1.Inference on {address}"
          + (f"  metrics {server.metrics_url}" if server.metrics_url else "")
          + ("  (TLS)" if cfg.serve.tls_cert else "") + ("  (token required)" if cfg.serve.token else ""),
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
    return {"address": address, "metrics": server.metrics_url,
            "served_s": round(time.monotonic() - started, 3),
            "drained": finished, "requests": counts, "engine_calls": server.batcher.calls,
            "rows_computed": server.batcher.rows_computed}


def serve_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="layerpar serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint directory, or a RUN_DIR (its latest checkpoint)")
    ap.add_argument("--config", help="YAML path or packaged config name (default: the checkpoint's)")
    ap.add_argument("--host", help="bind address (default serve.host = 127.0.0.1)")
    ap.add_argument("--port", type=int, help="gRPC port (0: a free one)")
    ap.add_argument("--metrics-port", type=int, help="Prometheus port (0: a free one, -1: off)")
    ap.add_argument("--token", help="bearer token required on every call (or env LAYERPAR_SERVE_TOKEN)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override, repeatable")
    args = ap.parse_args(argv)
    try:
        from layerpar.train.checkpoint import CheckpointError
        from layerpar.train.local import make_backend

        cfg, ckpt_dir, manifest = resolve(args)
        if ckpt_dir is None:
            print("warning: no --checkpoint: serving freshly initialised (untrained) weights",
                  file=sys.stderr)
        checkpoint_id = f"{ckpt_dir.name}@step{manifest.get('step', '?')}" if ckpt_dir else ""
        backend = make_backend(cfg, checkpoint=ckpt_dir)
    except (ConfigError, CheckpointError, OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"error": str(exc)}))
        return 2
    try:
        summary = asyncio.run(_serve(cfg, backend, classes=classes_of(manifest), checkpoint_id=checkpoint_id))
    except (OSError, RuntimeError) as exc:  # e.g. the port is taken
        summary = {"error": f"cannot serve on {cfg.serve.host}:{cfg.serve.port}: {exc}"}
        print(f"error: {summary['error']}", file=sys.stderr)
    finally:
        backend.shutdown()
    summary["checkpoint"] = str(ckpt_dir) if ckpt_dir else None
    print(json.dumps(summary))
    return 0 if "error" not in summary else 1
