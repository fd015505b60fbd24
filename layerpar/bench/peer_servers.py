"""The peer benchmark's servers other than `launch/serve.py` (layerpar/bench/peers.py starts each one as
its own process, alone, and stops it by PID):

    python -m layerpar.bench.peer_servers triton --model model.pt [--noop] [--threads 1]
    python -m layerpar.bench.peer_servers ray-plain --model model.pt [--noop] [--threads 1]
    python -m layerpar.bench.peer_servers ray-layerpar --checkpoint runs/<run> [--config digits]
    python -m layerpar.bench.peer_servers layerpar-noop --config digits

- triton: Triton Inference Server (nvidia-pytriton: the server binary plus a Python model) with its
  dynamic batcher (no queue delay, max batch 64) around the single-process model; the Open Inference
  Protocol over gRPC on 127.0.0.1. Needs pytriton (its own venv: `make bench-peers-env`).
- ray-plain: a plain Ray Serve deployment, one replica, ``@serve.batch`` (max 64, no wait) around the
  single-process model; HTTP on 127.0.0.1: POST / with the (B, C, H, W) float32 bytes, answered with the
  (B, classes) float32 logits.
- ray-layerpar: layerpar's own Ray Serve deployment (layerpar/serve/ray_serve.py), one replica with a
  branch group of 1 worker; the Open Inference Protocol's REST through Serve's HTTP proxy.
- layerpar-noop: layerpar's InferenceServer (both gRPC services, the batcher) in front of a backend
  that answers every batch with constant logits (zeros): the protocol stack's own cost.

--noop replaces the model by a constant answer, the rest of the stack unchanged. --model is the file
peers.py writes ({"config": Config.to_dict(), "state": the model's state_dict}); the triton mode reads
it without importing layerpar.train (its venv has numpy < 2). Each prints "serving <what> on
HOST:PORT" once it answers, then serves until SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import sysconfig
import threading

import numpy as np

MAX_BATCH = 64


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def load_model(path: str, threads: int):
    """(model in eval mode, input shape (C, H, W), num_classes) from peers.py's model file."""
    import torch

    from layerpar.config import from_dict
    from layerpar.model import build_model

    torch.set_num_threads(max(1, threads))
    saved = torch.load(path, map_location="cpu", weights_only=False)
    cfg = from_dict(saved["config"])
    model = build_model(cfg.model, seed=cfg.train.seed)
    model.load_state_dict(saved["state"])
    model.eval()
    m = cfg.model
    return model, (m.in_channels, m.image_size, m.image_size), m.num_classes


def model_fn(args):
    """x (B, C, H, W) float32 numpy -> logits (B, classes) float32 numpy; and the input shape."""
    import torch

    model, shape, classes = load_model(args.model, args.threads)
    if args.noop:
        return (lambda x: np.zeros((x.shape[0], classes), np.float32)), shape, classes

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()

    return run, shape, classes


def wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


# ----------------------------------------------------------------------------- Triton (pytriton)


def serve_triton(args) -> None:
    # The Python backend's stub loads libpython: this interpreter's own must come first where the
    # system has another one (pytriton starts tritonserver with this process's environment).
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    run, shape, classes = model_fn(args)

    @batch
    def infer(input):  # noqa: A002 - the tensor's name in the protocol
        return {"logits": run(input)}

    grpc_port = args.port or free_port()
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=grpc_port, http_address="127.0.0.1",
                          http_port=free_port(), metrics_port=free_port(), exit_on_error=True, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(model_name=args.model_name, infer_func=infer,
                    inputs=[Tensor(name="input", dtype=np.float32, shape=shape)],
                    outputs=[Tensor(name="logits", dtype=np.float32, shape=(classes,))],
                    config=ModelConfig(max_batch_size=MAX_BATCH,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
                    strict=False)
        triton.run()
        print(f"serving triton {args.model_name} on 127.0.0.1:{grpc_port}", flush=True)
        wait_for_signal()


# ----------------------------------------------------------------------------- Ray Serve


def _start_serve(port: int) -> None:
    import logging

    import ray
    from ray import serve

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def _stop_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def serve_ray_plain(args) -> None:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    port = args.port or free_port()
    _start_serve(port)

    @serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
    class Plain:
        def __init__(self, model_args):
            self.run, self.shape, _ = model_fn(model_args)

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.0)
        async def batched(self, xs: list[np.ndarray]) -> list[np.ndarray]:
            logits = self.run(np.concatenate(xs))
            out, at = [], 0
            for x in xs:
                out.append(logits[at: at + len(x)])
                at += len(x)
            return out

        async def __call__(self, request: Request) -> Response:
            x = np.frombuffer(await request.body(), np.float32).reshape(-1, *self.shape)
            return Response((await self.batched(x)).tobytes(), media_type="application/octet-stream")

    model_args = argparse.Namespace(model=args.model, threads=args.threads, noop=args.noop)
    serve.run(Plain.bind(model_args), name="plain", route_prefix="/", blocking=False)
    print(f"serving ray-plain on 127.0.0.1:{port}", flush=True)
    try:
        wait_for_signal()
    finally:
        _stop_serve()


