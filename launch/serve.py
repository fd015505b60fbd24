"""Serve a trained Para-Former over gRPC (layerpar.v1 and the Open Inference Protocol) until SIGTERM.

    python launch/serve.py --checkpoint runs/<run>                  # latest checkpoint, 127.0.0.1:50051
    python launch/serve.py --checkpoint runs/<run> --port 0 --metrics-port 9100
    python launch/serve.py --checkpoint runs/<run> --http-port 8000      # + OIP REST: /v2/models/layerpar
    python launch/serve.py --checkpoint runs/<run> --set parallel.workers=2     # 2 Ray branch workers
    python launch/serve.py --checkpoint runs/<run> --set serve.degraded=allow   # answer through worker loss
    LAYERPAR_SERVE_TOKEN=... python launch/serve.py --checkpoint runs/<run> --host 0.0.0.0 \
        --set serve.tls_cert=cert.pem --set serve.tls_key=key.pem
    python launch/predict.py --address 127.0.0.1:50051                      # then, from another shell

Prints "serving layerpar.v1.Inference on HOST:PORT ..." once it serves (gRPC: it and the Open
Inference Protocol's inference.GRPCInferenceService on --port; REST on --http-port). On SIGTERM it
turns health NOT_SERVING, refuses new calls, finishes in-flight requests and exits; the last stdout
line is one JSON object (address, requests by status, engine calls, drained). Same as `layerpar serve`.
The token comes from LAYERPAR_SERVE_TOKEN or serve.token_file only; a port already taken is exit 2
before Ray starts.
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray stays on loopback (docs/CLUSTER.md)
os.environ.setdefault("RAY_AUTH_MODE", "token")

from layerpar.serve.launcher import serve_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
