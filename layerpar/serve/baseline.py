"""The benchmark's baseline: a plain single-process gRPC server with no batching.

One forward pass per request, on a thread pool, in the server process (a LocalBackend: no Ray), same
proto and same input checks as the real server, so the load generator drives both the same way.

    python -m layerpar.serve.baseline --checkpoint runs/<run> --port 0
    python -m layerpar.serve.baseline --config digits --port 0 --threads 32

Prints "serving layerpar.v1.Inference on HOST:PORT (baseline)" and serves until SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from layerpar.serve import layerpar_v1_pb2 as pb
from layerpar.serve import layerpar_v1_pb2_grpc as pb_grpc
from layerpar.serve.codec import BadRequest, InputSpec, decode_request, encode_response


class PlainServicer(pb_grpc.InferenceServicer):
    def __init__(self, cfg, backend):
        self.cfg, self.backend = cfg, backend
        self.spec = InputSpec.from_config(cfg)

    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        try:
            d = decode_request(request, self.spec)
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with torch.no_grad():
            logits = self.backend.infer(torch.from_numpy(d.x), d.num_branches).numpy()
        return encode_response(logits, d, num_branches=d.num_branches or self.spec.num_branches,
                               batch_rows=d.rows)

    def ModelInfo(self, request, context):  # noqa: N802
        m = self.cfg.model
        return pb.ModelInfoResponse(model_kind=m.kind, input_shape=list(self.spec.input_shape),
                                    input_dtype="float32", num_classes=m.num_classes,
                                    num_branches=m.num_branches, transport="local")


def main(argv: list[str] | None = None) -> int:
    from layerpar.serve.launcher import load_weights_into, resolve
    from layerpar.train.local import LocalBackend

    ap = argparse.ArgumentParser(prog="python -m layerpar.serve.baseline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--config")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--threads", type=int, default=32, help="gRPC handler threads (concurrent requests)")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    args.metrics_port = None
    cfg, ckpt_dir, _ = resolve(args)
    backend = load_weights_into(LocalBackend(cfg.replace(parallel={"workers": 0})), ckpt_dir)
    s = cfg.serve
    server = grpc.server(ThreadPoolExecutor(max_workers=args.threads), options=[
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.max_receive_message_length", s.max_message_bytes), ("grpc.so_reuseport", 0)])
    pb_grpc.add_InferenceServicer_to_server(PlainServicer(cfg, backend), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"serving layerpar.v1.Inference on {args.host}:{port} (baseline)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