def serve_ray_layerpar(args) -> None:
    from ray import serve

    from layerpar.serve.ray_serve import build_app

    port = args.port or free_port()
    _start_serve(port)
    sets = ["parallel.workers=1", "parallel.cpus_per_worker=1", "serve.ray_min_replicas=1",
            "serve.ray_max_replicas=1", *args.set]
    app = build_app({"checkpoint": args.checkpoint, "config": args.config, "set": sets})
    serve.run(app, name="layerpar", route_prefix="/", blocking=False)
    print(f"serving ray-layerpar on 127.0.0.1:{port}", flush=True)
    try:
        wait_for_signal()
    finally:
        _stop_serve()


# ----------------------------------------------------------------------------- layerpar, no model


class NoopBackend:
    """A Backend whose every batch is answered with zeros: the InferenceServer's stack alone."""

    concurrency = 1

    def __init__(self, cfg):
        self.cfg = cfg

    def infer_with_meta(self, x, num_branches=None):
        import torch

        return torch.zeros(x.shape[0], self.cfg.model.num_classes), {"timings": {"backend": 0.0}}

    def info(self) -> dict:
        return {"kind": self.cfg.model.kind, "num_branches": self.cfg.model.num_branches, "workers": 0,
                "transport": "none (no-op)", "params": 0}

    def health(self, timeout_s: float | None = None) -> dict:
        return {"ready": True, "workers": 0, "workers_alive": 0}

    def shutdown(self) -> None:
        pass


def serve_layerpar_noop(args) -> None:
    from layerpar.serve.launcher import resolve
    from layerpar.serve.server import InferenceServer

    ns = argparse.Namespace(checkpoint=args.checkpoint, config=args.config, set=args.set, host="127.0.0.1",
                            port=args.port, metrics_port=-1, http_port=None)
    cfg = resolve(ns)[0]

    async def main() -> None:
        server = InferenceServer(cfg, NoopBackend(cfg), token="")
        address = await server.start()
        print(f"serving layerpar-noop on {address}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(2.0)

    asyncio.run(main())


MODES = {"triton": serve_triton, "ray-plain": serve_ray_plain, "ray-layerpar": serve_ray_layerpar,
         "layerpar-noop": serve_layerpar_noop}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m layerpar.bench.peer_servers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=sorted(MODES))
    ap.add_argument("--model", help="model file written by peers.py (triton, ray-plain)")
    ap.add_argument("--checkpoint", help="checkpoint / run dir (ray-layerpar; layerpar-noop: its config)")
    ap.add_argument("--config", help="config name or YAML (ray-layerpar, layerpar-noop)")
    ap.add_argument("--set", action="append", default=[], help="config override (layerpar modes)")
    ap.add_argument("--noop", action="store_true", help="constant answers instead of the model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the single-process model")
    ap.add_argument("--port", type=int, default=0, help="port (0: a free one)")
    ap.add_argument("--model-name", default="layerpar", help="the model's name in the protocol (triton)")
    args = ap.parse_args(argv)
    if args.mode in ("triton", "ray-plain") and not args.model:
        ap.error(f"{args.mode} needs --model (the file peers.py writes)")
    MODES[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
