"""`layerpar predict`: send the test split of the served model's dataset to a server, print accuracy.

    layerpar predict --address 127.0.0.1:50051
    layerpar predict --address 127.0.0.1:50051 --num-branches 2 --limit 200 --batch-size 32
    layerpar predict --address host:50051 --token "$TOKEN" --tls-ca ca.pem --set data.root=/data/fmnist

The dataset comes from the server's own config (ModelInfo), so the client needs no checkpoint; --set
changes it (e.g. data.root where the files live on this machine). The last stdout line is one JSON
object: accuracy, rows, requests, seconds, rows_per_s, degraded answers. Exit 0 on success; 2 when the
input is refused (rows the server answers INVALID_ARGUMENT, e.g. values that overflow the model; a
wrong token; a bad --set), each in one sentence; 1 when the server cannot be reached or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import grpc
import numpy as np

from layerpar.config import ConfigError, from_dict, with_overrides
from layerpar.data import DataError, batches, load_dataset
from layerpar.serve.client import Client

BAD_INPUT = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)


class Refused(ValueError):
    """The server refused some rows as bad input (INVALID_ARGUMENT); the message names them."""


def run(client: Client, *, split: str = "test", batch_size: int = 64, limit: int = 0,
        num_branches: int | None = None, overrides: list[str] | None = None) -> dict:
    """Classify a split through the server; returns the summary printed as JSON."""
    info = client.model_info()
    raw = info["config"]
    raw["serve"] = {}  # the server's serving settings (redacted token) are no business of the data
    cfg = with_overrides(from_dict(raw), overrides)
    data = getattr(load_dataset(cfg), split)
    rows = min(limit, len(data)) if limit else len(data)
    correct = degraded = requests = sent = 0
    t0 = time.perf_counter()
    for x, y in batches(data, batch_size, seed=0, epoch=0, shuffle=False):  # resized to the model's side
        x, y = x[: rows - sent].numpy(), y[: rows - sent].numpy()
        if not len(y):
            break
        try:
            p = client.predict(x, num_branches=num_branches)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            raise Refused(f"the server refused rows {sent}..{sent + len(y) - 1} of the {split} split: "
                          f"{exc.details()}") from None
        correct += int(np.sum(p.predicted == y))
        degraded += int(p.degraded)
        requests += 1
        sent += len(y)
    seconds = time.perf_counter() - t0
    return {"address": client.address, "dataset": cfg.data.name, "split": split, "rows": sent,
            "requests": requests, "accuracy": round(correct / max(1, sent), 6),
            "num_branches": num_branches or info["num_branches"], "checkpoint_id": info["checkpoint_id"],
            "degraded_responses": degraded, "seconds": round(seconds, 3),
            "rows_per_s": round(sent / seconds, 1) if seconds else None}


def cli_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="layerpar predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="127.0.0.1:50051", help="server host:port")
    ap.add_argument("--token", help="bearer token (or env LAYERPAR_SERVE_TOKEN)")
    ap.add_argument("--tls-ca", help="PEM of the CA that signed the server's certificate (turns on TLS)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--batch-size", type=int, default=64, help="rows per request")
    ap.add_argument("--limit", type=int, default=0, help="send only the first n rows (0: all)")
    ap.add_argument("--num-branches", type=int, help="ask for the prefix model of the first k branches")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override the server's data config, e.g. data.root=...")
    args = ap.parse_args(argv)
    token = args.token or os.environ.get("LAYERPAR_SERVE_TOKEN")
    try:
        with Client(args.address, token=token, tls_ca=args.tls_ca, timeout_s=args.timeout) as client:
            summary = run(client, split=args.split, batch_size=args.batch_size, limit=args.limit,
                          num_branches=args.num_branches, overrides=args.set)
    except grpc.RpcError as exc:
        summary = {"error": f"{exc.code().name}: {exc.details()}", "address": args.address}
        bad_input = exc.code() in BAD_INPUT
    except (ConfigError, DataError, ValueError) as exc:  # Refused included
        summary, bad_input = {"error": str(exc), "address": args.address}, True
    except OSError as exc:
        summary, bad_input = {"error": str(exc), "address": args.address}, False
    if "error" in summary:
        print(f"error: {summary['error']}", file=sys.stderr)
    else:
        print(f"{summary['dataset']} {summary['split']}: accuracy {summary['accuracy']:.4f} on "
              f"{summary['rows']} rows with {summary['num_branches']} branches "
              f"({summary['rows_per_s']} rows/s)", file=sys.stderr)
    print(json.dumps(summary))
    if "error" not in summary:
        return 0
    return 2 if bad_input else 1
